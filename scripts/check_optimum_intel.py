"""Load a diffship OpenVINO folder with optimum-intel's OVDiffusionPipeline and compare its image with diffship's.

Runs in its own environment (scripts/check_optimum_intel.sh builds it): optimum-intel 2.2.0 pins
transformers < 5.6, huggingface-hub < 1.22 and diffusers <= 0.39, which cannot share diffship's.

    python scripts/check_optimum_intel.py OPENVINO_FOLDER REFERENCE.npz
REFERENCE.npz holds `image` (uint8 HxWx3), `prompt`, `seed`, `steps`, `guidance`, written by diffship's side.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from optimum.intel import OVDiffusionPipeline

folder, reference = Path(sys.argv[1]), np.load(sys.argv[2])
pipe = OVDiffusionPipeline.from_pretrained(folder, ov_config={"INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": ""})
print(f"loaded {type(pipe).__name__} from {folder}")
image = pipe(str(reference["prompt"]), num_inference_steps=int(reference["steps"]),
             guidance_scale=float(reference["guidance"]), height=int(reference["height"]), width=int(reference["width"]),
             generator=torch.Generator().manual_seed(int(reference["seed"])), output_type="np").images[0]
image = (image * 255).round().astype(np.uint8)
diff = np.abs(image.astype(int) - reference["image"].astype(int))
print(json.dumps({"pipeline": type(pipe).__name__, "shape": list(image.shape), "max_abs_diff": int(diff.max()),
                  "mean_abs_diff": float(diff.mean())}))
sys.exit(0 if diff.max() <= 2 else 1)
