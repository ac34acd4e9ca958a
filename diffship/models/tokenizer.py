"""A real CLIP BPE tokenizer built offline from CLIP's vocabulary file, shipped in the package (`clip_vocab/`).

Stable Diffusion's tokenizers (SD 1.x, SD 2.x, both of SDXL's) are CLIP's byte-level BPE over
`bpe_simple_vocab_16e6.txt.gz`. With no hub, we rebuild vocab and merges from that file the way
CLIP's reference tokenizer does and hand them to transformers' `CLIPTokenizer`; the token ids
are CLIP's own (e.g. "a photo" -> 320, 1125). The file (1.3 MB, MIT, see clip_vocab/LICENSE) ships with diffship
rather than through open-clip-torch, whose dependencies pull torchvision and a CUDA torch: `pip install diffship`
alone then gives working tokenizers.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from diffship.errors import DiffshipError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file; with 2 x 256 byte tokens and the
# two special tokens that gives the 49408-entry vocabulary every SD text encoder embeds.
NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77


def _vocab_path() -> Path:
    path = Path(__file__).parent / "clip_vocab" / VOCAB_FILE
    if not path.is_file():
        raise DiffshipError(f"diffship's CLIP vocabulary {path} is missing: reinstall diffship.")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and ordered BPE merges."""
    lines = gzip.decompress(_vocab_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP tokenizer as SD uses it: 77 tokens; SD 2.x and SDXL's second tokenizer pad with "!"."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)


def save_clip_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Save in transformers' format plus the classic vocab.json / merges.txt older loaders read."""
    tokenizer.save_pretrained(folder)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
