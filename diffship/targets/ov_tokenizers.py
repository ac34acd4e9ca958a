"""OpenVINO tokenizer models beside an OpenVINO set's tokenizers, which OpenVINO GenAI's image pipelines load.

GenAI tokenizes in OpenVINO itself: it reads `tokenizer/openvino_tokenizer.xml` (and the detokenizer when present)
and has no Python tokenizer to fall back on. openvino-tokenizers converts the Hugging Face tokenizer; the result
depends only on the tokenizer's files and the library's version, so it is made once per tokenizer and cached.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffship.store import cache
from diffship.store.artifacts import file_entries

FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin")


def write_tokenizer_models(set_dir: Path, tokenizers: tuple[str, ...], say: Callable[[str], None]) -> None:
    """`openvino_tokenizer.xml` / `openvino_detokenizer.xml` (+ .bin) in each of the set's tokenizer folders."""
    import openvino_tokenizers  # optional: openvino

    for name in tokenizers:
        folder = set_dir / name
        files = [e["sha256"] for e in file_entries(folder, folder) if e["path"] not in FILES]
        entry_key = cache.key(stage="ov-tokenizer", files=files, version=openvino_tokenizers.__version__)
        done = cache.cached_step("ov-tokenizer", entry_key, f"{name} OpenVINO tokenizer",
                                 lambda staging, info, folder=folder: _convert(folder, staging, info), say=say)
        for file in FILES:
            shutil.copy2(done.path / file, folder / file)


def _convert(tokenizer: Path, staging: Path, info: dict[str, Any]) -> None:
    import openvino as ov  # optional: openvino
    from openvino_tokenizers import convert_tokenizer  # optional: openvino
    from transformers import AutoTokenizer  # start-up time: transformers

    encoder, decoder = convert_tokenizer(AutoTokenizer.from_pretrained(tokenizer), with_detokenizer=True)
    ov.save_model(encoder, str(staging / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(staging / "openvino_detokenizer.xml"))
    info["artifact"] = "openvino_tokenizer.xml"
