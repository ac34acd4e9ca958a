"""Peak memory of ONNX Runtime's INT8 calibration phase on a UNet export, with onnxruntime's calibrator holding its
model proto during the statistics session (as before) and with it released first (what diffship does now).

Each variant runs in its own child process (a fresh peak), sampled with psutil every 0.2 s; both in this run.

    python benchmarks/ort_calibration_memory.py --onnx out/sd15/onnx/unet/model.onnx [--size 512]
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


def calibrate(onnx_path: Path, release: bool, size: int) -> None:
    """One calibration phase as `quantize_unet` runs it (two batch-1 samples); prints its peak RSS."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from diffship.targets.onnxruntime_quantize import QUANTIZED_OPS, _lean_session

    peak = PeakRss().start()
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    hidden = next(i for i in graph.input if i.name == "encoder_hidden_states").type.tensor_type.shape.dim[2].dim_value
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((1, 4, size // 8, size // 8), np.float32),
              "timestep": np.array([500.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((1, 77, hidden or 768), np.float32)}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter([inputs, inputs])

        def get_next(self) -> dict | None:
            return next(self.left, None)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
        calibrator = create_calibrator(onnx_path, list(QUANTIZED_OPS), augmented_model_path=str(Path(tmp) / "m.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                                       providers=["CPUExecutionProvider"])
        calibrator.infer_session = None
        if release:
            calibrator.model = None
        gc.collect()
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, _lean_session(),
                                                        providers=["CPUExecutionProvider"])
        calibrator.collect_data(Reader())
        ranges = len(calibrator.compute_data().data)
    peak.stop()
    print(f"{peak.bytes} {ranges} {time.perf_counter() - began:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--variant", choices=["held", "released"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        calibrate(args.onnx.resolve(), args.variant == "released", args.size)
        return
    peaks = {}
    for variant in ("held", "released"):
        run = subprocess.run([sys.executable, __file__, "--onnx", str(args.onnx), "--size", str(args.size),
                              "--variant", variant], capture_output=True, text=True, check=True)
        peak, ranges, seconds = run.stdout.split()[-3:]
        peaks[variant] = int(peak)
        print(f"model proto {variant:8s}: peak {int(peak) / 2**30:.2f} GiB, {ranges} ranges, {seconds} s", flush=True)
    print(f"released / held: {peaks['released'] / peaks['held']:.2f}")


if __name__ == "__main__":
    main()
