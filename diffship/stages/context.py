"""What every stage of one build reads: the recipe's model resolved and checked (`outline`), then compressed when the
recipe says so, with the hashes, versions, baseline and calibration the stages share (`prepare`).

Bad input fails in `outline`, before any stage runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffship.accelerations import diffusers_loop_refuses
from diffship.errors import DiffshipError
from diffship.exporters.pipeline import select_specs
from diffship.models.components import ComponentSpec, component_specs, with_cache_specs
from diffship.models.decoder_folder import decoder_spec, with_decoder
from diffship.models.families import Family, controlnets_in, detect_family, family_named, tasks_of
from diffship.models.lora import LoraSpec
from diffship.models.source import ModelSource, resolve
from diffship.recipe import Recipe
from diffship.runtime.tasks import task_inputs, validated_tasks
from diffship.stages.calibrate import Calibration
from diffship.stages.compress import compress_stage
from diffship.store import cache
from diffship.store.versions import library_versions
from diffship.targets import get_target
from diffship.targets.calibration import check_calibration
from diffship.validation.baseline import Baseline
from diffship.validation.parity import Case
from diffship.validation.suite import Plan

Say = Callable[[str], None]
# The roles an image needs: a build validates end to end, so it exports at least these components.
GENERATES = ("text_encoder", "denoiser", "vae_decoder")


def check_targets(recipe: Recipe, installed: bool = True) -> None:
    """Every target installed (unless `installed` is false: a farm's driver, which builds nothing itself) and every
    precision offered, each once, before any work starts."""
    keys = [f"{t.name}-{p}" for t in recipe.targets for p in t.precisions]
    if repeated := sorted({k for k in keys if keys.count(k) > 1}):
        raise DiffshipError(f"The recipe builds {', '.join(repeated)} more than once (one artifact set per target and "
                            "precision); list each precision once, in one [[targets]] entry per target.")
    for target in recipe.targets:
        backend = get_target(target.name, installed)
        unknown = [p for p in target.precisions if p not in backend.PRECISIONS]
        if unknown:
            raise DiffshipError(f"Target {target.name!r} cannot build {', '.join(unknown)} yet; it offers "
                                f"{', '.join(backend.PRECISIONS)}.")
        if installed:  # hardware the target needs (a GPU, FP8 kernels), checked before any work
            backend.preflight(target.precisions, backend.parse_options(target.options))


def shapes_fixed(shapes: dict[str, list[int]]) -> bool:
    """Whether the recipe pins batch, height and width to one value each (static artifacts are then possible)."""
    return all(low == high for low, high in shapes.values())


def plan_shapes(recipe: Recipe, spec: ComponentSpec, folder: Path) -> tuple[dict[str, list[int]], Plan]:
    """The shape ranges to record, and the resolution and parity cases validation uses (model defaults filled in)."""
    multiple = spec.vae_scale * spec.latent_multiple
    native = spec.denoiser.native_size(family_named(spec.family).denoiser_config(folder), spec.vae_scale)
    shapes: dict[str, list[int]] = {"batch": list(recipe.shapes.batch)}
    for side in ("height", "width"):
        low, high = getattr(recipe.shapes, side) or (multiple, 2 * native)
        for value in (low, high):
            if value % multiple:
                raise DiffshipError(f"shapes.{side} {value} is not a multiple of {multiple} pixels, which this model needs.")
        shapes[side] = [low, high]
    if shapes["batch"][0] > 1:
        raise DiffshipError("Validation generates one image per prompt and seed: shapes.batch must include 1.")
    v = recipe.validation
    height, width = v.height or native, v.width or native
    for side, value in (("height", height), ("width", width)):
        low, high = shapes[side]
        if value % multiple or not low <= value <= high:
            raise DiffshipError(
                f"Validation {side} {value} must be a multiple of {multiple} within shapes.{side} [{low}, {high}].")
    if v.parity_cases:
        cases = tuple(Case(c.batch, c.height, c.width) for c in v.parity_cases)
        for c in cases:
            spec.axis_sizes(c.batch, c.height, c.width)  # raises on a resolution the model cannot take
    else:
        first = Case(shapes["batch"][0], height, width)
        second = Case(min(2, shapes["batch"][1]), shapes["height"][0], shapes["width"][0])
        cases = (first,) if second == first else (first, second)
    denoiser_cases = None
    if shapes_fixed(shapes) and v.guidance_scale > 1.0:
        denoiser_cases = tuple(Case(2 * c.batch, c.height, c.width) for c in cases)
    inputs = task_inputs(height, width, v.image, v.mask, v.strength, control=v.control_image,
                         control_scale=v.control_scale, control_window=(v.control_start, v.control_end),
                         controlnets=len(controlnets_in(folder)))
    return shapes, Plan(height, width, cases, v, recipe.threshold("fp32"), denoiser_cases,
                        validated_tasks(tasks_of(folder), every=family_named(spec.family).loop == "diffusers"), inputs,
                        recipe.accelerations, recipe.budget)


def check_accelerations(recipe: Recipe, family: Family, fixed: bool) -> None:
    """What the recipe's accelerations cannot run with, said before any work: truncated guidance or a smaller decoder
    where the loop is diffusers' (SD3, Flux: only block caching runs there), ControlNets (their loop is not
    accelerated), and truncated guidance on a denoiser built for the guided batch only (fixed shapes, or a target that
    pins them)."""
    a = recipe.accelerations
    if not a.active:
        return
    if family.loop == "diffusers" and (unfit := diffusers_loop_refuses(a)):
        raise DiffshipError(f"Accelerations ({a.label}): {unfit} in diffship's own denoising loop; a {family.title} "
                            "model runs diffusers', where only block caching (deep_cache) runs.")
    if recipe.controlnets:
        raise DiffshipError(f"Accelerations ({a.label}) do not combine with ControlNets yet: build without one or the "
                            "other.")
    pinned = [t.name for t in recipe.targets if get_target(t.name, False).PINNED_SHAPES]
    if a.guidance and (fixed or pinned):
        where = f"the target(s) {', '.join(pinned)} pin" if pinned else "[shapes] pins"
        raise DiffshipError(f"Truncated guidance runs the denoiser on the text half alone (batch 1 per image), but "
                            f"{where} its batch to both halves: drop `guidance` from [accelerations]"
                            + ("" if pinned else ", or let [shapes] batch range over 1 to 2") + ".")


@dataclass
class Context:
    """What every stage of one build reads: the resolved (and compressed) model, its components, shapes and plan, the
    modules' content hashes, library versions, the PyTorch baseline (loaded on first use) and the calibration."""

    recipe: Recipe
    source: ModelSource
    family: str
    family_title: str
    specs: list[ComponentSpec]
    shapes: dict[str, list[int]]
    plan: Plan
    module_hashes: dict[str, str]
    versions: dict[str, str]
    baseline: Baseline
    calibration: Calibration
    compressed: dict[str, Any] | None
    hits: dict[str, bool]
    force: bool
    say: Say


