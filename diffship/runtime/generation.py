"""What one generation returns, whichever loop made it, and the warnings both loops give."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Generation:
    """The images (uint8, NHWC), the final latents, and where the time went."""

    images: np.ndarray
    latents: np.ndarray
    timings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def uint8_images(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as uint8, rounded as diffusers' `numpy_to_pil` does (both loops' and the baseline's)."""
    return (np.asarray(images, dtype=np.float32) * 255).round().astype(np.uint8)


def truncation_warnings(tokenizer: Any, texts: list[str], limit: int | None = None) -> list[str]:
    """What the text encoder will not read of each text: like diffusers, prompts are cut at the tokenizer's length
    (77 for CLIP; `limit`, the pipeline's max_sequence_length, for T5) with a warning, not refused."""
    limit = limit or tokenizer.model_max_length
    notes = []
    for text in dict.fromkeys(texts):
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            removed = tokenizer.decode(ids[limit - 1:-1])
            notes.append(f"a prompt of {len(ids)} tokens was cut to the {limit} the text encoder reads, as diffusers does; "
                         f"cut off: {removed[:60]!r}{'...' if len(removed) > 60 else ''}")
    return notes
