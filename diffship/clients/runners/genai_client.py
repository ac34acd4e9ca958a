"""OpenVINO GenAI draws one image per job from a diffship OpenVINO folder, as its users load it.

    python genai_client.py JOBS.json RESULTS.json
Runs in an environment with openvino-genai, openvino-tokenizers, numpy and pillow (no torch): `TorchGenerator`
gives torch's CPU generator's latents, so the image starts from diffusers' initial latents for the same seed.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as og
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import main, recorded_properties

PIPELINES = {"text2img": og.Text2ImagePipeline, "img2img": og.Image2ImagePipeline, "inpaint": og.InpaintingPipeline}


def picture(path: str) -> ov.Tensor:
    return ov.Tensor(np.array(Image.open(path).convert("RGB"))[None])


def run(job: dict[str, Any]) -> dict[str, Any]:
    folder = Path(job["folder"])
    properties = recorded_properties(folder, job["denoiser"]) if job["precision"] == "recorded" else {}
    pipe = PIPELINES[job["task"]](str(folder), "CPU", **properties)
    kwargs: dict[str, Any] = {"width": job["width"], "height": job["height"], "num_inference_steps": job["steps"],
                              "guidance_scale": job["guidance"], "generator": og.TorchGenerator(job["seed"]),
                              "num_images_per_prompt": 1}
    if job.get("negative_prompt") is not None:
        kwargs["negative_prompt"] = job["negative_prompt"]
    images = []
    if job["task"] != "text2img":
        kwargs["strength"] = job["strength"]
        images = [picture(job["image"])] + ([picture(job["mask"])] if job["task"] == "inpaint" else [])
    result = pipe.generate(job["prompt"], *images, **kwargs)
    computes_in = properties.get("INFERENCE_PRECISION_HINT") or ov.Core().get_property(
        "CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    metrics = pipe.get_performance_metrics()  # GenAI's own timing of this generate() call, in ms
    return {"image": np.asarray(result.data[0]), "pipeline": type(pipe).__name__, "computes_in": computes_in,
            "properties": properties, "version": version("openvino-genai"),
            "step_ms": [float(d) / 1000 for d in metrics.raw_metrics.iteration_durations],
            "generate_ms": float(metrics.get_generate_duration())}


if __name__ == "__main__":
    main(run)