@dataclass(frozen=True)
class Outline:
    """The recipe's model resolved and checked: its folder, family, the components to build, shapes and plan."""

    source: ModelSource
    family: Family
    specs: list[ComponentSpec]
    shapes: dict[str, list[int]]
    plan: Plan


def outline(recipe: Recipe, say: Say | None = None, installed: bool = True) -> Outline:
    """Resolve the recipe's model and check everything about the recipe that needs no stage to run (what each target
    can make for this family, components, shapes, calibration settings): bad input fails here, before any work."""
    source = resolve(recipe.model, allow_pickle=recipe.allow_pickle, model_config=recipe.checkpoint_config, say=say,
                     variant=recipe.variant, loras=[LoraSpec(x.path, x.scale) for x in recipe.loras],
                     controlnets=recipe.controlnets)
    if recipe.accelerations.vae_decoder is not None:  # the smaller decoder, one more module of the folder
        source = replace(source, folder=with_decoder(source.folder, recipe.accelerations.vae_decoder, say))
    family = detect_family(source.folder)
    for target in recipe.targets:  # what a target cannot make for this family, said before any work
        backend = get_target(target.name, installed)
        backend.check_family(family.name, backend.parse_options(target.options))
    specs = select_specs(source.folder, recipe.components)
    needed = [s.name for s in component_specs(source.folder, family) if s.role in GENERATES]
    if missing := [c for c in needed if c not in {s.name for s in specs}]:
        raise DiffshipError(
            f"A build validates images end to end, so it needs {', '.join(needed)}; the recipe leaves out "
            f"{', '.join(missing)}. To export and check single components use `diffship export -c` and `diffship validate`.")
    shapes, plan = plan_shapes(recipe, specs[0], source.folder)
    check_accelerations(recipe, family, shapes_fixed(shapes))
    specs = with_cache_specs(specs, source.folder, recipe.accelerations.cache_depth)  # deep-feature caching's graphs: components
    if recipe.accelerations.vae_decoder is not None:
        specs = [*specs, decoder_spec(next(s for s in specs if s.role == "vae_decoder"))]
    if any(get_target(t.name, installed).needs_calibration(p) for t in recipe.targets for p in t.precisions):
        check_calibration(recipe.calibration.prompts, recipe.calibration.samples)
    return Outline(source, family, specs, shapes, plan)


def prepare(recipe: Recipe, force: bool, say: Say, installed: bool = True) -> Context:
    """The recipe's outline, compressed when it says so, with everything the stages share (`installed`: whether the
    targets' packages must be here, as for a compile or a validation; an export of a TensorRT row runs anywhere)."""
    o = outline(recipe, say, installed)
    source, family, specs, shapes, plan = o.source, o.family, o.specs, o.shapes, o.plan
    hits: dict[str, bool] = {}
    compressed = None
    if recipe.compress:
        source, compressed = compress_stage(recipe, source, family.name, plan, force, hits, say)
    versions = library_versions()
    say(f"Hashing {source.spec} ({family.title}) ...")
    module_hashes = {m: cache.folder_hash(source.folder / m)
                     for m in sorted({s.module for s in specs} | {t for t, _ in family.tokenizers_in(source.folder)}
                                     | {"scheduler"})}
    baseline = Baseline(source.folder, recipe.allow_pickle, say, recipe.validation.scheduler,
                        recipe.validation.scheduler_config, recipe.validation.streamed_reference)
    calibration = Calibration(recipe, plan, baseline, module_hashes, versions, force, hits)
    return Context(recipe, source, family.name, family.title, specs, shapes, plan, module_hashes, versions, baseline,
                   calibration, compressed, hits, force, say)
