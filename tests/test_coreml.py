"""The Core ML target: real coremltools conversions of tiny-sd and tiny-sdxl, each package's spec checked against the
ONNX export; prediction parity where Core ML runs (macOS), skipped elsewhere with the reason."""

from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.builtin import builtin_folder
from diffship.models.components import ComponentSpec, TensorSpec, component_specs, run_torch, wrap
from diffship.models.loading import load_component
from diffship.targets import CompileContext, check_available, coreml_package
from diffship.targets import coreml as target
from diffship.targets import coreml_attention as attention

runner = CliRunner()
MODES = ["fp16", "int8-weights", "palette6", "palette4"]
# FP16 conversion of tiny-sd runs in `make test`; every compression mode, and tiny-sdxl (components, not compression
# code: FP16 and the strongest palette cover it), in `make test-all` (each mode of a model costs about a minute).
MODES_OF = {"tiny-sd": MODES, "tiny-sdxl": ["fp16", "palette4"]}
EVERY_COMPONENT = ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
STORAGE = {"int8-weights": "constexpr_blockwise_shift_scale.data INT8", "palette6": "constexpr_lut_to_dense.indices UINT6",
           "palette4": "constexpr_lut_to_dense.indices UINT4"}
NOT_RUN = target.prediction_unavailable()
SLOW = pytest.mark.slow
BUILDS = [pytest.param("tiny-sd", ("fp16",), id="tiny-sd-fp16"),
          pytest.param("tiny-sd", tuple(MODES), id="tiny-sd-every-mode", marks=SLOW),
          pytest.param("tiny-sdxl", tuple(MODES_OF["tiny-sdxl"]), id="tiny-sdxl", marks=SLOW)]


@pytest.fixture(scope="module")
def coreml_build(tiny_build):
    """coreml_build(model, modes) -> the suite's build of `model` for Core ML in `modes`, every component compressed
    (built once; modes shared between builds come from the cache)."""
    return lambda model, modes: tiny_build(model, [{"name": "coreml", "precisions": list(modes),
                                                    "options": {"compress": EVERY_COMPONENT}}])


@pytest.mark.parametrize(("model", "modes"), BUILDS)
def test_every_component_converts_in_every_mode_and_passes_its_spec_checks(coreml_build, model: str, modes: tuple):
    result = coreml_build(model, modes)
    names = [s.name for s in component_specs(builtin_folder(model))]
    assert result.passed
    for mode in modes:
        r = result.report["sets"][f"coreml-{mode}"]
        assert set(r["spec"]["components"]) == set(names)
        for name, checked in r["spec"]["components"].items():
            failed = [c for c in checked["checks"] if not c["passed"]]
            assert not failed, (mode, name, failed)
            assert {c["check"] for c in checked["checks"]} >= {"inputs: names", "inputs: dtypes", "inputs: shapes",
                                                               "outputs: names", "outputs: dtypes", "weights"}
        entry = result.manifest["artifacts"][f"coreml-{mode}"]
        assert entry["status"] == ("spec-checked" if NOT_RUN else "passed")
        for name in names:
            package = result.out / entry["components"][name]["path"]
            assert package.name == "model.mlpackage" and (package / "Manifest.json").is_file()


@pytest.mark.skipif(NOT_RUN is None, reason="on macOS the sets run parity and are reported as such")
def test_off_macos_no_parity_is_claimed_and_the_report_says_why(coreml_build):
    result = coreml_build("tiny-sd", ("fp16",))
    r = result.report["sets"]["coreml-fp16"]
    assert "parity" not in r and "e2e" not in r and "latency" not in r
    assert "macOS" in r["not_run"]
    validation = result.manifest["artifacts"]["coreml-fp16"]["validation"]
    assert validation["parity_passed"] is None and validation["spec_passed"] is True
    markdown = (result.out / "report" / "report.md").read_text()
    assert "coreml-fp16: not run here" in markdown and "none is claimed" in markdown
    assert "| coreml-fp16 |" in markdown and "| spec ok | not run |" in markdown
    assert not list((result.out / "report" / "images").glob("grid-coreml*")), "no image grid for a set that never ran"


