"""Everything that decides whether one artifact set ships: component parity, end-to-end images, latency, memory.

The baseline is loaded once by the caller and shared by every artifact set it validates: live beside each set, or
recorded once and freed before the sets load (`reference`: staged validation, for models too large for both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffship.accelerations import AccelerationGrid
from diffship.host.memory import release_freed
from diffship.models.components import ComponentSpec, run_torch
from diffship.models.families import denoiser_of
from diffship.recipe import BudgetRecipe, Threshold, ValidationRecipe
from diffship.runtime.lazy_runners import LazyRunner
from diffship.runtime.pipeline import DeployedPipeline, initial_latents, pipeline_family
from diffship.runtime.schedulers import describe_scheduler
from diffship.runtime.tasks import TaskInputs
from diffship.store.manifest import ArtifactSet
from diffship.targets import get_target
from diffship.validation import accelerated, latency, quality
from diffship.validation.app import app_check
from diffship.validation.baseline import baseline_device, component_call, reference_module, run_baseline
from diffship.validation.capture import capture
from diffship.validation.clients import clients_check
from diffship.validation.e2e import Sample, run_e2e, sample_arguments
from diffship.validation.latency_blocks import Block, time_blocks
from diffship.validation.option_effects import option_effects
from diffship.validation.parity import Case, Tolerance, artifact_cases, check_component, compare, within
from diffship.validation.reference import LiveReference, RecordedReference

Say = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """What to validate with: the resolution for images and latency, the parity cases, the recipe's settings."""

    height: int
    width: int
    cases: tuple[Case, ...]
    validation: ValidationRecipe
    threshold: Threshold
    denoiser_cases: tuple[Case, ...] | None = None  # when shapes are fixed, the UNet's batch is doubled under guidance
    tasks: tuple[str, ...] = ("text2img",)  # what the model is for, its main task first (`validated_tasks`)
    inputs: TaskInputs | None = None  # the init image, mask and strength of img2img and inpaint
    accelerations: AccelerationGrid = field(default_factory=AccelerationGrid)  # measured on every set
    budget: BudgetRecipe = field(default_factory=BudgetRecipe)  # what an accelerated image must keep

    def task_kwargs(self, task: str | None = None) -> dict[str, Any]:
        """diffusers' arguments for `task` (the main task by default) beyond the prompt."""
        task = task or self.tasks[0]
        return self.inputs.diffusers_kwargs(task) if self.inputs and task != "text2img" else {}


def denoiser_trajectory(pipe: Any, spec: ComponentSpec, plan: Plan, source_folder: Path,
                    allow_pickle: bool = False) -> dict[str, Any]:
    """The denoiser's real inputs at every denoising step of one baseline generation, with the FP32 denoiser's output
    on each."""
    v = plan.validation
    data = capture(pipe, [v.prompts[0]], None, v.steps, plan.height, plan.width, v.guidance_scale, v.seeds[0],
                   with_vae=False, task_kwargs=plan.task_kwargs())
    reference = reference_module(pipe, spec, source_folder, allow_pickle)
    calls = data.inputs[spec.name]
    return {"prompt": v.prompts[0], "seed": v.seeds[0], "timesteps": data.info["timesteps"], "inputs": calls,
            "outputs": [run_torch(reference, spec, call)["out_sample"] for call in calls]}


def denoiser_step_parity(runner: Any, trajectory: dict[str, Any], tolerance: Tolerance) -> dict[str, Any]:
    """The artifact's denoiser against the FP32 one on each denoising step's real inputs (where INT8 error shows)."""
    steps = []
    for i, (call, expected) in enumerate(zip(trajectory["inputs"], trajectory["outputs"], strict=True)):
        metrics = compare(expected, runner.run(call)["out_sample"])
        steps.append({"step": i, "timestep": trajectory["timesteps"][i], **metrics, "passed": within(metrics, tolerance)})
    return {"prompt": trajectory["prompt"], "seed": trajectory["seed"], "steps": steps,
            "min_cosine": min(s["cosine"] for s in steps), "passed": all(s["passed"] for s in steps)}


