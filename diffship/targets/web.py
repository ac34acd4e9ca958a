"""Web target: ONNX graphs for onnxruntime-web at fixed shapes and under the browser's size limits, plus a static app
(`index.html` and ES modules, no build step) that runs the whole pipeline in the page.

fp16 is for WebGPU (FP16 weights and compute; SDXL's VAE stays FP32, as everywhere it overflows), fp32 and int8 for
WASM. The graphs are the export with its shapes pinned, converted, not fused: onnxruntime-web optimizes at load time
for the execution provider the page picks, and the CPU EP's contrib-op fusions are not all in its WebGPU kernels.
In Python the same files run on ONNX Runtime's CPU provider, so they are validated like any other set.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import onnx

from diffship.errors import DiffshipError
from diffship.exporters import precise_norms
from diffship.store.artifacts import atomic_write_json, read_json
from diffship.targets import CompileContext, onnx_graph
from diffship.targets.options import Names, VaeOptions, VaePrecision, vae_fp32_reason
from diffship.targets.pinned import pin, pinned_case, pinned_shapes
from diffship.targets.records import Description
from diffship.targets.webapp.bundle import check_family as app_runs
from diffship.targets.webapp.bundle import runtime_folder, write_app
from diffship.targets.webapp.run import run_app

NAME = "web"
PRECISIONS = ("fp32", "fp16", "int8")
# The largest ArrayBuffer (and protobuf message) Chromium and Firefox allocate: each model file is fetched into one.
FILE_LIMIT = 2**31 - 1
# wasm32's address space: a session's weights and activations live in it.
WASM_LIMIT = 4 * 2**30
BYTES_PER_WEIGHT = {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}
PINNED_SHAPES = True  # the denoiser at the guided batch of each shape it was built for
PATCH_REFUSAL = "web graphs have pinned shapes and a bundled app: rebuild with --lora"


class WebOptions(VaeOptions):
    """The recipe's `[targets.options]` for the browser.

    vae_precision (`VaeOptions`; it was `fp16_vae`): "auto" keeps a VAE that overflows in FP16 (SDXL's) in FP32;
    "fp16" / "fp32" force it.
    fp16_op_block_list: op types kept in FP32 besides ONNX Runtime's converter's defaults.
    app: write the static web app beside the models (false: the graphs only).
    """

    title: ClassVar[str] = "web"

    vae_precision: VaePrecision = "auto"
    fp16_op_block_list: Names = ()
    app: bool = True


def parse_options(options: dict[str, Any]) -> WebOptions:
    """The recipe's options for the web target, with unknown keys and values named."""
    return WebOptions.parse(options)


def writes_artifacts(precision: str, options: WebOptions | None = None) -> bool:
    """Every web set writes its own graphs (pinned shapes)."""
    return True


def needs_calibration(precision: str) -> bool:
    """int8's UNet is static QDQ, calibrated on the captured UNet inputs."""
    return precision == "int8"


def model_index(family: str, components: list[str]) -> dict[str, Any] | None:
    """None: the export's own model_index.json, the ONNX pipeline layout the ONNX Runtime target keeps too."""
    return None


def check_size(name: str, precision: str, files: dict[str, int]) -> None:
    """Refuse a component the browser cannot load: a file over the ArrayBuffer limit or weights over wasm32's."""
    for file, size in files.items():
        if size > FILE_LIMIT:
            raise DiffshipError(
                f"{name} in web {precision} needs a {size / 1e9:.2f} GB file ({file}), over the browser's limit of "
                f"{FILE_LIMIT / 1e9:.2f} GB per ArrayBuffer and protobuf"
                + ("; build web:fp16 for WebGPU." if precision == "fp32" else "."))
    if (total := sum(files.values())) > WASM_LIMIT:
        raise DiffshipError(f"{name} in web {precision} is {total / 1e9:.2f} GB, over wasm32's "
                            f"{WASM_LIMIT / 1e9:.2f} GB memory.")


def _estimate(source: Path, precision: str, kept_fp32: bool) -> dict[str, int]:
    weights = onnx_graph.weight_bytes(source)
    factor = 1.0 if kept_fp32 else BYTES_PER_WEIGHT[precision]
    return {f"{source.name} (estimated)": int(weights * factor)}


def compile(source: Path, precision: str = "fp32", options: WebOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """The browser graph of one component in `dest/model.onnx`: converted to `precision`, its input and output
    shapes pinned, and checked against the browser's limits before and after it is written."""
    options = options or WebOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"Web precision {precision!r} is not available; choose {', '.join(PRECISIONS)}.")
    if dest is None or context is None:
        raise DiffshipError("The web target needs an output folder and the component it prepares.")
    spec = context.spec
    kept = vae_fp32_reason(spec, options.vae_precision) if precision == "fp16" else None
    kept = kept or (_int8_kept(spec) if precision == "int8" else None)
    check_size(spec.name, precision, _estimate(source, precision, kept is not None))  # before any conversion work
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "model.onnx"
    record: dict[str, Any] = {"precision": precision}
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dest) as tmp:
        if precision == "int8":
            from diffship.targets import onnxruntime  # start-up time: onnxruntime

            # ONNX Runtime's own INT8 (static QDQ UNet, dynamic text encoders, VAE kept), on the unfused export.
            source = onnxruntime.compile(source, "int8", onnxruntime.OrtOptions(optimize=False), Path(tmp), context)
            record |= {k: v for k, v in read_json(Path(tmp) / onnx_graph.GRAPH_FILE).items() if k != "precision"}
        model = onnx.load(str(source))
        shapes = pinned_shapes(context)
        pin(model, shapes)  # before FP16: the converter's casts leave the graph unsorted for onnx's checker
        # onnxruntime-web's WebGPU LayerNormalization reads a scale of the whole normalized size: the VAE's GroupNorms
        # go back to the InstanceNormalization torch exported (WASM runs either).
        if restored := precise_norms.layer_norms_as_instance_norms(model):
            record["group_norms"] = f"{restored} LayerNormalization back to InstanceNormalization for WebGPU"
        if precision == "fp16" and not kept:
            model = onnx_graph.to_fp16(model, True, list(options.fp16_op_block_list))
            record["conversion"] = "FP16 weights and compute, FP32 inputs/outputs"
        elif kept:
            record |= {"kept": "fp32", "reason": kept}
        onnx_graph.save(model, out, replace=True)
    written = {p.name: p.stat().st_size for p in dest.iterdir() if p.name.startswith(out.name)}
    try:
        check_size(spec.name, precision, written)
    except DiffshipError:
        for name in written:
            (dest / name).unlink()
        raise
    atomic_write_json(dest / onnx_graph.GRAPH_FILE, record | {"shapes": {k: list(v) for k, v in shapes.items()},
                                                   "bytes": sum(written.values())})
    return out