@pytest.mark.parametrize(("model", "modes"), [BUILDS[0], BUILDS[2]])
def test_io_names_dtypes_and_shapes_equal_the_onnx_export(coreml_build, model: str, modes: tuple):
    result = coreml_build(model, modes)
    entry = result.manifest["artifacts"]["coreml-fp16"]
    for name, component in entry["components"].items():
        held = coreml_package.inspect_package(result.out / component["path"])
        onnx = result.manifest["artifacts"]["coreml-fp16"]["components"][name]
        assert [f["name"] for f in held["inputs"]] == [f["name"] for f in onnx["inputs"]]
        assert [f["name"] for f in held["outputs"]] == [f["name"] for f in onnx["outputs"]]
        # float32 in and out as in ONNX (coremltools alone would make FP16 outputs); token ids int32
        assert [f["dtype"] for f in held["inputs"]] == [f["dtype"] for f in onnx["inputs"]]
        assert {f["dtype"] for f in held["outputs"]} == {"float32"}
        for have, want in zip(held["inputs"], onnx["inputs"], strict=True):
            assert len(have["shape"]) == len(want["shape"])
            assert all(h == w for h, w in zip(have["shape"], want["shape"], strict=True) if isinstance(w, int))
    unet = coreml_package.inspect_package(result.out / entry["components"]["unet"]["path"])
    side = result.report["validation"]["height"]  # fixed at the validation resolution, one image under guidance
    assert unet["inputs"][0]["shape"] == [2, 4, side // 8, side // 8]
    assert unet["outputs"][0]["shape"] == [2, 4, side // 8, side // 8]


@pytest.mark.parametrize(("model", "modes"), BUILDS[1:])
def test_compressed_weights_are_stored_as_their_mode_says_and_shrink_the_packages(coreml_build, model: str, modes: tuple):
    result = coreml_build(model, modes)
    sizes = {}
    for mode in modes:
        spec = result.report["sets"][f"coreml-{mode}"]["spec"]["components"]
        sizes[mode] = spec["unet"]["bytes"]
        for name, checked in spec.items():
            path = result.out / result.manifest["artifacts"][f"coreml-{mode}"]["components"][name]["path"]
            info = coreml_package.read_info(path)
            if mode == "fp16":
                assert info["compression"] is None
                assert all(k.startswith("const.val FLOAT") for k in checked["weights"])
            else:
                assert checked["weights"].get(STORAGE[mode], 0) > 0, (mode, name, checked["weights"])
                assert info["compression"]["granularity"].startswith("per_channel" if mode == "int8-weights" else
                                                                     "per_grouped_channel")
    ordered = [sizes[m] for m in MODES if m in sizes]
    assert ordered == sorted(ordered, reverse=True) and len(set(ordered)) == len(ordered)
    assert sizes.get("int8-weights", 0) < 0.65 * sizes["fp16"] and sizes["palette4"] < 0.45 * sizes["fp16"]


@pytest.mark.slow
def test_sdxl_vae_stays_fp32_in_fp16_sets_and_the_report_says_why(coreml_build):
    result = coreml_build("tiny-sdxl", MODES_OF["tiny-sdxl"])
    for name in ("vae_encoder", "vae_decoder"):
        path = result.out / result.manifest["artifacts"]["coreml-fp16"]["components"][name]["path"]
        info = coreml_package.read_info(path)
        assert info["compute_precision"] == "fp32" and "overflows in FP16" in info["kept_fp32_reason"]
        assert set(coreml_package.inspect_package(path)["weights"]) == {"const.val FLOAT32"}
    unet = result.out / result.manifest["artifacts"]["coreml-fp16"]["components"]["unet"]["path"]
    assert set(coreml_package.inspect_package(unet)["weights"]) == {"const.val FLOAT16"}
    assert "SDXL's VAE overflows" in (result.out / "report" / "report.md").read_text()


@pytest.mark.parametrize(("mode", "compression"), [("fp16", None), pytest.param("palette4", "palettization", marks=SLOW)])
def test_packages_carry_metadata_and_descriptions(coreml_build, mode: str, compression: str | None):
    result = coreml_build("tiny-sd", ("fp16",) if mode == "fp16" else MODES)
    path = result.out / result.manifest["artifacts"][f"coreml-{mode}"]["components"]["unet"]["path"]
    spec = coreml_package.load_coremltools().utils.load_spec(str(path))
    meta = dict(spec.description.metadata.userDefined)
    assert meta["diffship.component"] == "unet" and meta["diffship.precision"] == mode
    # Packages are cached by weights, which models share: the model's name is the manifest's to say.
    assert "diffship.source" not in meta
    assert meta["diffship.attention"] == "split_einsum"
    assert compression in meta["diffship.compression"] if compression else meta["diffship.compression"] == "none"
    assert spec.description.metadata.author == "diffship"
    assert {f.name: f.shortDescription for f in spec.description.input}["timestep"].startswith("the denoising timestep")


@pytest.mark.slow
def test_a_build_converts_each_component_once_and_compresses_that(coreml_build):
    every = coreml_build("tiny-sd", MODES)
    infos = [coreml_package.read_info(every.out / every.manifest["artifacts"][f"coreml-{m}"]["components"]["unet"]["path"])
             for m in MODES]
    assert not infos[0]["conversion_reused"] and all(i["conversion_reused"] for i in infos[1:])


# --- conversion details, on single components -----------------------------------------------------------------


def _context(model: str, name: str, **kw) -> CompileContext:
    folder = builtin_folder(model)
    spec = next(s for s in component_specs(folder) if s.name == name)
    return CompileContext(spec, None, None, (64, 64),
                          {"batch": [1, 2], "height": [64, 128], "width": [64, 128]}, kw.pop("opt", (64, 64)), True,
                          folder, **kw)


@pytest.mark.slow
def test_enumerated_resolutions_are_accepted_and_nothing_else(exported, tmp_path: Path):
    onnx = exported("tiny-sd") / "unet" / "model.onnx"
    options = target.parse_options({"resolutions": [[64, 128], [128, 64]], "attention": "sdpa"})
    package = target.compile(onnx, "fp16", options, tmp_path / "unet", _context("tiny-sd", "unet"))
    held = coreml_package.inspect_package(package)
    sample = held["inputs"][0]
    assert sorted(map(tuple, sample["enumerated"])) == [(2, 4, 8, 8), (2, 4, 8, 16), (2, 4, 16, 8)]
    assert sample["shape"] == [2, 4, 8, 8]  # the default: the validation resolution
    assert held["inputs"][1]["enumerated"] == [] and held["inputs"][1]["shape"] == [2]
    checked = coreml_package.check_package(package)
    assert checked["passed"], [c for c in checked["checks"] if not c["passed"]]
    cases = target.parity_cases(_context("tiny-sd", "unet").spec, package, ())
    assert [(c.batch, c.height, c.width) for c in cases] == [(2, 64, 64), (2, 64, 128), (2, 128, 64)]


def test_a_resolution_the_model_cannot_take_is_refused(exported, tmp_path: Path):
    options = target.parse_options({"resolutions": [[64, 100]]})
    with pytest.raises(DiffshipError, match="must be positive multiples of 64 pixels"):
        target.compile(exported("tiny-sd") / "unet" / "model.onnx", "fp16", options, tmp_path / "u", _context("tiny-sd", "unet"))
    assert not (tmp_path / "u" / target.PACKAGE).exists()


@pytest.mark.parametrize("implementation", ["original", "split_einsum", "split_einsum_v2"])
@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_attention_implementations_compute_what_diffusers_computes(implementation: str, component: str, model_cache):
    folder = builtin_folder("tiny-sd")
    spec = next(s for s in component_specs(folder) if s.name == component)
    module = load_component(folder, spec.module)
    inputs = spec.sample_inputs(2, 64, 64)
    expected = run_torch(wrap(spec, module), spec, inputs)
    changed = copy.deepcopy(module)
    assert attention.use_attention(changed, implementation) > 0
    got = run_torch(wrap(spec, changed), spec, inputs)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)


def test_split_einsum_v2_chunks_long_queries_and_matches_the_others():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 1, n, generator=generator) for n in (1100, 77, 77))  # 1100 = 2 chunks of 512 + 76
    reference = attention.original(q, k, v, heads=4)
    torch.testing.assert_close(attention.split_einsum(q, k, v, heads=4), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attention.split_einsum_v2(q, k, v, heads=4), reference, rtol=1e-4, atol=1e-5)
    # against PyTorch's own attention, heads laid out as (B, H, S, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.squeeze(2).reshape(1, 4, 16, -1).transpose(2, 3) for t in (q, k, v)))
    torch.testing.assert_close(sdpa.transpose(2, 3).reshape(1, 64, 1, -1), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("implementation", "deployment", "present", "absent"), [
    ("sdpa", "iOS18", "scaled_dot_product_attention", "einsum"),
    ("sdpa", "iOS17", "softmax", "scaled_dot_product_attention"),  # the fused op exists from iOS 18
    ("split_einsum", "iOS18", "einsum", "scaled_dot_product_attention"),
    ("original", "iOS18", "softmax", "scaled_dot_product_attention"),
])
def test_the_converted_graph_carries_the_chosen_attention(exported, tmp_path: Path, implementation: str, deployment: str,
                                                          present: str, absent: str):
    options = target.parse_options({"attention": implementation, "minimum_deployment_target": deployment})
    package = target.compile(exported("tiny-sd") / "vae_decoder" / "model.onnx", "fp16", options, tmp_path / "vae",
                             _context("tiny-sd", "vae_decoder"))
    ops = coreml_package.inspect_package(package)["ops"]
    assert present in ops and absent not in ops, ops
    assert coreml_package.read_info(package)["specification_version"] == {"iOS18": 9, "iOS17": 8}[deployment]
    assert coreml_package.check_package(package)["passed"]


