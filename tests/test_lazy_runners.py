"""A deployed set whose components do not fit in memory together draws its image with one large component loaded at
a time (issue 45: SD3.5-medium's FP32 set on 24 GiB), forced here on tiny-flux with a budget of one byte."""

from __future__ import annotations

import numpy as np

from diffship.runtime.lazy_runners import LazyRunner
from diffship.runtime.pipeline import DeployedPipeline
from diffship.store.manifest import open_artifacts


def test_a_set_drawn_one_component_at_a_time_draws_the_same_image(exported):
    artifacts = open_artifacts(exported("tiny-flux"))
    whole = DeployedPipeline.from_artifacts(artifacts)
    assert not any(isinstance(r, LazyRunner) for r in whole.runners.values())
    lazy = DeployedPipeline.from_artifacts(artifacts, held_bytes=1)
    assert all(isinstance(r, LazyRunner) for r in lazy.runners.values()) and not lazy.load_seconds
    held: list[int] = []
    pool = next(iter(lazy.runners.values()))._pool

    def counted(run):
        def run_and_count(inputs):
            outputs = run(inputs)
            held.append(len(pool.loaded))  # how many are loaded as each has run
            return outputs
        return run_and_count

    for runner in lazy.runners.values():
        runner.run = counted(runner.run)
    images = [p("a red bicycle", None, 64, 64, 3, 3.5, 0).images[0] for p in (whole, lazy)]
    assert np.array_equal(images[0], images[1])
    assert held and set(held) == {1}  # the others released before each loads
    assert set(lazy.load_seconds) >= {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"}
    other = lazy("a red bicycle", None, 64, 64, 3, 3.5, 1).images[0]
    assert not np.array_equal(images[0], other)
