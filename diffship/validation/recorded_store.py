"""The recorded baseline on disk: what staged validation compares every set with, kept in the cache so a build that
resumes (or a farm's validation task) does not run the PyTorch pipeline again for it (about 40 min on SDXL).

Only outputs are kept: the UNet's inputs and outputs over the real denoising steps, each parity case's outputs, each
sample's image and initial latents, the prompt-accuracy baseline. The pipeline's timings are not: a latency ratio
must compare runs of one process on one machine, so they are measured again in every run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from diffship.runtime.pipeline import Generation
from diffship.validation.e2e import Sample
from diffship.validation.parity import Case

INDEX = "record.json"
ARRAYS = "arrays.npz"


def save_record(folder: Path, trajectory: dict[str, Any], quality: dict[str, Any] | None,
                outputs: dict[tuple[str, Case, int], dict[str, np.ndarray]],
                images: dict[Sample, tuple[Any, Generation]]) -> None:
    """Write the recorded baseline into `folder` (a cache entry being made): one index and one array file."""
    arrays: dict[str, np.ndarray] = {}

    def put(value: Any) -> str:
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(value)
        return name

    index: dict[str, Any] = {"quality": quality, "outputs": [], "images": [], "trajectory": {
        "prompt": trajectory["prompt"], "seed": trajectory["seed"], "timesteps": list(trajectory["timesteps"]),
        "inputs": [{k: put(v) for k, v in call.items()} for call in trajectory["inputs"]],
        "outputs": [put(o) for o in trajectory["outputs"]]}}
    for (spec, case, seed), named in outputs.items():
        index["outputs"].append({"spec": spec, "case": asdict(case), "seed": seed,
                                 "arrays": {k: put(v) for k, v in named.items()}})
    for sample, (latents, generation) in images.items():
        index["images"].append({"sample": asdict(sample), "latents": None if latents is None else put(latents),
                                "images": put(generation.images), "final_latents": put(generation.latents)})
    np.savez(folder / ARRAYS, **arrays)
    (folder / INDEX).write_text(json.dumps(index, default=lambda o: o.item()), encoding="utf-8")  # numpy scalars


def load_record(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None,
                                       dict[tuple[str, Case, int], dict[str, np.ndarray]],
                                       dict[Sample, tuple[Any, Generation]]]:
    """The trajectory, quality baseline, parity outputs and sample images `save_record` wrote."""
    index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    with np.load(folder / ARRAYS) as stored:
        arrays = {name: stored[name] for name in stored.files}
    trajectory = index["trajectory"]
    trajectory = {**trajectory, "inputs": [{k: arrays[v] for k, v in call.items()} for call in trajectory["inputs"]],
                  "outputs": [arrays[o] for o in trajectory["outputs"]]}
    outputs = {(o["spec"], Case(**o["case"]), o["seed"]): {k: arrays[v] for k, v in o["arrays"].items()}
               for o in index["outputs"]}
    images = {Sample(**i["sample"]): (None if i["latents"] is None else arrays[i["latents"]],
                                      Generation(arrays[i["images"]], arrays[i["final_latents"]]))
              for i in index["images"]}
    return trajectory, index["quality"], outputs, images
