"""Mobile target: each component as an ORT-format model (`model.ort`, onnxruntime's own converter) at pinned shapes,
its graph rewritten so phone execution providers (NNAPI on Android, Core ML on iOS) take it whole, with the
`required_operators.config` a reduced ONNX Runtime build needs and the rewritten `model.onnx` kept beside it.

int8 is QDQ made with onnxruntime's QNN quantization configuration (uint16 activations and uint8 weights by default,
what Qualcomm's HTP runs Stable Diffusion with), calibrated on the captured inputs; the VAE stays FP32, as in the
other targets' INT8. Here the `.ort` files run on ONNX Runtime's CPU provider, so they are validated like any set;
NNAPI, Core ML and QNN themselves cannot run on this machine, and the report carries onnxruntime's usability check
for them instead.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx

from diffship.errors import DiffshipError
from diffship.store.artifacts import atomic_write_json, read_json
from diffship.targets import CompileContext, calibration_inputs, mobile_graph, onnx_graph
from diffship.targets.mobile_check import usability
from diffship.targets.options import TargetOptions
from diffship.targets.pinned import pin, pinned_case, pinned_shapes
from diffship.targets.records import Description

NAME = "mobile"
PRECISIONS = ("fp32", "int8")
MODEL = "model.ort"
OPERATORS = "required_operators.config"
PINNED_SHAPES = True  # the denoiser at the guided batch of each shape it was built for
PATCH_REFUSAL = "ORT-format models are written whole: rebuild with --lora"


class MobileOptions(TargetOptions):
    """The recipe's `[targets.options]` for phones.

    int8_activations: the QNN QDQ activation type, "uint16" (default; Stable Diffusion on Qualcomm's HTP) or "uint8".
    rewrite: apply the graph rewrites for NNAPI / Core ML (false: pinned shapes only, for comparison).
    """

    title: ClassVar[str] = "mobile"

    int8_activations: Literal["uint16", "uint8"] = "uint16"
    rewrite: bool = True


def parse_options(options: dict[str, Any]) -> MobileOptions:
    """The recipe's options for the mobile target, with unknown keys and values named."""
    return MobileOptions.parse(options)


def writes_artifacts(precision: str, options: MobileOptions | None = None) -> bool:
    """Every mobile set writes its own models."""
    return True


def needs_calibration(precision: str) -> bool:
    """int8 is calibrated on the captured inputs."""
    return precision == "int8"


def model_index(family: str, components: list[str]) -> dict[str, Any] | None:
    """None: the export's own model_index.json, the ONNX pipeline layout the ONNX Runtime target keeps too."""
    return None


def compile(source: Path, precision: str = "fp32", options: MobileOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """`dest/model.ort` (and the rewritten `model.onnx`, `required_operators.config`, the usability check)."""
    options = options or MobileOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"Mobile precision {precision!r} is not available; choose {', '.join(PRECISIONS)}.")
    if dest is None or context is None:
        raise DiffshipError("The mobile target needs an output folder and the component it prepares.")
    spec = context.spec
    # The export's files are measured before they are loaded: SDXL's UNet would take 10 GB of memory to be refused.
    size = onnx_graph.weight_bytes(source)
    if size >= onnx_graph.TWO_GB:
        raise DiffshipError(f"{spec.name} is {size / 1e9:.2f} GB, over 2 GB: the ORT format, like protobuf, cannot hold "
                            "it; phones need a smaller model (a distilled or pruned one, `diffship compress`).")
    model = onnx.load(str(source))
    shapes = pinned_shapes(context)
    pin(model, shapes)
    record: dict[str, Any] = {"precision": precision, "shapes": {k: list(v) for k, v in shapes.items()}}
    if options.rewrite:
        host = spec.is_denoiser and spec.denoiser.host_embedding
        record["rewrites"] = rewrite(model, source.parent / "config.json" if host else None)
    dest.mkdir(parents=True, exist_ok=True)
    onnx_path = dest / "model.onnx"
    onnx.save(model, str(onnx_path))
    if precision == "int8":
        if spec.denoises:
            record["quantization"] = _quantize_qnn(onnx_path, context, options, record.get("rewrites", {}))
        else:  # QNN's all-tensor QDQ destroys CLIP's additive causal mask (cosine 0.14 on tiny CLIP), and the VAE's range
            record |= {"kept": "fp32", "reason": "the denoiser is what runs every step; text encoder and VAE activations "
                                                 "lose too much in QNN's all-tensor INT8"}
    record["usability"] = _usability(onnx_path)
    _to_ort(onnx_path, dest)
    atomic_write_json(dest / onnx_graph.GRAPH_FILE, record)
    return dest / MODEL


def rewrite(model: onnx.ModelProto, denoiser_config: Path | None) -> dict[str, Any]:
    """The phone-provider rewrites of `mobile_graph`, in place; what each did."""
    done: dict[str, Any] = {}
    if denoiser_config is not None and (width := mobile_graph.host_timestep_embedding(model)):
        config = read_json(denoiser_config)
        done["timestep_embedding"] = {"dim": width, "flip_sin_to_cos": config.get("flip_sin_to_cos", True),
                                      "freq_shift": config.get("freq_shift", 0)}
    from polygraphy.backend.onnx import fold_constants  # start-up time: polygraphy

    folded = fold_constants(model, num_passes=None, fold_shapes=True, error_ok=False, do_shape_inference=True)
    model.CopyFrom(onnx.shape_inference.infer_shapes(folded))
    done["decomposed"] = mobile_graph.decompose_norms_and_erf(model)
    done["resize_roi"] = mobile_graph.name_empty_resize_roi(model)
    return done


def host_embedding(timestep: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
    """diffusers' sinusoidal timestep embedding, computed on the host for a graph that takes it as input."""
    import torch  # start-up time: torch
    from diffusers.models.embeddings import get_timestep_embedding  # start-up time: diffusers

    return get_timestep_embedding(torch.from_numpy(np.asarray(timestep, np.float32)).reshape(-1), settings["dim"],
                                  settings["flip_sin_to_cos"], settings["freq_shift"]).numpy()


def _feed(call: dict[str, np.ndarray], rewrites: dict[str, Any]) -> dict[str, np.ndarray]:
    if "timestep_embedding" not in rewrites:
        return call
    feed = {k: v for k, v in call.items() if k != "timestep"}
    return feed | {mobile_graph.EMBEDDING_INPUT: host_embedding(call["timestep"], rewrites["timestep_embedding"])}


def _quantize_qnn(path: Path, context: CompileContext, options: MobileOptions, rewrites: dict[str, Any]) -> dict[str, Any]:
    """QDQ in place with onnxruntime's QNN configuration, calibrated on the component's captured inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize  # start-up time: onnxruntime
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config  # start-up time: onnxruntime

    calls = [_feed(c, rewrites) for c in calibration_inputs(context, "int8")]
    names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    calls = [{k: v for k, v in c.items() if k in names} for c in calls]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rest = iter(calls)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rest, None)

    activation = QuantType.QUInt16 if options.int8_activations == "uint16" else QuantType.QUInt8
    config = get_qnn_qdq_config(str(path), Reader(), activation_type=activation, weight_type=QuantType.QUInt8)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        quantize(str(path), str(out), config)
        shutil.move(out, path)
    return {"format": "QDQ (onnxruntime QNN configuration)", "activations": options.int8_activations,
            "weights": "uint8", "calibration_calls": len(calls)}


def _usability(path: Path) -> dict[str, Any]:
    return usability(path)


def _to_ort(onnx_path: Path, dest: Path) -> None:
    """model.ort and required_operators.config through onnxruntime's converter, with runtime optimizations (the
    style its docs ask for when NNAPI or Core ML will take the nodes)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (  # start-up time: onnxruntime
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        convert_onnx_models_to_ort(onnx_path, Path(tmp), [OptimizationStyle.Runtime])
        made = {p.suffix: p for p in Path(tmp).iterdir()}
        if ".ort" not in made or ".config" not in made:
            raise DiffshipError(f"onnxruntime's ORT-format converter wrote {sorted(p.name for p in made.values())} "
                                f"for {onnx_path}, not a model and its operators.")
        shutil.move(made[".ort"], dest / MODEL)
        shutil.move(made[".config"], dest / OPERATORS)


def parity_cases(spec: Any, artifact: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """The one shape each model was built for."""
    return pinned_case(spec, artifact, cases)


class MobileRunner:
    """An ORT-format model on ONNX Runtime's CPU provider, taking the component's usual inputs: a UNet whose
    timestep embedding moved to the host gets it computed here, as an app on a phone would."""

    def __init__(self, artifact: Path, precision: str):
        from diffship.targets.ort_session import OrtOptions, OrtRunner  # start-up time: onnxruntime

        self.record = read_json(artifact.parent / onnx_graph.GRAPH_FILE)
        self.rewrites = self.record.get("rewrites", {})
        self.runner = OrtRunner(artifact, OrtOptions(providers=("CPUExecutionProvider",)), "fp32")
        self.precision, self.output_names = precision, self.runner.output_names
        names = self.runner.input_names
        self.input_names = tuple("timestep" if n == mobile_graph.EMBEDDING_INPUT else n for n in names)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.run(_feed(inputs, self.rewrites))

    def describe(self) -> Description:
        described = self.runner.describe()
        usable = {ep: f"{u['supported_nodes']}/{u['nodes']} nodes, {u['partitions']} partition(s), {u['verdict']}"
                  for ep, u in self.record.get("usability", {}).items()}
        rewrites, q = self.rewrites, self.record.get("quantization")
        done = [*(["timestep embedding on the host"] if "timestep_embedding" in rewrites else []),
                *(f"{op} {n} decomposed" for op, n in sorted(rewrites.get("decomposed", {}).items()))]
        graph = {"conversion": "ORT format" + (f"; {', '.join(done)}" if done else ""),
                 "quantization": f"{q['format']}, {q['activations']} activations, {q['weights']} weights, "
                                 f"{q['calibration_calls']} calls" if q else "",
                 "reason": self.record.get("reason", "")}
        return replace(described, target=NAME, precision=self.precision, graph=graph,
                       details=described.details | {"usability": usable},
                       summary=f"ORT format ({self.precision}) on ONNX Runtime CPU; NNAPI / Core ML / QNN cannot run "
                               "here: usability checked")


def load(artifact: Path, options: MobileOptions | None = None, precision: str | None = None) -> MobileRunner:
    """A Runner for a model.ort."""
    return MobileRunner(artifact, precision or "fp32")