def _int8_kept(spec: Any) -> str | None:
    return "VAE activations lose too much in INT8" if spec.role.startswith("vae") else None


def parity_cases(spec: Any, artifact: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """The one case a graph was built for."""
    return pinned_case(spec, artifact, cases)


def load(artifact: Path, options: WebOptions | None = None, precision: str | None = None) -> Any:
    """The browser's graph on ONNX Runtime's CPU provider: the same file, so the same numbers as WASM's kernels give
    within float rounding; FP16 is checked for parity, not timed (the CPU has no FP16 kernels)."""
    from diffship.targets.ort_session import OrtOptions, OrtRunner  # start-up time: onnxruntime

    runner = OrtRunner(artifact, OrtOptions(providers=("CPUExecutionProvider",)), precision or "fp32")
    return WebRunner(runner, precision or "fp32")


class WebRunner:
    """An ONNX Runtime CPU runner that describes itself as the web target's artifact."""

    def __init__(self, runner: Any, precision: str):
        self.runner, self.precision = runner, precision
        self.input_names, self.output_names = runner.input_names, runner.output_names

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.runner.run(inputs)

    def describe(self) -> Description:
        described = self.runner.describe()
        skipped = "FP16 graphs are for WebGPU; the CPU has no FP16 kernels: parity only" if self.precision == "fp16" \
            else described.latency_skipped
        return replace(described, target=NAME, latency_skipped=skipped,
                       summary=f"onnxruntime-web graph ({self.precision}), checked on ONNX Runtime CPU; the browser "
                               "test runs it in Chromium")


def preflight(precisions: list[str], options: WebOptions) -> None:
    """Before any work: the app's runtime files are where they are copied from."""
    if options.app:
        runtime_folder()


def check_family(family: str, options: WebOptions) -> None:
    """Once the model is known, before any work: the app runs this family's pipeline."""
    if options.app:
        app_runs(family)


def finish_set(set_dir: Path, components: dict[str, Path], precision: str, options: WebOptions, family: str,
               say: Any) -> None:
    """The static web app beside the graphs (see diffship/targets/webapp/bundle.py)."""
    if options.app:
        write_app(set_dir, components, precision, family, say)


def app_run(artifacts: Any, sample: Any, latents: Any, options: WebOptions,
            say: Any) -> tuple[dict[str, Any], Any] | None:
    """The page itself in headless Chromium for `sample` from `latents` (diffship/targets/webapp/run.py); None when the
    set carries no app. Validation judges its image (validation/app.py)."""
    if not options.app:
        return None

    return run_app(artifacts.pipeline, artifacts.precision, sample, latents, say)
