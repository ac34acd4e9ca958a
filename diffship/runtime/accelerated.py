"""One denoising step's call to the denoiser under a plan of accelerations (`diffship/accelerations.py`): which graph
runs (the denoiser, deep-feature caching's whole graph or its shallow one) and on which guidance halves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from diffship.accelerations import Accelerations, Step
from diffship.errors import DiffshipError
from diffship.models.decoder_folder import COMPONENT
from diffship.models.families import Denoiser
from diffship.store.artifacts import read_json
from diffship.store.manifest import ArtifactSet
from diffship.targets.runner import Runner


class DenoiserCalls:
    """The denoiser's output for each step of one generation, keeping deep-feature caching's features between steps.

    `conditioning` holds both guidance halves (the negative first) when `guided`; a step planned without guidance
    feeds the text half alone, as a batch of the images."""

    def __init__(self, runner: Callable[[str], Runner], denoiser: str, conditioning: dict[str, np.ndarray] | None,
                 guided: bool, accelerations: Accelerations | None, graphs: dict[str, str],
                 controlled: Any = None):
        self.runner, self.denoiser, self.controlled = runner, denoiser, controlled
        self.conditioning = conditioning or {}  # none where the loop feeds whole calls (diffusers': `run`)
        self.text_half = {k: v[len(v) // 2:] for k, v in self.conditioning.items()} if guided else self.conditioning
        self.graphs = graphs  # "caching" / "shallow" -> component names
        self.deep_cache = accelerations.deep_cache if accelerations is not None else None
        self.features: np.ndarray | None = None
        if controlled is not None and accelerations is not None and accelerations.active:
            raise DiffshipError("Accelerations do not combine with control images yet: generate with "
                                "--accelerate none, or without --control.")

    def __call__(self, step: Step, i: int, total: int, sample: np.ndarray, timestep: float) -> np.ndarray:
        feed = {"sample": sample, "timestep": np.full(sample.shape[0], timestep, np.float32),
                **(self.conditioning if step.guided else self.text_half)}
        if self.controlled is not None:
            return np.asarray(self.controlled.run(feed, i, total))
        return self.run(step.graph, feed)

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        """`graph`'s prediction for `feed` (the denoiser's inputs), caching or reusing the features as it goes."""
        if graph == "denoiser":
            return self.runner(self.denoiser).run(feed)["out_sample"]
        if graph == "caching":
            out = self.runner(self.graphs["caching"]).run(feed)
            self.features = out["cached_features"]
            return out["out_sample"]
        if self.features is None:
            raise DiffshipError("A shallow step ran before any step cached the deep features.")
        # guidance truncated since the caching step: the text half's features (the batch's last rows)
        features = self.features[-len(next(iter(feed.values()))):]
        return self.runner(self.graphs["shallow"]).run({**feed, "cached_features": features})["out_sample"]


def cache_graphs(artifacts: ArtifactSet, denoiser: Denoiser, accelerations: Accelerations | None) -> dict[str, str]:
    """Deep-feature caching's two graphs for `accelerations` (none without it), checked to be in the build."""
    cache = accelerations.deep_cache if accelerations is not None else None
    if cache is None:
        return {}
    graphs = {"caching": denoiser.caching(cache.depth), "shallow": denoiser.shallow(cache.depth)}
    if missing := [g for g in graphs.values() if g not in artifacts.components]:
        built = sorted(c for c in artifacts.components if c.startswith("shallow_"))
        raise DiffshipError(
            f"{artifacts.root} has no deep-cache graphs at depth {cache.depth} ({', '.join(missing)}): "
            + (f"it was built with {', '.join(built)}." if built else
               "build with [accelerations] deep_cache = { depth = N } in the recipe."))
    return graphs


def decoder_for(artifacts: ArtifactSet, accelerations: Accelerations | None) -> tuple[str, dict[str, Any]] | None:
    """The smaller decoder's component and its VAE config (how its latents are scaled) where `accelerations` name
    one, checked to be in the build; None otherwise."""
    if accelerations is None or accelerations.vae_decoder is None:
        return None
    if COMPONENT not in artifacts.components:
        raise DiffshipError(f"{artifacts.root} has no {COMPONENT} artifact: build with [accelerations] vae_decoder = "
                            "PATH in the recipe.")
    in_pipeline = artifacts.pipeline / COMPONENT / "config.json"
    return COMPONENT, read_json(in_pipeline if in_pipeline.is_file() else artifacts.components[COMPONENT].parent
                                / "config.json")
