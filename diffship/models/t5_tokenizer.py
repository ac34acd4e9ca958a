"""A small T5-style tokenizer made offline, for the built-in diffusion-transformer models (SD3, Flux).

Their third (SD3) or second (Flux) text encoder is T5, whose tokenizer is a SentencePiece Unigram model with `</s>`
appended and `<pad>` (id 0) padding. With no hub, the built-ins get one of the same kind: a `tokenizers` Unigram
model over a fixed vocabulary (the words of the project's prompts, then every printable ASCII character alone and
after a word boundary, so any ASCII prompt tokenizes without `<unk>`), wrapped as transformers' `T5TokenizerFast`.
Its pieces and scores are written here, not trained: `UnigramTrainer` gave different scores on two runs in one
process, and the built-ins' weights are hashed into cache keys. A real model's folder brings its own
`tokenizer.json` / `spiece.model`, which the pipeline reads as it is.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import T5TokenizerFast

# T5's special tokens, at T5's ids
SPECIALS = ("<pad>", "</s>", "<unk>")
BOUNDARY = "\u2581"  # SentencePiece's word-boundary mark, "▁"
# Prompts of the kind the built-ins are validated with: their words become whole pieces.
CORPUS = (*(f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine")),
          "a red bicycle leaning on a brick wall", "a photograph of an astronaut riding a horse",
          "a watercolor painting of a lighthouse at dusk", "a cat sleeping on a sofa", "a mountain lake at sunrise",
          "the number seven", "a bowl of fruit on a wooden table", "a city street at night in the rain")


def pieces() -> list[tuple[str, float]]:
    """The vocabulary with its log-probabilities: whole words score above the characters that spell them, so a
    known word is one piece and anything else falls back to characters."""
    words = sorted({BOUNDARY + word for prompt in CORPUS for word in prompt.split()})
    characters = string.ascii_letters + string.digits + string.punctuation
    return ([(token, 0.0) for token in SPECIALS] + [(BOUNDARY, -3.0)] + [(w, -2.0) for w in words]
            + [(BOUNDARY + c, -4.0) for c in characters if BOUNDARY + c not in words] + [(c, -5.0) for c in characters])


def build_t5_tokenizer(max_length: int = 256) -> T5TokenizerFast:
    """The T5-style Unigram tokenizer, `max_length` tokens (SD3's default sequence)."""
    tokenizer = Tokenizer(models.Unigram(pieces(), unk_id=SPECIALS.index("<unk>"), byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                  special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def save_t5_tokenizer(tokenizer: T5TokenizerFast, folder: Path) -> None:
    """Save in transformers' format (tokenizer.json and its config), what diffusers' pipelines load, readable by
    transformers 4 as well (the clients' environments): transformers 5 writes `extra_special_tokens` as a list,
    which 4 reads as a mapping, and names the class `T5Tokenizer`, which in 4 is the SentencePiece one needing a
    spiece.model this folder has no need for."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if not config.get("extra_special_tokens"):
        config.pop("extra_special_tokens", None)
    config["tokenizer_class"] = "T5TokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
