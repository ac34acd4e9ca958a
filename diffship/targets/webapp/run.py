"""A web set's page run in headless Chromium: the image it draws for one sample from given initial latents, and
the browser's time per step. Validation compares that image with the Python runtime's (validation/app.py).

fp32 and int8 pages run on WASM (SwiftShader's WebGPU here is a CPU emulation, slower than WASM by a wide margin);
fp16 pages ask for WebGPU, and where the adapter lacks `shader-f16` the page says it cannot run: the run then
records that reason instead of a failure.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffship.targets.webapp.browser import browser_unavailable, run_page

CHECK_FOLDER = "_diffship_check"


def run_app(set_dir: Path, precision: str, sample: Any, latents: np.ndarray, say: Callable[[str], None],
            timeout: float = 900.0) -> tuple[dict[str, Any], np.ndarray | None]:
    """Run the page for `sample` from `latents`; what happened (`ran`, backend, timings, or why it did not run and
    whether that is a failure: `passed` False) and the image it drew, if it drew one."""
    label = f"[web {precision}]"
    if reason := browser_unavailable():
        say(f"{label} in-browser check not run: {reason}")
        return {"ran": False, "reason": reason, "passed": True}, None
    webgpu = precision == "fp16"
    say(f"{label} in-browser check: the page in headless Chromium ({'WebGPU' if webgpu else 'WASM'}), "
        f"{sample.steps} steps from the same initial latents ...")
    with tempfile.TemporaryDirectory() as tmp:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(latents, dtype=np.float32))
        (Path(tmp) / "latents.npy").write_bytes(buffer.getvalue())
        params = {"prompt": sample.prompt, "negative_prompt": sample.negative_prompt or "", "seed": sample.seed,
                  "steps": sample.steps, "guidance": sample.guidance_scale, "ep": "webgpu" if webgpu else "wasm",
                  "latents": f"{CHECK_FOLDER}/latents.npy"}
        page = run_page(set_dir, params, webgpu=webgpu, timeout=timeout, extra={CHECK_FOLDER: Path(tmp)})
    result: dict[str, Any] = {"ran": page.state == "done", "backend": page.backend, "status": page.status,
                              "browser": page.browser}
    if page.state != "done":
        cannot = page.backend.startswith("Cannot run here")
        result |= {"reason": page.backend if cannot else page.status, "passed": cannot,
                   "console": page.console[-20:]}
        say(f"{label} in-browser check {'not run' if cannot else 'FAILED'}: {result['reason']}")
        return result, None
    from PIL import Image  # start-up time: PIL

    step_ms = page.timings.get("step_ms", [])
    result |= {"step_ms": step_ms, "mean_step_ms": float(np.mean(step_ms[1:] or step_ms)) if step_ms else None,
               "total_ms": page.timings.get("total_ms"), "execution_provider": page.timings.get("backend")}
    return result, np.asarray(Image.open(io.BytesIO(page.png)).convert("RGB"))
