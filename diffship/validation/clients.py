"""Validation's clients step: each client that loads a set draws the first sample there, against diffusers' image.

The client loads the set's folder as its users do (docs/deploy.md), with the runtime options the set records
(OpenVINO: the inference precision in each IR's `rt_info/runtime_options`), from the same seed: optimum's pipelines
take torch's CPU generator, GenAI's `TorchGenerator` draws the same latents. Its image is compared with the
diffusers PyTorch pipeline's image of that sample against the set's thresholds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffship.clients import CLIENTS, missing_reason
from diffship.clients.environments import run_jobs
from diffship.errors import size_text
from diffship.host.memory import PROCESS, budget
from diffship.models.families import family_named
from diffship.runtime.lazy_runners import held_bytes as component_held_bytes
from diffship.store.artifacts import read_json
from diffship.targets.ovms import GRAPH
from diffship.validation.e2e import Sample, compare_images, passes

OVMS = ("not run here: OpenVINO Model Server is not on PyPI. Its image endpoint runs OpenVINO GenAI's pipeline on "
        "this folder with the set's graph.pbtxt (whose plugin_config carries the precision), so GenAI's row stands "
        "for it")


def clients_check(artifacts: Any, sample: Sample, baseline: np.ndarray, min_psnr: float, min_ssim: float,
                  inputs: Any, names: list[str], scheduler: str | None,
                  say: Any) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Rows (one per client that loads this set's target) and the image pairs (diffusers | client) for the report;
    None when no client loads this kind of set."""
    clients = [c for c in CLIENTS if c.name in names and c.target == artifacts.target]
    if not clients:
        return None
    label = f"[validate {artifacts.target}-{artifacts.precision}]"
    rows, pairs = [], []
    with tempfile.TemporaryDirectory(prefix="diffship-clients-") as tmp:
        work = Path(tmp)
        # optimum reads an "@" in a path as a hub revision, and a build's staging folder has one: the clients get
        # the set through a plain name
        (work / "set").symlink_to(artifacts.pipeline.resolve(), target_is_directory=True)
        denoiser = family_named(artifacts.family).denoiser.component
        job = _job(work / "set", sample, inputs, work) | {"denoiser": denoiser}
        index_class = read_json(artifacts.pipeline / "model_index.json").get("_class_name", "")
        too_big = memory_reason(artifacts)  # the same set for every client
        for client in clients:
            row: dict[str, Any] = {"client": client.name, "title": client.title}
            reason = (client.refuses(index_class, sample.task) or client.refuses_folder(artifacts.pipeline, denoiser)
                      or missing_reason(client) or too_big
                      or (f"validation runs the {scheduler} scheduler; clients run the folder's own" if scheduler
                          else None))
            if reason:
                say(f"{label} {client.title}: skipped: {reason}")
                rows.append(row | {"status": "skipped", "reason": reason})
                continue
            say(f"{label} {client.title}: drawing {sample.task} image 1 ({sample.steps} steps)")
            out = work / f"{client.name}.npy"
            [result] = run_jobs(client, [job | {"out": str(out)}], work / client.name)
            row |= {k: result[k] for k in ("version", "pipeline", "computes_in", "properties", "seconds")
                    if k in result}
            if not result["ok"]:
                say(f"{label} {client.title}: FAILED: {result['error'][:300]}")
                rows.append(row | {"status": "failed", "error": result["error"],
                                   **({"traceback": result["traceback"]} if "traceback" in result else {})})
                continue
            image = np.load(out)
            if image.shape != baseline.shape:
                error = f"drew an image of shape {image.shape}, diffusers {baseline.shape}"
                say(f"{label} {client.title}: FAILED: {error}")
                rows.append(row | {"status": "failed", "error": error})
                continue
            metrics = compare_images(baseline, image)
            ok = passes(metrics, min_psnr, min_ssim)
            if differs := client.differs(index_class, sample.height, sample.width):
                row["differs"] = differs
                say(f"{label} {client.title}: {differs}")
            rows.append(row | metrics | {"status": "pass" if ok else "FAIL"})
            say(f"{label} {client.title} {result.get('version', '')}: {'pass' if ok else 'FAIL'}, "
                + ("identical" if metrics["identical"] else f"PSNR {metrics['psnr_db']:.1f} dB")
                + " against diffusers" + (f", computing in {result['computes_in']}" if result.get("computes_in") else ""))
            pairs.append({"baseline": baseline, "target": image, "task": f"{client.name}", "prompt": sample.prompt,
                          "seed": sample.seed, "baseline_name": "diffusers (PyTorch)", **metrics, "passed": ok})
        if "genai" in names and (artifacts.pipeline / GRAPH).is_file():
            rows.append({"client": "ovms", "title": "OpenVINO Model Server", "status": "skipped", "reason": OVMS})
    return {"threshold": {"min_psnr_db": min_psnr, "min_ssim": min_ssim}, "rows": rows,
            "passed": all(r["status"] in ("pass", "skipped") for r in rows)}, pairs


def held_bytes(artifacts: Any) -> int:
    """The weights a client holds when it loads the whole set, as its runtime keeps them (`lazy_runners.held_bytes`)."""
    return sum(component_held_bytes(Path(path)) for path in artifacts.components.values())


def memory_reason(artifacts: Any) -> str | None:
    """Why a client cannot load this set within the build's memory budget (None when it can): clients load every
    component at once, where diffship's own validation holds one at a time."""
    need, limit = PROCESS + held_bytes(artifacts), budget()
    if need <= limit:
        return None
    return (f"it would load the whole pipeline at once, about {size_text(need)} of weights as its runtime holds them, "
            f"over the {size_text(limit)} this build may use (diffship's own validation held one component at a time)")


def _job(folder: Path, sample: Sample, inputs: Any, work: Path) -> dict[str, Any]:
    job = {"folder": str(folder), "task": sample.task, "prompt": sample.prompt, "negative_prompt": sample.negative_prompt,
           "seed": sample.seed, "steps": sample.steps, "guidance": sample.guidance_scale, "height": sample.height,
           "width": sample.width, "precision": "recorded"}
    if sample.task in ("img2img", "inpaint") and inputs is not None:
        inputs.image.save(work / "image.png")
        job |= {"image": str(work / "image.png"), "strength": inputs.strength}
        if sample.task == "inpaint":
            inputs.mask.save(work / "mask.png")
            job["mask"] = str(work / "mask.png")
    return job
