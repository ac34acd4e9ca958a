"""Each combination of the recipe's accelerations on one artifact set: its images against the FP32 baseline's (and its
prompt accuracy where the model has a quality check), judged by the recipe's `[budget]`, and the whole image's time
against the baseline's, interleaved in one run.

An accelerated image is approximate by design (a shallow step reuses earlier features, a truncated step drops the
negative half), so it has no parity gate: the budget says how far it may drift. The set's own loop ("none") is the
exact row of the same table, judged by its precision's gates as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffship.accelerations import Accelerations
from diffship.runtime.pipeline import DeployedPipeline
from diffship.validation import latency, quality
from diffship.validation.e2e import Sample, compare_images, passes, sample_arguments

Say = Callable[[str], None]


def generate(deployed: DeployedPipeline, s: Sample, plan: Any, accelerations: Accelerations) -> Any:
    """One sample through the set under `accelerations`, from the baseline's initial latents."""
    latents, kwargs = sample_arguments(s, deployed, plan.inputs)
    return deployed(s.prompt, s.negative_prompt, s.height, s.width, s.steps, s.guidance_scale, s.seed,
                    latents=latents, accelerations=accelerations, **kwargs)


def measure(deployed: DeployedPipeline, samples: list[Sample], baseline_images: list[Any], reference: Any, plan: Any,
            quality_baseline: dict[str, Any] | None, say: Say) -> dict[str, Any]:
    """Every combination `plan.accelerations` asks for on this set: per image PSNR / SSIM against the baseline's,
    prompt accuracy where measured, whole-image time (p50 and fastest call) and speedups. The unaccelerated row is
    judged by the set's own gates once they are known (`judge_exact`)."""
    budget = plan.budget
    combos = plan.accelerations.combinations()
    rows: list[dict[str, Any]] = []
    for combo in combos:
        deployed.load_accelerations(combo)
        row: dict[str, Any] = {"accelerations": combo.label, "settings": combo.model_dump(mode="json", exclude_none=True),
                               "approximate": combo.active}
        if combo.active:
            images = []
            for s, expected in zip(samples, baseline_images, strict=True):
                metrics = compare_images(expected, generate(deployed, s, plan, combo).images[0])
                images.append({"task": s.task, "prompt": s.prompt, "seed": s.seed, **metrics})
            psnrs = [m["psnr_db"] for m in images if m["psnr_db"] is not None]
            row |= {"images": images, "min_psnr_db": min(psnrs) if psnrs else None,
                    "min_ssim": min(m["ssim"] for m in images)}
            if quality_baseline is not None:
                scores = quality.measure(lambda prompt, seed, a=combo: _quality_image(deployed, prompt, seed, plan, a),
                                         plan.validation.quality.seeds)
                drop = 100.0 * (quality_baseline["prompt_accuracy"] - scores["prompt_accuracy"])
                row["quality"] = {"prompt_accuracy": scores["prompt_accuracy"], "drop_points": drop}
            row["within_budget"] = within(row, budget)
            say(f"      {combo.label}: min PSNR {_db(row['min_psnr_db'])}, SSIM {row['min_ssim']:.4f}"
                + (f", prompt accuracy {row['quality']['prompt_accuracy']:.3f}" if "quality" in row else "")
                + f" -> {'within' if row['within_budget'] else 'OUTSIDE'} the budget")
        rows.append(row)
    timed = plan.validation.latency.enabled and (not reference.staged or reference.pipeline_timings)
    if not timed:  # latency off: the rows' quality is measured, nothing is timed (and nothing recommended)
        say("      not timed: latency is off in this recipe, so no row can be recommended")
        return {"budget": budget.model_dump(), "baseline_image_time": None, "bf16_image_time": None,
                "timing": None, "rows": [row | {"image_time": None, "speedup": None, "speedup_fastest": None}
                                         for row in rows]}
    timing = image_times(deployed, samples[0], reference, plan, combos, say)
    for row in rows:
        row["image_time"] = timing["sets"][row["accelerations"]]
        row["speedup"] = timing["speedups"][row["accelerations"]]
        row["speedup_fastest"] = timing["speedups_fastest"][row["accelerations"]]
    return {"budget": budget.model_dump(), "baseline_image_time": timing["baseline"],
            "bf16_image_time": timing["bf16"], "timing": timing["method"], "rows": rows}


