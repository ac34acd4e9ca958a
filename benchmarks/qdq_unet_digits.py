"""The TensorRT INT8 / FP8 UNet recipes on digits-sd, measured where they can be without a GPU.

Model Optimizer quantizes the UNet on captured calibration calls; the exported QDQ graph, prepared as TensorRT
gets it (FP16 around FP32 quantizers), runs in ONNX Runtime on the CPU on a held-out denoising trajectory (another
prompt and seed), against the FP32 PyTorch UNet on each step. Variants: Model Optimizer's plain INT8 (max ranges,
what the `qat` compress step with 0 steps makes), the TensorRT target's INT8 (SmoothQuant + percentile convs),
and FP8 (PyTorch fake-quant only: its TensorRT plugin ops do not run in ONNX Runtime).

    python benchmarks/qdq_unet_digits.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.families.unet import UNET
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.recipe import DEFAULT_CALIBRATION_PROMPTS
from diffship.targets import qdq_unet, tensorrt
from diffship.validation.baseline import load_baseline
from diffship.validation.capture import capture


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    folder = resolve("digits-sd").folder
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    pipe = load_baseline(folder, device="cpu")
    size = 32
    calls = capture(pipe, list(DEFAULT_CALIBRATION_PROMPTS), 16, 8, size, size, 5.0).inputs["unet"]
    held_out = capture(pipe, ["the number four"], None, 20, size, size, 5.0, seed=123, with_vae=False).inputs["unet"]
    reference = wrap(spec, load_component(folder, "unet"))
    expected = [run_torch(reference, spec, c)["out_sample"] for c in held_out]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, mode, percentile in (("Model Optimizer INT8, max ranges (compress qat, 0 steps)", "int8-max", None),
                                        ("TensorRT target INT8: SmoothQuant 0.8 + conv percentile 99.99", "int8", 99.99),
                                        ("TensorRT target FP8 E4M3", "fp8", None)):
            unet = load_component(folder, "unet")
            began = time.perf_counter()
            if mode == "int8-max":
                from diffship.compress.qat import quantize_int8

                quantize_int8(unet, calls, UNET.sensitive.trained_float)
            else:
                qdq_unet.quantize_unet(unet, calls, mode, 0.8, percentile or 100.0, keep_float=UNET.sensitive.trained_float)
            seconds = time.perf_counter() - began
            fake = [_cosine(run_torch(wrap(spec, unet), spec, c)["out_sample"], e)
                    for c, e in zip(held_out, expected, strict=True)]
            onnx_cos: list[float] = []
            if mode != "fp8":
                path = qdq_unet.export_qdq(unet, spec, Path(tmp) / mode)
                prepared = Path(tmp) / f"{mode}-prepared" / "model.onnx"
                tensorrt.prepare_onnx(path, prepared, "int8")
                session = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"])
                onnx_cos = [_cosine(session.run(None, c)[0], e) for c, e in zip(held_out, expected, strict=True)]
            rows.append((label, seconds, fake, onnx_cos))
    print(f"\ndigits-sd UNet, {len(calls)} calibration calls, held-out trajectory of {len(held_out)} steps "
          f"('the number four', seed 123), cosine against PyTorch FP32 per step")
    print("| variant | calibration s | PyTorch fake-quant min / mean | prepared QDQ in ONNX Runtime min / mean |")
    print("|---|---:|---:|---:|")
    for label, seconds, fake, onnx_cos in rows:
        ort_cell = f"{min(onnx_cos):.5f} / {np.mean(onnx_cos):.5f}" if onnx_cos else "n/a (TensorRT plugin ops)"
        print(f"| {label} | {seconds:.1f} | {min(fake):.5f} / {np.mean(fake):.5f} | {ort_cell} |")


if __name__ == "__main__":
    main()
