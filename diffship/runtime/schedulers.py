"""The scheduler a generation uses: the folder's own by default, or one a user names, built from the folder's
config as diffusers does it (`OtherScheduler.from_config(pipe.scheduler.config)`), so the training schedule (betas,
prediction type, offsets) carries over and only the sampler changes.

Names follow the ones people know from the WebUIs and diffusers' docs; any diffusers scheduler class name works too.
"""

from __future__ import annotations

from typing import Any

from diffship.errors import DiffshipError
from diffship.named_settings import named_settings

# common name -> (diffusers class, config overrides)
NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def parse_scheduler(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME[:key=value,...]` as the name and its config overrides."""
    return named_settings(text, "--scheduler")


FLOW_MATCHING = "FlowMatch"  # diffusers' flow-matching schedulers' class names start so


def make_scheduler(base: Any, name: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """A scheduler from `base`'s config: `name`'s class (or `base`'s own) with `overrides` applied."""
    import diffusers  # start-up time: diffusers

    if name is None and not overrides:
        return base
    class_name, defaults = NAMES.get(name, (name, {})) if name else (type(base).__name__, {})
    cls = getattr(diffusers, class_name, None) if class_name else None
    if cls is None or not class_name.endswith("Scheduler"):
        raise DiffshipError(f"Unknown scheduler {name!r}: use one of {', '.join(NAMES)} or a diffusers scheduler class "
                            "name (e.g. DPMSolverMultistepScheduler).")
    flow = type(base).__name__.startswith(FLOW_MATCHING)
    if flow != class_name.startswith(FLOW_MATCHING):  # diffusers names its flow-matching samplers so
        raise DiffshipError(
            f"{class_name} cannot sample this model: its own {type(base).__name__} is "
            + ("a flow-matching sampler (SD3, Flux), which only another FlowMatch scheduler replaces."
               if flow else f"a noise-prediction sampler; {class_name} is for flow-matching models (SD3, Flux)."))
    # Overrides go in as keywords: merged into the config instead, diffusers would drop any of them the folder's JSON
    # left out (from_config discards the keys listed in `_use_default_values`), so `dpm++2m-karras` on a folder
    # without `use_karras_sigmas` would silently run without Karras sigmas.
    settings = {**defaults, **(overrides or {})}
    # The settings the class knows, from a scheduler built without the overrides: from_config keeps unknown keys in
    # the config it records, so the overridden scheduler's own config cannot tell them apart.
    unknown = sorted(set(overrides or {}) - set(cls.from_config(dict(base.config)).config))
    if unknown:
        raise DiffshipError(f"{class_name} has no setting {', '.join(unknown)}.")
    return cls.from_config(dict(base.config), **settings)


def describe_scheduler(scheduler: Any) -> dict[str, Any]:
    """What ran, for manifests and reports: the class and the settings that distinguish samplers."""
    keys = ("timestep_spacing", "prediction_type", "use_karras_sigmas", "algorithm_type", "solver_order")
    return {"class": type(scheduler).__name__, **{k: scheduler.config[k] for k in keys if k in scheduler.config}}
