"""The target protocol: what every target module declares, and the optional hooks with their defaults, written once.

A target is one module registered in `targets.TARGETS`. `get_target` wraps it in a `Target`, which every caller
uses: the module's required functions (`REQUIRED`), and for each optional declaration or hook the module's own or
the default below, so no caller probes a module with `hasattr`. `tests/test_target_protocol.py` checks every
registered module against this file: required names present, hooks taking the arguments written here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from diffship.targets.records import Description

if TYPE_CHECKING:
    from diffship.targets.options import TargetOptions

# What each target module must define.
REQUIRED = ("PRECISIONS", "parse_options", "compile", "load", "needs_calibration", "writes_artifacts", "model_index")
# Declarations a module may make, with their defaults.
DECLARATIONS: dict[str, Any] = {
    "PATCHABLE": (),  # precisions whose stored weights are the model's, cast: `patch_weights` can rewrite them
    "PATCH_REFUSAL": "this target cannot patch weights in place: rebuild with --lora",
    "STAGE_RESOURCES": {},  # stage -> the farm's custom resource it needs ("accelerator", "macos")
    "CLIENT_OUTPUTS_KEPT": True,  # whether its sets keep outputs only the clients read (optimum's layout)
    "PINNED_SHAPES": False,  # whether its denoiser serves only the guided batch it was built for (no batch 1 after)
}
# Optional hooks: the parameters each takes (checked against the module's) and what the default does.
HOOKS: dict[str, tuple[str, ...]] = {
    "preflight": ("precisions", "options"),  # hardware the target needs, before any work
    "check_family": ("family", "options"),  # what it cannot make for a family, before any export
    "environment": ("options",),  # what ties its artifacts to a machine (GPU, library builds): part of cache keys
    "finish_set": ("set_dir", "components", "precision", "options", "family", "say"),  # what a set needs beside
    "verify": ("components",),  # spec checks of a set that cannot run here
    "prediction_unavailable": (),  # why its artifacts cannot run on this machine, or None
    "describe_artifact": ("artifact",),  # what an artifact is, without loading it
    "parity_cases": ("spec", "artifact", "cases"),  # the parity cases an artifact with pinned shapes can take
    "release_resident": (),  # what its Runners keep on a device between calls, back to the host (model offload)
    "app_run": ("artifacts", "sample", "latents", "options", "say"),  # its app's image of a sample (validation judges)
    "patch_weights": ("artifact", "dest", "changes"),  # a copy with new weights (LoRA), no recompiling
    "load_with_changes": ("artifact", "options", "precision", "changes"),  # new weights patched in as it loads
    "load_tapped": ("artifact", "options", "precision", "taps"),  # also returns these inner tensors (ONNX names)
}


class Target:
    """One registered target: its module's required functions, and every optional hook with its default."""

    def __init__(self, name: str, module: ModuleType) -> None:
        self.name, self.module = name, module

    def _declared(self, name: str) -> Any:
        return getattr(self.module, name, DECLARATIONS[name])

    def _hook(self, name: str) -> Callable[..., Any] | None:
        return getattr(self.module, name, None)

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {self.module.__name__})"

    # --- required ------------------------------------------------------------------------------------------------

    @property
    def PRECISIONS(self) -> tuple[str, ...]:
        return tuple(self.module.PRECISIONS)

    def parse_options(self, options: dict[str, Any]) -> TargetOptions:
        """The recipe's options for this target, validated into its options model (`targets/options.py`)."""
        parsed: TargetOptions = self.module.parse_options(options)
        return parsed

    def compile(self, source: Path, precision: str, options: Any, dest: Path | None = None,
                context: Any = None) -> Path:
        """One component's artifact from its ONNX export (`dest` None: a precision that writes nothing new)."""
        return self.module.compile(source, precision, options, dest, context)

    def load(self, artifact: Path, options: Any = None, precision: str | None = None) -> Any:
        """A Runner: named numpy arrays in, named numpy arrays out."""
        return self.module.load(artifact, options, precision)

    def needs_calibration(self, precision: str) -> bool:
        return bool(self.module.needs_calibration(precision))

    def writes_artifacts(self, precision: str, options: Any = None) -> bool:
        """False where the export itself is the artifact (ONNX Runtime FP32)."""
        return bool(self.module.writes_artifacts(precision, options))

    def model_index(self, family: str, components: list[str]) -> dict[str, Any] | None:
        """The set folder's model_index.json, or None to keep the export's."""
        return self.module.model_index(family, components)

    # --- declarations --------------------------------------------------------------------------------------------

    @property
    def PATCHABLE(self) -> tuple[str, ...]:
        return tuple(self._declared("PATCHABLE"))

    @property
    def PATCH_REFUSAL(self) -> str:
        return str(self._declared("PATCH_REFUSAL"))

    @property
    def STAGE_RESOURCES(self) -> dict[str, str]:
        return dict(self._declared("STAGE_RESOURCES"))

    @property
    def PINNED_SHAPES(self) -> bool:
        return bool(self._declared("PINNED_SHAPES"))

    @property
    def CLIENT_OUTPUTS_KEPT(self) -> bool:
        return bool(self._declared("CLIENT_OUTPUTS_KEPT"))

    @property
    def can_patch(self) -> bool:
        return self._hook("patch_weights") is not None

    @property
    def can_load_with_changes(self) -> bool:
        return self._hook("load_with_changes") is not None

    # --- hooks, each with its default ----------------------------------------------------------------------------

    def preflight(self, precisions: list[str], options: Any) -> None:
        if hook := self._hook("preflight"):
            hook(precisions, options)

    def check_family(self, family: str, options: Any) -> None:
        if hook := self._hook("check_family"):
            hook(family, options)

    def environment(self, options: Any) -> dict[str, Any] | None:
        return hook(options) if (hook := self._hook("environment")) else None

    def finish_set(self, set_dir: Path, components: dict[str, Path], precision: str, options: Any, family: str,
                   say: Callable[[str], None]) -> None:
        if hook := self._hook("finish_set"):
            hook(set_dir, components, precision, options, family, say)

    def verify(self, components: dict[str, Path]) -> dict[str, Any] | None:
        return hook(components) if (hook := self._hook("verify")) else None

    def prediction_unavailable(self) -> str | None:
        return hook() if (hook := self._hook("prediction_unavailable")) else None

    def describe_artifact(self, artifact: Path) -> Description:
        if hook := self._hook("describe_artifact"):
            described: Description = hook(artifact)
            return described
        return Description(self.name, f"{self.name} artifact (not loaded)", details={"path": str(artifact)})

    def parity_cases(self, spec: Any, artifact: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
        return hook(spec, artifact, cases) if (hook := self._hook("parity_cases")) else cases

    def release_resident(self) -> None:
        if hook := self._hook("release_resident"):
            hook()

    def app_run(self, artifacts: Any, sample: Any, latents: Any, options: Any,
                say: Callable[[str], None]) -> tuple[dict[str, Any], Any] | None:
        return hook(artifacts, sample, latents, options, say) if (hook := self._hook("app_run")) else None

    def patch_weights(self, artifact: Path, dest: Path, changes: list[Any]) -> dict[str, str]:
        if not (hook := self._hook("patch_weights")):
            raise NotImplementedError(f"{self.name} cannot patch weights in place: {self.PATCH_REFUSAL}")
        return hook(artifact, dest, changes)

    def load_with_changes(self, artifact: Path, options: Any, precision: str | None, changes: list[Any]) -> Any:
        if not (hook := self._hook("load_with_changes")):
            raise NotImplementedError(f"{self.name} cannot take new weights as it loads")
        return hook(artifact, options, precision, changes)

    @property
    def can_tap(self) -> bool:
        return self._hook("load_tapped") is not None

    def load_tapped(self, artifact: Path, options: Any, precision: str | None, taps: list[str]) -> Any:
        """A Runner whose outputs also hold the graph's inner tensors named `taps` (the export's ONNX names): a block's
        outputs, for per-block parity."""
        if not (hook := self._hook("load_tapped")):
            raise NotImplementedError(f"{self.name} cannot return a graph's inner tensors")
        return hook(artifact, options, precision, taps)


def conformance(module: ModuleType) -> list[str]:
    """What `module` gets wrong against the protocol: a missing required name, a hook or `compile` taking another
    number of arguments than the protocol passes. Empty when it conforms."""
    problems = [f"missing {name}" for name in REQUIRED if not hasattr(module, name)]
    for name, parameters in HOOKS.items():
        if (hook := getattr(module, name, None)) is None:
            continue
        have = tuple(p.name for p in inspect.signature(hook).parameters.values())
        if len(have) != len(parameters):
            problems.append(f"{name}{have}: the protocol passes {len(parameters)} arguments {parameters}")
    compile_parameters = tuple(inspect.signature(module.compile).parameters) if hasattr(module, "compile") else ()
    if compile_parameters and len(compile_parameters) != 5:
        problems.append(f"compile{compile_parameters}: the protocol passes (source, precision, options, dest, context)")
    return problems