def test_per_grouped_channel_palettes_need_ios18_and_fall_back_to_one_table_per_tensor(exported, tmp_path: Path):
    options = target.parse_options({"minimum_deployment_target": "iOS17", "compress": ["vae_decoder"]})
    package = target.compile(exported("tiny-sd") / "vae_decoder" / "model.onnx", "palette4", options, tmp_path / "v",
                             _context("tiny-sd", "vae_decoder"))
    info = coreml_package.read_info(package)
    assert info["compression"]["granularity"].startswith("per_tensor")
    checked = coreml_package.check_package(package)
    # before iOS 18 the 4-bit indices are packed into bytes; the 16-entry tables say they are 4-bit
    assert checked["passed"], [c for c in checked["checks"] if not c["passed"]]
    assert checked["weights"]["constexpr_lut_to_dense.indices UINT8"] > 0
    assert set(coreml_package.inspect_package(package)["lut_entries"]) == {"16"}


def test_the_spec_check_catches_a_package_that_does_not_match(exported, tmp_path: Path):
    onnx = exported("tiny-sd") / "vae_decoder" / "model.onnx"
    package = target.compile(onnx, "fp16", target.parse_options({}), tmp_path / "v", _context("tiny-sd", "vae_decoder"))
    info_path = package.parent / target.INFO
    info = json.loads(info_path.read_text())
    assert coreml_package.check_package(package)["passed"]

    def failed_after(edit) -> set[str]:
        changed = copy.deepcopy(info)
        edit(changed)
        info_path.write_text(json.dumps(changed))
        return {c["check"] for c in coreml_package.check_package(package)["checks"] if not c["passed"]}

    assert failed_after(lambda i: i["onnx_io"]["inputs"][0].update(name="latents")) >= {"inputs: names"}
    assert failed_after(lambda i: i["onnx_io"]["outputs"][0].update(dtype="float16")) == {"outputs: dtypes"}
    assert failed_after(lambda i: i["shapes"].append({"latent_sample": [1, 4, 16, 16]})) == {"inputs: shapes"}
    assert failed_after(lambda i: i["onnx_io"]["outputs"][0].update(shape=["batch", 4, "height", "width"])) == {
        "outputs: shapes"}
    assert failed_after(lambda i: i.update(precision="palette4", compression={"weight_threshold": 2048})) >= {"weights"}
    assert failed_after(lambda i: i.update(specification_version=8)) == {"ML program"}


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"attention": "flash"}, "Unknown Core ML attention 'flash'; choose sdpa, original, split_einsum, split_einsum_v2"),
    ({"minimum_deployment_target": "iOS99"}, "Unknown Core ML minimum_deployment_target 'iOS99'; choose one of"),
    ({"minimum_deployment_target": "iOS15"}, "too old: diffship's packages need iOS16 or newer"),
    ({"compress": ["unet", "safety_checker"]}, "unknown component(s) safety_checker"),
    ({"resolutions": [[512]]}, "must be [height, width] pairs"),
    ({"resolutions": [[0, 64]]}, "must be positive"),
    ({"compute_units": "GPU"}, "Unknown Core ML compute_units 'GPU'"),
    ({"vae_precision": "bf16"}, "Unknown Core ML vae_precision"),
    ({"untested_torch": "ignore"}, "Unknown Core ML untested_torch 'ignore'; choose warn or refuse"),
    ({"palette_group_size": 0}, "palette_group_size must be at least 1"),
    ({"nbits": 3}, "Unknown Core ML option(s) nbits"),
])
def test_bad_options_are_refused_naming_the_choices(options: dict, message: str):
    with pytest.raises(DiffshipError) as caught:
        target.parse_options(options)
    assert message in str(caught.value)


