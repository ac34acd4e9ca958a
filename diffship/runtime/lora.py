"""LoRAs at run time: the weight changes `generate --lora` hands to a backend that can take new weights when it loads
(ONNX Runtime initializer overrides, OpenVINO constants replaced in memory), with no new files written.

The changed weights are found in the artifacts by their values in the model the build was made from, so this needs
that model (the build's recorded source, re-resolved from the cache or its path).
"""

from __future__ import annotations

from collections.abc import Callable

from diffship.errors import DiffshipError
from diffship.models.components import component_specs, modules_used, with_cache_specs
from diffship.models.families import detect_family
from diffship.models.loading import load_component
from diffship.models.lora import LoraSpec, lora_targets, merge
from diffship.models.source import recipe_source
from diffship.recipe import Recipe
from diffship.store.artifacts import MANIFEST_NAME, read_json
from diffship.store.manifest import ArtifactSet
from diffship.targets import get_target
from diffship.targets.weight_patch import Change, patch_refusal


def runtime_changes(artifacts: ArtifactSet, loras: list[LoraSpec],
                    say: Callable[[str], None] | None = None) -> dict[str, list[Change]]:
    """Component name -> its weights before and after merging `loras` over the build's own weights (in memory)."""
    backend = get_target(artifacts.target)
    if not backend.can_load_with_changes:
        raise DiffshipError(f"{artifacts.target} cannot take new weights when it loads; write a new build with "
                            "`diffship lora apply` instead.")
    if reason := patch_refusal(artifacts.target, artifacts.precision):
        raise DiffshipError(f"No LoRA at run time for {artifacts.target} {artifacts.precision}: {reason}.")
    recipe = Recipe.model_validate(read_json(artifacts.root / MANIFEST_NAME)["recipe"])
    folder = recipe_source(recipe, [], say).folder
    # what LoRAs patch (never the VAE or ControlNets): the denoiser's graphs, deep-feature caching's two included
    weighted = ("denoiser", "controlled_denoiser", "caching_denoiser", "shallow_denoiser", "text_encoder")
    specs = [s for s in with_cache_specs(component_specs(folder), folder, recipe.accelerations.cache_depth)
             if s.name in artifacts.components and s.role in weighted]
    modules = {s.module: load_component(folder, s.module, recipe.allow_pickle) for s in specs}
    denoiser = detect_family(folder).denoiser.component
    before: dict[tuple[str, str], object] = {}
    for spec in loras:
        for module, name, _ in lora_targets(modules, spec, denoiser, recipe.allow_pickle):
            before.setdefault((module, name), modules[module].get_submodule(name).weight.detach().numpy().copy())
        merge(modules, spec, denoiser, recipe.allow_pickle)
    by_component: dict[str, list[Change]] = {}
    for s in specs:
        # a graph of part of the denoiser (the shallow deep-cache one) holds only the weights it runs
        used = modules_used(s, modules[s.module]) if s.role == "shallow_denoiser" else None
        changed = [Change(f"{s.module}:{name}", old, modules[s.module].get_submodule(name).weight.detach().numpy())
                   for (module, name), old in sorted(before.items())
                   if module == s.module and (used is None or name in used)]
        if changed:
            by_component[s.name] = changed
    return by_component
