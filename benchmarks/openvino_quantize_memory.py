"""Peak memory of OpenVINO int8-hybrid quantization (NNCF) of a UNet export, three ways, each in its own child process:
quantizing the model `ov.convert_model` returns (weights mapped from the ONNX data file, FP32); quantizing an
FP16-compressed IR saved first and read back (weights mapped from the .bin, half the bytes; optimum-intel's order,
huggingface/optimum-intel#878); and `matmuls = "w8"` (the MatMuls' weights compressed data-free first, only the rest
calibrated). The build's own function (`openvino.quantize_calibrated`) and settings; RSS sampled every 0.2 s.

    python benchmarks/openvino_quantize_memory.py --onnx out/sd15/onnx/unet/model.onnx [--size 512] [--samples 8]
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import PeakRss

VARIANTS = ("converted", "ir-reloaded", "w8")


def quantize(onnx_path: Path, variant: str, size: int, samples: int) -> None:
    """One int8-hybrid quantization as `openvino.compile` runs it; prints peak RSS, seconds and the IR's bytes."""
    import numpy as np
    import openvino as ov

    from diffship.host.memory import release_freed
    from diffship.models.families.unet import UNET
    from diffship.targets.openvino import OvOptions, compress_matmul_weights, quantize_calibrated
    from diffship.targets.openvino_ir import through_disk
    from diffship.targets.openvino_nncf import ignored_patterns

    UNET_SENSITIVE = ignored_patterns(UNET.sensitive.kept_float)

    peak = PeakRss().start()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=onnx_path.parent.parent) as tmp:
        model = ov.convert_model(str(onnx_path))
        if variant == "ir-reloaded":
            ov.save_model(model, str(Path(tmp) / "fp16.xml"), compress_to_fp16=True)
            del model
            gc.collect()
            model = ov.Core().read_model(str(Path(tmp) / "fp16.xml"))
        widths = {p.any_name: p.partial_shape[-1].get_length() for p in model.inputs if p.partial_shape[-1].is_static}
        rng = np.random.default_rng(0)
        calls = [{"sample": rng.standard_normal((2, 4, size // 8, size // 8), np.float32),
                  "timestep": np.array([999.0 - 333 * i], np.float32),
                  "encoder_hidden_states": rng.standard_normal((2, 77, widths["encoder_hidden_states"]), np.float32),
                  # SDXL's added conditioning: pooled text embeddings and the size / crop ids
                  **({"text_embeds": rng.standard_normal((2, widths["text_embeds"]), np.float32),
                      "time_ids": np.tile(np.array([size, size, 0, 0, size, size], np.float32), (2, 1))}
                     if "text_embeds" in widths else {})} for i in range(samples)]
        compressed: list[str] = []
        if variant == "w8":  # as `openvino.compile` does it: compressed, saved, read back, the FP32 model freed
            model, compressed = compress_matmul_weights(model, UNET_SENSITIVE)
            model = through_disk(model, Path(tmp) / "compressed")
            release_freed()
        model = quantize_calibrated(model, calls, OvOptions(), UNET_SENSITIVE, compressed)
        ov.save_model(model, str(Path(tmp) / "int8.xml"), compress_to_fp16=True)
        size_bytes = (Path(tmp) / "int8.bin").stat().st_size
    peak.stop()
    print(f"{peak.bytes} {time.perf_counter() - began:.1f} {size_bytes}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        quantize(args.onnx.resolve(), args.variant, args.size, args.samples)
        return
    for variant in args.variants:
        run = subprocess.run([sys.executable, __file__, "--onnx", str(args.onnx), "--size", str(args.size),
                              "--samples", str(args.samples), "--variant", variant], capture_output=True, text=True)
        if run.returncode:
            print(f"{variant}: failed ({run.returncode})\n{run.stderr[-2000:]}", flush=True)
            continue
        peak, seconds, size_bytes = run.stdout.split()[-3:]
        print(f"{variant:12s}: peak {int(peak) / 2**30:.2f} GiB, {seconds} s, IR weights {int(size_bytes) / 2**30:.2f} "
              "GiB", flush=True)


if __name__ == "__main__":
    main()
