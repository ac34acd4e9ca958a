"""An artifact folder from someone else cannot make a backend read outside it, even with a manifest whose hashes match."""

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.store.artifacts import sha256_file
from diffship.store.confinement import check_artifact
from diffship.store.manifest import open_artifacts

runner = CliRunner()


def _rehash(folder: Path) -> None:
    """Make the manifest's hashes match the folder again, as whoever crafted the folder would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for component in manifest["components"].values():
        for f in component["files"]:
            f["bytes"], f["sha256"] = (folder / f["path"]).stat().st_size, sha256_file(folder / f["path"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _point_weight_at(folder: Path, location: str, data_file: Path) -> str:
    """Move one VAE decoder weight out of model.onnx into `data_file`, named in the model by `location`."""
    path = folder / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name.endswith("conv_out.weight"))
    data_file.write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(data_file.stat().st_size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    _rehash(folder)
    return tensor.name


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_onnx_external_data_outside_the_folder_is_refused_naming_tensor_and_path(exported, tmp_path: Path, how: str):
    folder = tmp_path / "crafted"
    shutil.copytree(exported("tiny-sd"), folder)
    outside = tmp_path / "outside.bin"
    if how == "symlink":
        name = _point_weight_at(folder, "weights.bin", outside)
        (folder / "vae_decoder" / "weights.bin").symlink_to(outside)
    else:
        name = _point_weight_at(folder, "../../outside.bin" if how == "parent" else str(outside), outside)
    for args in (["generate", str(folder), "-p", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png")],
                 ["validate", str(folder), "-c", "vae_decoder"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        said = " ".join(result.output.split())
        assert ("is absolute" if how == "absolute" else f", outside {folder}") in said and "Refusing to load it" in said
        if how != "symlink":
            assert f"external data of tensor {name!r}" in result.output
    assert not (tmp_path / "x.png").exists()


def test_external_data_inside_the_folder_loads_and_runs(exported, tmp_path: Path):
    """The same crafted weight, kept inside the component's folder, is accepted: the check refuses escapes only."""
    folder = tmp_path / "crafted"
    shutil.copytree(exported("tiny-sd"), folder)
    _point_weight_at(folder, "weights.bin", folder / "vae_decoder" / "weights.bin")
    result = runner.invoke(app, ["generate", str(folder), "-p", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.png").is_file()


def _build_manifest(folder: Path, target: str, component_path: str, files: list[dict]) -> None:
    (folder / "manifest.json").write_text(json.dumps({
        "schema": 1, "kind": "build", "source": {"model": "tiny-sd"},
        "artifacts": {f"{target}-fp32": {"target": target, "precision": "fp32", "pipeline": target,
                                         "components": {"unet": {"path": component_path, "files": files}}}}}))


def test_manifest_paths_that_leave_the_folder_are_refused(tmp_path: Path):
    folder = tmp_path / "build"
    (folder / "onnxruntime" / "unet").mkdir(parents=True)
    _build_manifest(folder, "onnxruntime", "../elsewhere/model.onnx", [])
    with pytest.raises(DiffshipError, match=r"unet artifact: '\.\./elsewhere/model\.onnx' resolves to .* outside"):
        open_artifacts(folder, verify=False)
    (folder / "onnxruntime" / "unet" / "model.onnx").write_bytes(b"")
    _build_manifest(folder, "onnxruntime", "onnxruntime/unet/model.onnx",
                    [{"path": "/etc/hostname", "bytes": 1, "sha256": "0" * 64}])
    with pytest.raises(DiffshipError, match="'/etc/hostname' is absolute"):
        open_artifacts(folder)  # the hash check itself would read the named file


def test_an_openvino_ir_whose_weights_link_outside_is_refused(tmp_path: Path):
    folder = tmp_path / "build"
    ir = folder / "openvino" / "unet" / "openvino_model.xml"
    ir.parent.mkdir(parents=True)
    ir.write_text("<net/>")
    (tmp_path / "secret.bin").write_bytes(b"secret")
    ir.with_suffix(".bin").symlink_to(tmp_path / "secret.bin")
    _build_manifest(folder, "openvino", "openvino/unet/openvino_model.xml", [])
    with pytest.raises(DiffshipError, match="symbolic link .*openvino_model.bin.* outside"):
        open_artifacts(folder, verify=False)
    ir.with_suffix(".bin").unlink()
    ir.with_suffix(".bin").write_bytes(b"weights")
    assert open_artifacts(folder, verify=False).components["unet"] == ir  # the same folder without the link opens


def _coreml_package(folder: Path, item_path: str, weight_file: str) -> Path:
    from coremltools.proto import Model_pb2

    package = folder / "model.mlpackage"
    (package / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (package / "Manifest.json").write_text(json.dumps({
        "fileFormatVersion": "1.0.0", "rootModelIdentifier": "a",
        "itemInfoEntries": {"a": {"path": item_path, "name": "model.mlmodel", "author": "com.apple.CoreML"}}}))
    spec = Model_pb2.Model()
    spec.specificationVersion = 9
    op = spec.mlProgram.functions["main"].block_specializations["CoreML8"].operations.add()
    op.attributes["val"].blobFileValue.fileName = weight_file
    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(b"w")
    return package


@pytest.mark.parametrize(("item", "weights", "message"), [
    ("../../../outside.mlmodel", "@model_path/weights/weight.bin", "outside"),
    ("com.apple.CoreML/model.mlmodel", "@model_path/../../../../secret.bin", "outside"),
    ("com.apple.CoreML/model.mlmodel", "/etc/passwd", "is not under @model_path/"),
])
def test_a_core_ml_package_naming_files_outside_itself_is_refused(tmp_path: Path, item: str, weights: str, message: str):
    pytest.importorskip("coremltools", reason="the Core ML spec is read with coremltools' protobuf classes")
    package = _coreml_package(tmp_path / "unet", item, weights)
    with pytest.raises(DiffshipError, match=message):
        check_artifact(package)


def test_a_core_ml_package_that_stays_inside_passes(tmp_path: Path):
    pytest.importorskip("coremltools", reason="the Core ML spec is read with coremltools' protobuf classes")
    check_artifact(_coreml_package(tmp_path / "unet", "com.apple.CoreML/model.mlmodel", "@model_path/weights/weight.bin"))


def test_a_link_inside_the_folder_is_allowed_and_one_out_of_it_is_not(tmp_path: Path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "model.plan").write_bytes(b"engine")
    os.symlink("model.plan", folder / "alias.plan")
    check_artifact(folder / "model.plan")
    os.symlink(tmp_path, folder / "up")
    with pytest.raises(DiffshipError, match="symbolic link"):
        check_artifact(folder / "model.plan")