def test_a_bit_width_that_does_not_exist_is_refused_before_any_work(tmp_path: Path):
    result = runner.invoke(app, ["build", "--model", "tiny-sd", "--targets", "coreml:palette3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "cannot build palette3 yet; it offers fp16, fp32, int8-weights, palette6, palette4" in result.output
    assert not (tmp_path / "o").exists()


def test_compile_refuses_what_it_cannot_convert_before_loading_weights(exported, tmp_path: Path):
    onnx = exported("tiny-sd") / "unet" / "model.onnx"
    context = _context("tiny-sd", "unet")
    with pytest.raises(DiffshipError, match="precision 'int2' is unknown"):
        target.compile(onnx, "int2", None, tmp_path, context)
    with pytest.raises(DiffshipError, match="coremltools converts PyTorch, not ONNX"):
        target.compile(onnx, "fp16", None, tmp_path, CompileContext(context.spec))
    with pytest.raises(DiffshipError, match="No ONNX export at"):
        target.compile(tmp_path / "missing.onnx", "fp16", None, tmp_path, context)
    assert not any(tmp_path.iterdir())


def test_a_component_that_fails_conversion_names_the_op(tmp_path: Path):
    class Erfinv(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.erfinv(x)

    spec = ComponentSpec("probe", "probe", (TensorSpec("x", "float32", (1, 4)),), (TensorSpec("y", "float32", (1, 4)),), 8)
    with pytest.raises(DiffshipError, match=r"Core ML could not convert probe: .*'erfinv'"):
        target.convert(Erfinv(), spec, [{"x": (1, 4)}], "fp16", "iOS18", target.torch_support())


def test_torch_outside_what_coremltools_supports_is_refused_with_the_range(monkeypatch):
    support = target.torch_support()
    if not support["tested"]:
        with pytest.raises(DiffshipError, match=rf"newer than coremltools .* has tested \(it supports .* to "
                                                rf"{support['newest_tested']}\)"):
            target.check_torch(target.parse_options({"untested_torch": "refuse"}))
        assert target.check_torch(target.parse_options({}))["tested"] is False  # 'warn' converts, and records it
    monkeypatch.setattr(target, "TORCH_MIN", "99.0")
    with pytest.raises(DiffshipError, match=r"converts from torch 99.0 to .*; this is torch"):
        target.check_torch(target.parse_options({}))


def test_a_missing_coremltools_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    with pytest.raises(DiffshipError, match=r"pip install 'diffship\[coreml\]'"):
        check_available("coreml")


# --- a build whose parity cannot run here ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(NOT_RUN is None, reason="Core ML prediction runs on this Mac, so parity is not missing")
def test_require_parity_fails_the_build_here_and_still_writes_the_report(tmp_path: Path, model_cache: Path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "tiny-sd"\n[validation]\nprompts = ["a red bicycle"]\nsteps = 2\n'
                      '[[targets]]\nname = "coreml"\nprecisions = ["fp16"]\n'
                      'options = { require_parity = true, attention = "sdpa" }\n')
    result = runner.invoke(app, ["build", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["artifacts"]["coreml-fp16"]["status"] == "failed" and not manifest["passed"]
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "require_parity, so the set fails here" in report


@pytest.mark.skipif(NOT_RUN is None, reason="Core ML prediction runs on this Mac")
def test_running_a_package_off_macos_is_a_clear_error(coreml_build, tmp_path: Path):
    result = coreml_build("tiny-sd", ("fp16",))
    path = result.out / result.manifest["artifacts"]["coreml-fp16"]["components"]["unet"]["path"]
    with pytest.raises(DiffshipError, match=f"Core ML prediction needs macOS; this machine runs {platform.system()}"):
        target.load(path)
    result = runner.invoke(app, ["generate", str(result.out), "--backend", "coreml", "-p", "a cat",
                                 "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "needs macOS" in result.output


# --- prediction (macOS only) ----------------------------------------------------------------------------------


@pytest.mark.skipif(NOT_RUN is not None, reason=f"{NOT_RUN}: Core ML packages only run on macOS")
@pytest.mark.parametrize("mode", MODES)
def test_on_macos_every_package_matches_pytorch_within_its_tolerance(coreml_build, mode: str):
    result = coreml_build("tiny-sd", MODES)
    r = result.report["sets"][f"coreml-{mode}"]
    assert r["passed"] and r["parity"]["passed"] and r["e2e"]["passed"]


@pytest.mark.skipif(NOT_RUN is not None, reason=f"{NOT_RUN}: Core ML packages only run on macOS")
def test_on_macos_the_runner_refuses_a_shape_the_package_was_not_built_for(coreml_build):
    result = coreml_build("tiny-sd", ("fp16",))
    path = result.out / result.manifest["artifacts"]["coreml-fp16"]["components"]["vae_decoder"]["path"]
    runner_ = target.load(path)
    with pytest.raises(DiffshipError, match="was built for input shapes"):
        runner_.run({"latent_sample": np.zeros((1, 4, 16, 16), np.float32)})