def within(row: dict[str, Any], budget: Any) -> bool:
    """Whether an accelerated row keeps the budget: every image's PSNR and SSIM, and the prompt accuracy's drop."""
    images = all(passes(m, budget.min_psnr, budget.min_ssim) for m in row["images"])
    return images and ("quality" not in row or row["quality"]["drop_points"] <= budget.max_accuracy_drop)


def judge(table: dict[str, Any], budget: Any, result: dict[str, Any]) -> None:
    """Judge every row of a set's table by `budget` (a build that changed only its budget judges its cached
    measurements again). The unaccelerated row carries the set's verdict on its gates, its end-to-end figures and,
    where the budget names one, the real-step cosine its denoiser must keep."""
    table["budget"] = budget.model_dump()
    steps = (result.get("parity") or {}).get("denoiser_steps")
    cosine_ok = budget.min_step_cosine is None or (steps is not None and steps["min_cosine"] >= budget.min_step_cosine)
    for row in table["rows"]:
        if row["approximate"]:
            row["within_budget"] = within(row, budget)
        else:
            e2e = result["e2e"]
            row |= {"within_budget": result["passed"] and cosine_ok, "min_psnr_db": e2e.get("min_psnr_db"),
                    "min_ssim": e2e.get("min_ssim"), "step_cosine": steps["min_cosine"] if steps else None}
            if "quality" in result:  # the set's own prompt accuracy, for the table beside the accelerated rows'
                row["quality"] = {k: result["quality"][k] for k in ("prompt_accuracy", "drop_points")}


def image_times(deployed: DeployedPipeline, s: Sample, reference: Any, plan: Any, combos: list[Accelerations],
                say: Say) -> dict[str, Any]:
    """The whole image (text encoders, every step, decode) of the first sample under each combination, taking turns
    with the PyTorch baseline in one run (staged validation: against the baseline's recorded runs)."""
    lat = plan.validation.latency
    latents, _ = sample_arguments(s, deployed, plan.inputs)
    calls: dict[str, Callable[[], Any]] = {}
    if not reference.staged:  # a live reference runs the pipeline each time; a BF16 copy of it beside
        calls["PyTorch FP32"] = lambda: reference.generation(s, latents)
        calls["PyTorch BF16"] = lambda: reference.bf16_generation(s, latents)
    for combo in combos:
        calls[combo.label] = lambda a=combo: generate(deployed, s, plan, a)
    runs, warmup = max(lat.pipeline_runs, 2), min(lat.warmup, 1)
    say(f"      whole image: {len(calls)} rows taking turns, {warmup} warm-up + {runs} timed round(s)")
    times = latency.interleaved(calls, warmup, runs,
                                lambda done, total: say(f"      whole image: round {done}/{total} done"))
    baseline = latency.summarize(times.pop("PyTorch FP32")) if "PyTorch FP32" in times else latency.summarize(
        [t["total"] for t in reference.pipeline_timings])
    bf16 = latency.summarize(times.pop("PyTorch BF16")) if "PyTorch BF16" in times else None
    sets = {label: latency.summarize(t) for label, t in times.items()}
    say(f"      whole image ({s.steps} steps), p50 / fastest: PyTorch FP32 {baseline['p50_s']:.2f} / "
        f"{baseline['min_s']:.2f} s; " + (f"PyTorch BF16 {bf16['p50_s']:.2f} / {bf16['min_s']:.2f} s; " if bf16 else "")
        + "; ".join(f"{k} {v['p50_s']:.2f} / {v['min_s']:.2f} s" for k, v in sets.items()))
    return {"method": "recorded baseline" if reference.staged else "interleaved", "baseline": baseline, "bf16": bf16,
            "sets": sets, "speedups": {k: baseline["p50_s"] / v["p50_s"] for k, v in sets.items()},
            "speedups_fastest": {k: baseline["min_s"] / v["min_s"] for k, v in sets.items()}}


def _quality_image(deployed: DeployedPipeline, prompt: str, seed: int, plan: Any, accelerations: Accelerations) -> Any:
    q = plan.validation.quality
    s = Sample(prompt, seed, None, plan.height, plan.width, q.steps, q.guidance_scale)
    return generate(deployed, s, plan, accelerations).images[0]


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"
