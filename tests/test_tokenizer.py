from pathlib import Path

from transformers import CLIPTokenizer

from diffship.models.tokenizer import build_clip_tokenizer, save_clip_tokenizer

# Token ids of openai/clip-vit-large-patch14's tokenizer for this prompt.
ASTRONAUT = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_tokenizer_gives_clips_own_ids_for_a_prompt():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of an astronaut riding a horse").input_ids == ASTRONAUT


def test_sd1_pads_with_end_of_text_and_sd2_pads_with_exclamation_mark():
    sd1 = build_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    sd2 = build_clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=77).input_ids
    assert len(sd1) == len(sd2) == 77
    assert sd1[-1] == 49407 and sd2[-1] == 0  # "!" is byte token 0


def test_saved_tokenizer_reloads_from_tokenizer_json_and_from_vocab_and_merges(tmp_path: Path):
    save_clip_tokenizer(build_clip_tokenizer(), tmp_path)
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert CLIPTokenizer.from_pretrained(tmp_path)("a photo of an astronaut riding a horse").input_ids == ASTRONAUT
    import json

    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:] if line]
    rebuilt = CLIPTokenizer(vocab=vocab, merges=merges)
    assert rebuilt("a photo of an astronaut riding a horse").input_ids == ASTRONAUT
