"""The built-in diffusion transformers' T5 tokenizer, made offline: T5's special tokens at T5's ids, `</s>` appended,
`<pad>` padding, every ASCII prompt without `<unk>`, the same tokenizer on every build, and a saved folder that
transformers loads back as it was."""

from __future__ import annotations

import string
from pathlib import Path

from transformers import AutoTokenizer, T5TokenizerFast

from diffship.models.t5_tokenizer import build_t5_tokenizer, save_t5_tokenizer


def test_the_t5_tokenizer_has_t5s_special_tokens_and_appends_the_end_token():
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red bicycle").input_ids
    assert ids[-1] == 1 and 0 not in ids and 2 not in ids
    assert len(ids) == 4 and len(tokenizer("hippo").input_ids) == 6  # known words are one piece, others spelled
    padded = tokenizer("a red bicycle", padding="max_length", max_length=16, truncation=True).input_ids
    assert padded[:len(ids)] == ids and padded[len(ids):] == [0] * (16 - len(ids))
    assert tokenizer.model_max_length == 256


def test_any_ascii_prompt_tokenizes_without_unknown_pieces_and_decodes_back():
    tokenizer = build_t5_tokenizer()
    prompt = "Zebra #42 crossing a (very) quiet road, at 6:30pm! " + string.punctuation
    ids = tokenizer(prompt).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt.strip()
    assert tokenizer("an unseen word: hippopotamus").input_ids != tokenizer("a red bicycle").input_ids


def test_two_builds_give_the_same_tokenizer_and_the_saved_folder_loads_back(tmp_path: Path):
    first, second = build_t5_tokenizer(), build_t5_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()  # the built-ins' hashes stay put
    save_t5_tokenizer(first, tmp_path / "tokenizer_3")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer_3")
    assert isinstance(loaded, T5TokenizerFast)
    prompt = "a watercolor painting of a lighthouse at dusk"
    assert loaded(prompt).input_ids == first(prompt).input_ids
