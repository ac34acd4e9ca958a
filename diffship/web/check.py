"""A web set's page run in headless Chromium during validation: the first end-to-end image from the same initial
latents the Python runtime starts from, compared by PSNR, with the browser's time per step for the report.

fp32 and int8 pages run on WASM (SwiftShader's WebGPU here is a CPU emulation, slower than WASM by a wide margin);
fp16 pages ask for WebGPU, and where the adapter lacks `shader-f16` the page says it cannot run: the check then
records that reason instead of a failure.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffship.validation.e2e import compare_images

CHECK_FOLDER = "_diffship_check"


def app_check(set_dir: Path, precision: str, deployed: Any, sample: Any, python: np.ndarray, min_psnr: float,
              say: Any, timeout: float = 900.0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the page for `sample`, whose image the Python runtime drew (`python`, end to end's, from the same seeded
    latents); its result for the report and, when it drew one, the image pair (Python runtime | browser) for the
    report's grids."""
    from diffship.runtime.pipeline import initial_latents
    from diffship.web.browser import browser_unavailable, run_page

    label = f"[web {precision}]"
    if reason := browser_unavailable():
        say(f"{label} in-browser check not run: {reason}")
        return {"ran": False, "reason": reason, "passed": True}, None
    channels = deployed.vae_config.get("latent_channels", 4)
    latents = initial_latents(sample.seed, 1, channels, sample.height // deployed.vae_scale,
                              sample.width // deployed.vae_scale)
    webgpu = precision == "fp16"
    say(f"{label} in-browser check: the page in headless Chromium ({'WebGPU' if webgpu else 'WASM'}), "
        f"{sample.steps} steps from the same initial latents ...")
    with tempfile.TemporaryDirectory() as tmp:
        buffer = io.BytesIO()
        np.save(buffer, latents.numpy().astype(np.float32))
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
    from PIL import Image

    browser = np.asarray(Image.open(io.BytesIO(page.png)).convert("RGB"))
    metrics = compare_images(python, browser)
    step_ms = page.timings.get("step_ms", [])
    result |= {"step_ms": step_ms, "mean_step_ms": float(np.mean(step_ms[1:] or step_ms)) if step_ms else None,
               "total_ms": page.timings.get("total_ms"), "execution_provider": page.timings.get("backend"),
               **metrics, "min_psnr_db": min_psnr,
               "passed": metrics["identical"] or (metrics["psnr_db"] or 0) >= min_psnr}
    say(f"{label} in-browser check: {'pass' if result['passed'] else 'FAIL'}, "
        + ("identical" if metrics["identical"] else f"PSNR {metrics['psnr_db']:.1f} dB")
        + f" against the Python runtime, {result['mean_step_ms']:.0f} ms per step on {result['execution_provider']}")
    pair = {"baseline": python, "target": browser, "task": "browser", "prompt": sample.prompt, "seed": sample.seed,
            "baseline_name": "diffship runtime (ONNX Runtime CPU)", **metrics, "passed": result["passed"]}
    return result, pair
