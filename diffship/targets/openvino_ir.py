"""Writing OpenVINO IRs: the inputs as clients feed them, a full disk said as such, and the int8-hybrid path's
scratch IRs (checked for room before they are written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import openvino as ov
from openvino.preprocess import PrePostProcessor

from diffship.errors import DiffshipError, DiskFull, public_path, size_text
from diffship.targets.ir_names import stable_names
from diffship.targets.onnx_weights import fp32_bytes

# Inputs in the element type OpenVINO GenAI feeds them (it writes its tokenizer's i64 ids and an i64 timestep
# straight into the request); optimum-intel and diffship's runtime are cast by OpenVINO's Python dispatcher.
CLIENT_INPUT_TYPES = {"input_ids": ov.Type.i64, "timestep": ov.Type.i64}


def own_input_names(model: ov.Model, names: list[str]) -> None:
    """Each input tensor named by its spec name alone. Where the graph's first op on an input was a no-op Cast
    (Flux's `timestep.to(dtype)`), OpenVINO folds it and the input also carries the Cast's output name, which
    `get_any_name()` may return: optimum-intel reshapes the transformer by that name and fails on it."""
    for port in model.inputs:
        own = [n for n in names if n in port.get_names()]
        if own and port.get_names() != {own[0]}:
            port.get_tensor().set_names({own[0]})


def as_clients_feed(model: ov.Model, whole_timesteps: bool = True) -> ov.Model:
    """`model` taking `input_ids` and `timestep` as i64 (a Convert to the graph's own type goes in front); a
    flow-matching denoiser's timestep stays float (its steps are fractions, and clients feed them so)."""
    ppp = PrePostProcessor(model)
    changed = False
    for port in model.inputs:
        wanted = CLIENT_INPUT_TYPES.get(port.get_any_name())
        if port.get_any_name() == "timestep" and not whole_timesteps:
            continue
        if wanted is not None and port.get_element_type() != wanted:
            ppp.input(port.get_any_name()).tensor().set_element_type(wanted)
            changed = True
    return ppp.build() if changed else model


# int8-hybrid w8's scratch beside the artifact, per weight: the converted IR in FP32 (4 bytes, measured on sd35m-arch's
# transformer: 9.9 GB for 2.47B weights, BF16-stored export included) and its INT8 copy with scales (about 1.25)
SCRATCH_BYTES_PER_WEIGHT = 5.25


def check_scratch_disk(source: Path, dest: Path, what: str) -> None:
    """Refuse, before anything is written, a compile of the ONNX `source` whose scratch IRs the disk under `dest` has
    no room for: filling it 90 s in (the 13 GB of a 2.5B transformer) would take the machine's other writers down."""
    need = int(SCRATCH_BYTES_PER_WEIGHT * fp32_bytes(source) / 4)
    where = next(p for p in (dest, *dest.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        raise DiffshipError(f"The {what} compile writes its converted FP32 weights and their INT8 copy beside the "
                            f"artifact first: about {size_text(need)}, and {public_path(where)} has "
                            f"{size_text(free)} free. Nothing was written. Free some space, or set DIFFSHIP_CACHE "
                            "to a disk with more room.")


def through_disk(model: ov.Model, folder: Path) -> ov.Model:
    """`model` saved as an IR and read back: its weights then map from the file instead of living on the heap."""
    folder.mkdir(parents=True, exist_ok=True)
    save_ir(model, folder / "openvino_model.xml", compress_to_fp16=False)
    return ov.Core().read_model(str(folder / "openvino_model.xml"))


def save_ir(model: ov.Model, xml: Path, compress_to_fp16: bool) -> None:
    """`ov.save_model`, with a full disk said as such: OpenVINO reports it only as "basic_ios::clear: iostream error"."""
    try:
        ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
        stable_names(xml)
    except RuntimeError as exc:
        if "iostream" in str(exc) and shutil.disk_usage(xml.parent).free < 256 * 2**20:
            raise DiskFull(xml.parent) from exc
        raise
