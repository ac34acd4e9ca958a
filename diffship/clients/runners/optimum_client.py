"""optimum's pipelines draw one image per job from a diffship folder, as their users load it.

    python optimum_client.py intel|onnx JOBS.json RESULTS.json
`intel`: optimum-intel's OV pipelines on an OpenVINO folder; `onnx`: optimum-onnx's ORT pipelines on an ONNX one.
The generator is torch's CPU generator, as diffusers' own, so the initial latents are diffusers' for the seed.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

LIBRARY = sys.argv.pop(1)
sys.path.insert(0, str(Path(__file__).parent))
from common import main, recorded_properties  # noqa: E402

if LIBRARY == "intel":
    from optimum.intel import OVPipelineForImage2Image, OVPipelineForInpainting, OVPipelineForText2Image

    PIPELINES = {"text2img": OVPipelineForText2Image, "img2img": OVPipelineForImage2Image,
                 "inpaint": OVPipelineForInpainting}
    PACKAGE = "optimum-intel"
else:
    from optimum.onnxruntime import ORTPipelineForImage2Image, ORTPipelineForInpainting, ORTPipelineForText2Image

    PIPELINES = {"text2img": ORTPipelineForText2Image, "img2img": ORTPipelineForImage2Image,
                 "inpaint": ORTPipelineForInpainting}
    PACKAGE = "optimum-onnx"


def run(job: dict[str, Any]) -> dict[str, Any]:
    folder = Path(job["folder"])
    load: dict[str, Any] = {}
    properties: dict[str, str] = {}
    if LIBRARY == "intel" and job["precision"] == "recorded":
        properties = recorded_properties(folder, job["denoiser"])
        load["ov_config"] = properties
    pipe = PIPELINES[job["task"]].from_pretrained(folder, **load)
    kwargs: dict[str, Any] = {"height": job["height"], "width": job["width"], "num_inference_steps": job["steps"],
                              "guidance_scale": job["guidance"], "output_type": "np",
                              "generator": torch.Generator("cpu").manual_seed(job["seed"])}
    if job.get("negative_prompt") is not None:
        kwargs["negative_prompt"] = job["negative_prompt"]
    if job["task"] != "text2img":
        kwargs |= {"image": Image.open(job["image"]).convert("RGB"), "strength": job["strength"]}
    if job["task"] == "inpaint":
        kwargs["mask_image"] = Image.open(job["mask"]).convert("RGB")
    image = pipe(job["prompt"], **kwargs).images[0]
    found = {"image": (image * 255).round().astype(np.uint8), "pipeline": type(pipe).__name__,
             "properties": properties, "version": version(PACKAGE)}
    if LIBRARY == "intel":
        denoiser = getattr(pipe, job["denoiser"])
        found["computes_in"] = denoiser.request.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return found


if __name__ == "__main__":
    main(run)