def validate_set(artifacts: ArtifactSet, specs: list[ComponentSpec], reference: LiveReference | RecordedReference | None,
                 source_folder: Path, plan: Plan, options: Any = None, allow_pickle: bool = False,
                 say: Say | None = None, trajectory: dict[str, Any] | None = None,
                 quality_baseline: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate one artifact set against the baseline (None only for a set that cannot run here); return its
    results and the image pairs."""
    say = say or (lambda _: None)
    label = f"{artifacts.target} {artifacts.precision}"
    backend = get_target(artifacts.target)
    # Targets whose artifacts can be checked without running them (Core ML's package specs) are, everywhere.
    structure = backend.verify(artifacts.components)
    if structure is not None:
        say(f"[{label}] spec checks: {'pass' if structure['passed'] else 'FAIL'} "
            f"({sum(len(c['checks']) for c in structure['components'].values())} checks on "
            f"{len(structure['components'])} packages)")
    not_run = backend.prediction_unavailable()
    if not_run is not None:
        say(f"[{label}] parity, images and latency not run: {not_run}")
        return spec_only_result(artifacts, backend, structure, not_run, options), []
    rss_before = latency.rss_bytes()
    deployed = DeployedPipeline.from_artifacts(artifacts, options)
    # What loading adds before any call. Not always the weights as the runtime holds them: OpenVINO's CPU plugin
    # repacks them at a model's first call (about the IR's size again, docs/field-notes.md); the peak counts that.
    load_rss = latency.rss_bytes() - rss_before
    deployed.use_scheduler(plan.validation.scheduler, plan.validation.scheduler_config)
    result: dict[str, Any] = {"target": artifacts.target, "precision": artifacts.precision,
                              "denoiser": deployed.denoiser.component,
                              "scheduler": describe_scheduler(deployed.scheduler),
                              # a set loaded one component at a time is described as each loads (below)
                              "runtime": {n: r.describe().record() for n, r in deployed.runners.items()
                                          if not isinstance(r, LazyRunner)}}
    if structure is not None:
        result["spec"] = structure
    t = plan.threshold
    tolerance = Tolerance(t.min_cosine, t.max_rel_l2)

    parity: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in artifacts.components:
            continue
        say(f"[{label}] parity {spec.name}")
        runner = deployed.runners.get(spec.name) or backend.load(artifacts.components[spec.name], options, artifacts.precision)
        cases = artifact_cases(backend, spec, artifacts.components[spec.name],
                               plan.denoiser_cases if spec.is_denoiser and plan.denoiser_cases else plan.cases)
        parity[spec.name] = check_component(spec, lambda case, seed, s=spec: reference.outputs(s, case, seed), runner,
                                            tolerance, cases)
        say(f"      {'pass' if parity[spec.name]['passed'] else 'FAIL'} {spec.name}")
    result["parity"] = {"tolerance": {"min_cosine": t.min_cosine, "max_rel_l2": t.max_rel_l2},
                        "passed": all(p["passed"] for p in parity.values()), "components": parity}
    denoiser = deployed.denoiser
    if trajectory is not None and denoiser.component in deployed.runners:
        steps = denoiser_step_parity(deployed.runners[denoiser.component], trajectory, tolerance)
        result["parity"]["denoiser_steps"] = steps
        result["parity"]["passed"] = result["parity"]["passed"] and steps["passed"]
        say(f"      {'pass' if steps['passed'] else 'FAIL'} {denoiser.component} on {len(steps['steps'])} real denoising "
            "steps: "
            f"min cosine {steps['min_cosine']:.6f}")

    v = plan.validation
    samples = task_samples(plan)

    say(f"[{label}] end to end: {len(samples)} image(s) at {plan.height}x{plan.width}, {v.steps} steps "
        f"({', '.join(plan.tasks)})")
    e2e, pairs = run_e2e(samples, reference.generation, deployed, t.min_psnr, t.min_ssim,
                         lambda i, n, r: say(f"      {r['task']} image {i}/{n}: " + (
                             "identical" if r["identical"] else f"PSNR {r['psnr_db']:.1f} dB, SSIM {r['ssim']:.4f}")),
                         plan.inputs)
    result["e2e"] = e2e
    # A set that carries its own app (the web target's page) is also run there, from the same initial latents.
    if pairs and (app := app_check(backend, artifacts, deployed, samples[0], pairs[0]["target"], t.min_psnr,
                                   options or backend.parse_options({}), say)):
        result["app"], pair = app
        if pair:  # its image beside the runtime's goes into the report's grids after the e2e samples'
            pairs = [*pairs, pair]
            result["extra_pairs"] = [{k: v for k, v in pair.items() if k not in ("baseline", "target")}]
    # Where the set ships: each client that loads it draws the first sample, against diffusers' image of it.
    if v.clients and pairs and (shipped := clients_check(
            artifacts, samples[0], pairs[0]["baseline"], t.min_psnr, t.min_ssim, plan.inputs, v.clients, v.scheduler,
            say)):
        result["clients"], client_pairs = shipped
        pairs = [*pairs, *client_pairs]
        result["extra_pairs"] = [*result.get("extra_pairs", []),
                                 *({k: val for k, val in pair.items() if k not in ("baseline", "target")}
                                   for pair in client_pairs)]
    if quality_baseline is not None:
        q = v.quality
        say(f"[{label}] quality: prompt accuracy over {10 * len(q.seeds)} digits at {q.steps} steps")
        result["quality"] = quality.judge(quality.measure(
            lambda prompt, seed, d=deployed: quality_image(d, prompt, seed, plan, q), q.seeds, say),
            quality_baseline, q.max_drop_points, q.min_prompt_accuracy)
        say(f"      {'pass' if result['quality']['passed'] else 'FAIL'} prompt accuracy "
            f"{result['quality']['prompt_accuracy']:.3f} (PyTorch {quality_baseline['prompt_accuracy']:.3f}, "
            f"{result['quality']['drop_points']:+.1f} points down, limit {q.max_drop_points}; floor "
            f"{q.min_prompt_accuracy})")

    if plan.accelerations.active and pairs:
        say(f"[{label}] accelerations: {len(plan.accelerations.combinations()) - 1} combination(s) "
            f"({plan.accelerations.label}), each image against the baseline's, judged by the budget")
        result["accelerations"] = accelerated.measure(
            deployed, samples, [p["baseline"] for p in pairs[:len(samples)]], reference, plan,
            quality_baseline, say)
    skipped = sorted({str(d["latency_skipped"]) for d in result["runtime"].values() if d.get("latency_skipped")})
    if v.latency.enabled and skipped:
        result["latency_skipped"] = "; ".join(skipped)
        say(f"[{label}] latency not measured: {result['latency_skipped']}")
    elif v.latency.enabled and not reference.staged:
        say(f"[{label}] latency: {v.latency.warmup} warm-up + {v.latency.runs} timed runs per component, interleaved")
        result["latency"] = measure_latency(deployed, specs, reference, plan, samples[0], say)
    # What the target's memory options (VAE slicing, offload) change, each measured on and off.
    if effects := option_effects(deployed, plan, say):
        result["option_effects"] = effects
    # Described again after running: what was learned by running (torch.compile's time per shape) is in it now.
    result["runtime"] = {n: r.describe().record() for n, r in deployed.runners.items()}
    result["memory"] = {
        "artifact_bytes": {c: sum(f.stat().st_size for f in _files_of(p)) for c, p in artifacts.components.items()},
        "load_seconds": deployed.load_seconds,
        "load_rss_delta_bytes": load_rss,
        "held": "one component at a time" if any(isinstance(r, LazyRunner) for r in deployed.runners.values())
        else "every component",
    }
    if v.latency.enabled and reference.staged and "latency_skipped" not in result:
        say(f"[{label}] latency: the pipeline timed now, then each component alone in blocks (baseline / target / "
            f"baseline, {v.latency.warmup} warm-up each): the baseline and this set are not in memory together")
        target_runs = _pipeline_runs(deployed, plan, samples[0])
        names = list(deployed.runners)
        deployed = None
        release_freed()
        result["latency"] = {"method": "blocks", **measure_latency_blocks(
            artifacts, options, [s for s in specs if s.name in names], source_folder, plan, allow_pickle, say)}
        result["latency"]["pipeline"] = pipeline_summary(samples[0], plan, reference.pipeline_timings, target_runs,
                                                         say)
    result["memory"] |= {"peak_rss_bytes": latency.peak_rss_bytes(), "peak_gpu_bytes": latency.peak_gpu_bytes()}
    result["passed"] = (result["parity"]["passed"] and e2e["passed"] and result.get("quality", {}).get("passed", True)
                        and result.get("spec", {}).get("passed", True) and result.get("app", {}).get("passed", True)
                        and result.get("clients", {}).get("passed", True))
    if "accelerations" in result:  # the set's own loop is the exact row, judged by its gates
        accelerated.judge(result["accelerations"], plan.budget, result)
    deployed = None
    release_freed()
    return result, pairs


def task_samples(plan: Plan) -> list[Sample]:
    """The end-to-end cases: every prompt and seed for the main task, the first prompt with every seed for the
    others (img2img beside text2img checks the VAE encoder and the strength's schedule, not more prompts)."""
    v = plan.validation
    main, *others = plan.tasks
    cases = [(main, p) for p in v.prompts] + [(task, v.prompts[0]) for task in others]
    return [Sample(p, seed, v.negative_prompt, plan.height, plan.width, v.steps, v.guidance_scale, task)
            for task, p in cases for seed in v.seeds]


def spec_only_result(artifacts: ArtifactSet, backend: Any, structure: dict[str, Any] | None, not_run: str,
                     options: Any) -> dict[str, Any]:
    """The result of a set that cannot run here: its spec checks, and why parity, images and latency were not run.
    It passes on its checks alone unless the target's options require parity (`require_parity`)."""
    required = bool(getattr(options, "require_parity", False))
    checks_passed = structure is not None and structure["passed"]
    return {"target": artifacts.target, "precision": artifacts.precision,
            "denoiser": pipeline_family(artifacts).denoiser.component,
            "runtime": {c: backend.describe_artifact(p).record() for c, p in artifacts.components.items()},
            "spec": structure, "not_run": not_run, "require_parity": required,
            "memory": {"artifact_bytes": {c: sum(f.stat().st_size for f in _files_of(p))
                                          for c, p in artifacts.components.items()}},
            "passed": checks_passed and not required}


def measure_latency(deployed: DeployedPipeline, specs: list[ComponentSpec], reference: LiveReference, plan: Plan,
                    sample: Sample, say: Say | None = None) -> dict[str, Any]:
    """Per component (text encoders, one UNet call under guidance, VAE decode) and per pipeline run, both sides; the
    baseline's pipeline runs are the task's own pipeline, as its images are."""
    say = say or (lambda _: None)
    lat = plan.validation.latency
    guided = plan.validation.guidance_scale > 1.0
    components: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in deployed.runners:
            continue
        batch = spec.batch_for(1, guided)
        inputs = spec.sample_inputs(batch, plan.height, plan.width)
        runner = deployed.runners[spec.name]
        baseline = component_call(reference.pipe, spec, inputs, reference.folder, reference.allow_pickle)
        times = latency.interleaved({"baseline": baseline,
                                     "target": lambda r=runner, x=inputs: r.run(x)}, lat.warmup, lat.runs)
        components[spec.name] = _component_latency(spec.name, batch, times, say)

    latents, extra = sample_arguments(sample, deployed, plan.inputs)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "target": []}
    calls = {
        "baseline": lambda: runs["baseline"].append(reference.generation(sample, latents).timings),
        "target": lambda: runs["target"].append(deployed(
            sample.prompt, sample.negative_prompt, plan.height, plan.width, sample.steps, sample.guidance_scale,
            sample.seed, latents=latents, **extra).timings),
    }
    latency.interleaved(calls, min(lat.warmup, 1), lat.pipeline_runs)
    pipeline = pipeline_summary(sample, plan, runs["baseline"][-lat.pipeline_runs:], runs["target"][-lat.pipeline_runs:],
                                say)
    return {"components": components, "pipeline": pipeline}


def pipeline_summary(sample: Sample, plan: Plan, baseline_runs: list[dict[str, Any]], target_runs: list[dict[str, Any]],
                     say: Say) -> dict[str, Any]:
    """Whole-pipeline latency of both sides from their generations' timings: total and per denoising step."""
    guided = plan.validation.guidance_scale > 1.0
    pipeline: dict[str, Any] = {"steps": sample.steps, "height": plan.height, "width": plan.width,
                                "guidance": guided, "task": sample.task}
    for side, timed in (("baseline", baseline_runs), ("target", target_runs)):
        step_times = [s for t in timed for s in t["steps"]]
        pipeline[side] = {"total": latency.summarize([t["total"] for t in timed]),
                          "step": latency.summarize(step_times) if step_times else None}
    pipeline["speedup"] = latency.speedup(pipeline["baseline"]["total"], pipeline["target"]["total"])
    say(f"      whole pipeline ({sample.steps} steps): baseline {pipeline['baseline']['total']['p50_s']:.2f} s, "
        f"target {pipeline['target']['total']['p50_s']:.2f} s, {pipeline['speedup']:.2f}x")
    if pipeline["baseline"]["step"] and pipeline["target"]["step"]:
        pipeline["step_speedup"] = latency.speedup(pipeline["baseline"]["step"], pipeline["target"]["step"])
    return pipeline


def _pipeline_runs(deployed: DeployedPipeline, plan: Plan, sample: Sample) -> list[dict[str, Any]]:
    """The set's own whole-pipeline runs (staged validation): warm-up, then the timed ones' timings."""
    lat = plan.validation.latency
    latents, extra = sample_arguments(sample, deployed, plan.inputs)
    return latency.after_warmup(lambda: deployed(sample.prompt, sample.negative_prompt, plan.height, plan.width,
                                                 sample.steps, sample.guidance_scale, sample.seed, latents=latents,
                                                 **extra).timings, min(lat.warmup, 1), lat.pipeline_runs)


def measure_latency_blocks(artifacts: ArtifactSet, options: Any, specs: list[ComponentSpec], folder: Path,
                           plan: Plan, allow_pickle: bool, say: Say) -> dict[str, Any]:
    """Per component, the baseline's module and the set's artifact each loaded alone and timed in blocks, a large
    component's each in a child process (`validation/latency_blocks.py`: staged validation)."""
    lat = plan.validation.latency
    guided = plan.validation.guidance_scale > 1.0
    device, dtype = baseline_device()
    components: dict[str, Any] = {}
    for spec in specs:
        batch = spec.batch_for(1, guided)
        block = Block(spec, spec.sample_inputs(batch, plan.height, plan.width), folder, allow_pickle,
                      plan.validation.streamed_reference, device, dtype, artifacts.target,
                      artifacts.components[spec.name], options, artifacts.precision)
        times, in_child = time_blocks(block, lat.warmup, lat.runs)
        components[spec.name] = _component_latency(spec.name, batch, times, say) | {"blocks_in_child": in_child}
    return {"components": components}


def _component_latency(name: str, batch: int, times: dict[str, list[float]], say: Say) -> dict[str, Any]:
    """One component's timings on both sides, summarized, with the speedup of the medians and of the fastest calls."""
    base, target = latency.summarize(times["baseline"]), latency.summarize(times["target"])
    # The fastest call of each side too: on a shared host, slow spells from other guests stretch the medians
    # (benchmarks/host_noise.py); the fastest calls are each side's uncontended speed.
    entry = {"batch": batch, "baseline": base, "target": target, "speedup": latency.speedup(base, target),
             "speedup_fastest": base["min_s"] / target["min_s"] if target["min_s"] else None}
    say(f"      {name} (batch {batch}): baseline {base['p50_s'] * 1000:.1f} ms, target {target['p50_s'] * 1000:.1f} ms, "
        f"{entry['speedup']:.2f}x")
    return entry


def _files_of(artifact: Path) -> list[Path]:
    # An ONNX artifact may keep its weights in a side file (model.onnx_data) in the same folder; a Core ML package
    # is a folder.
    if artifact.is_dir():
        return [p for p in artifact.rglob("*") if p.is_file()]
    folder = artifact.parent
    return [p for p in folder.iterdir() if p.is_file() and p.name.startswith(artifact.stem)]


def quality_image(deployed: DeployedPipeline, prompt: str, seed: int, plan: Plan, q: Any) -> Any:
    """One quality-check image from the deployed artifacts, from the same initial latents as the baseline's."""
    latents = initial_latents(seed, 1, deployed.in_channels, plan.height // deployed.vae_scale,
                              plan.width // deployed.vae_scale)
    return deployed(prompt, None, plan.height, plan.width, q.steps, q.guidance_scale, seed, latents=latents).images[0]


def baseline_quality(pipe: Any, plan: Plan, say: Say) -> dict[str, Any]:
    """The PyTorch pipeline's prompt accuracy, which every artifact set is judged against."""
    q = plan.validation.quality
    channels = getattr(pipe, denoiser_of(pipe).component).config.in_channels
    scale = pipe.vae_scale_factor

    def generate(prompt: str, seed: int) -> Any:
        latents = initial_latents(seed, 1, channels, plan.height // scale, plan.width // scale)
        return run_baseline(pipe, prompt, None, plan.height, plan.width, q.steps, q.guidance_scale, seed,
                            latents).images[0]

    say(f"[validate] quality: PyTorch baseline over {10 * len(q.seeds)} digits at {q.steps} steps")
    return quality.measure(generate, q.seeds, say)
