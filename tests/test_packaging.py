"""What `pip install diffship` gets without the Makefile: the data files the package reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_clip_vocabulary_its_license_and_the_standard_configs(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("diffship-*.whl"))).namelist())
    assert {"diffship/models/clip_vocab/bpe_simple_vocab_16e6.txt.gz", "diffship/models/clip_vocab/LICENSE",
            "diffship/models/standard_configs/sdxl-refiner/unet/config.json",
            "diffship/models/standard_configs/sd1/model_index.json",
            "diffship/models/digits_sd/unet.safetensors"} <= names
    assert not any("open_clip" in n for n in names)


def test_tokenizers_need_no_open_clip_package():
    """The tokenizer is built from the shipped file in a process where importing open_clip is impossible."""
    code = ("import sys; sys.modules['open_clip'] = None; "
            "from diffship.models.tokenizer import build_clip_tokenizer; "
            "print(build_clip_tokenizer()('a photo').input_ids)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[49406, 320, 1125, 49407]"
