#!/usr/bin/env bash
# Check that optimum-intel loads diffship's OpenVINO layout and draws the same image diffship does.
# optimum-intel 2.2.0 cannot share diffship's environment (it pins transformers < 5.6, huggingface-hub < 1.22,
# diffusers <= 0.39, and needs torchvision), so this builds its own venv. Usage:
#   scripts/check_optimum_intel.sh [MODEL] [VENV]      (default: tiny-sd, /tmp/optimum-intel-venv)
set -euo pipefail
MODEL=${1:-tiny-sd}
VENV=${2:-/tmp/optimum-intel-venv}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
DIFFSHIP=${DIFFSHIP:-$HERE/.venv/bin}

# 1. diffship builds the OpenVINO FP32 set and draws the reference image with its own runtime.
"$DIFFSHIP/diffship" build --model "$MODEL" --targets openvino:fp32 --out "$WORK/out" > "$WORK/build.log"
"$DIFFSHIP/python" - "$WORK" <<'PY'
import sys
from pathlib import Path
import numpy as np
from diffship.runtime.pipeline import DeployedPipeline
work = Path(sys.argv[1])
pipe = DeployedPipeline.load(work / "out", "openvino", "fp32")
h, w = pipe.native_resolution
result = pipe("a lighthouse at dusk", None, h, w, steps=4, guidance_scale=7.5, seed=5)
np.savez(work / "reference.npz", image=result.images[0], prompt="a lighthouse at dusk", seed=5, steps=4, guidance=7.5,
         height=h, width=w)
print(f"diffship drew {result.images[0].shape} with {pipe.artifacts.target} {pipe.artifacts.precision}")
PY

# 2. optimum-intel in its own environment loads the folder and draws the same prompt and seed.
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # torchvision that imports: the torch 2.14.1 / torchvision 0.29.1 pair on this machine's disk.
  "$VENV/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install --quiet "optimum-intel[openvino]==2.2.0" "transformers<5.6" "huggingface-hub<1.22" "diffusers<=0.39"
fi
"$VENV/bin/pip" list 2>/dev/null | grep -iE "^(optimum|optimum-intel|openvino|transformers|diffusers|torch) " || true
"$VENV/bin/python" "$HERE/scripts/check_optimum_intel.py" "$WORK/out/openvino-fp32" "$WORK/reference.npz"
