"""What every runner shares: the job file, the recorded precision, one result per job. Standard library + numpy only:
this file is imported by runners in the clients' environments, beside them, not through diffship."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def recorded_properties(folder: Path, denoiser: str) -> dict[str, str]:
    """The runtime options an OpenVINO set records in its denoiser's IR (`rt_info/runtime_options`): what it was
    validated with, and what a client passes when it compiles the folder (docs/deploy.md has the same lines)."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / denoiser / "openvino_model.xml"))
    if not model.has_rt_info(["runtime_options"]):
        return {}
    keys = model.get_rt_info(["runtime_options"]).astype(dict)
    return {key: model.get_rt_info(["runtime_options", key]).astype(str) for key in keys}


def main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Run each job of `argv[1]` with `run` (which returns the image as uint8 HxWx3 under "image" and anything to
    report), saving images beside the results in `argv[2]`; a job that raises is reported, not fatal."""
    jobs = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    results = []
    for job in jobs:
        start = time.perf_counter()
        try:
            found = run(job)
            np.save(job["out"], np.ascontiguousarray(found.pop("image"), dtype=np.uint8))
            results.append({"ok": True, "seconds": time.perf_counter() - start, **found})
        except Exception as exc:  # the client's own failure: its message goes into the report
            results.append({"ok": False, "seconds": time.perf_counter() - start,
                            "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                            "traceback": traceback.format_exc()[-4000:]})
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1), encoding="utf-8")
