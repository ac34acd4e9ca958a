"""The build recipe: which model, which targets and precisions, which shapes, how to validate.

A recipe is a TOML file validated by pydantic (unknown keys and wrong types are errors, not
warnings), or the defaults plus command-line overrides. Everything the build does is decided here,
so the recipe (dumped into the manifest) is the record of how an artifact was made.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffship.accelerations import AccelerationGrid
from diffship.clients import NAMES as CLIENT_NAMES
from diffship.compress.steps import Step
from diffship.errors import DiffshipError

# Prompts the default model (digits-sd) draws; for random-weight models any prompt does.
DEFAULT_PROMPTS = (
    "a handwritten digit seven",
    "the number three",
)


# Every digit, so that what learns from these prompts (distillation, QAT) sees all ten.
DEFAULT_CALIBRATION_PROMPTS = tuple(f"a handwritten digit {w}" for w in (
    "seven", "three", "zero", "one", "two", "four", "five", "six", "eight", "nine"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)


class TargetRecipe(_Strict):
    """One backend and the precisions to build for it; `options` go to the target's own options type."""

    name: str
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class ExportRecipe(_Strict):
    """How components become ONNX. `streamed` traces a component without its weights and writes them from its
    safetensors one tensor at a time (true, false, or "auto": where a one-pass export would not fit in memory)."""

    opset: int = Field(17, ge=14, le=20)
    streamed: bool | Literal["auto"] = "auto"
    # a streamed export keeps BF16 / FP16 weights as the checkpoint stores them, each read through a Cast to FP32:
    # the same values in half the bytes (a 12B transformer's ONNX: 24 GB instead of 48)
    stored_weights: bool = False


class CompileRecipe(_Strict):
    """How components are compiled: `isolate` runs each compile in a child process of its own (true, false, or
    "auto": components of 2 GiB of weights or more), so a full-size stage's heap is returned before the next."""

    isolate: bool | Literal["auto"] = "auto"


def _check_range(value: tuple[int, int], what: str) -> tuple[int, int]:
    low, high = value
    if low < 1:
        raise ValueError(f"{what} must be at least 1, got {low}")
    if low > high:
        raise ValueError(f"{what} range [{low}, {high}] has min > max")
    return value


class ShapesRecipe(_Strict):
    """The batch sizes and resolutions (pixels, [min, max]) the artifacts must serve; None: derived from the model."""

    batch: tuple[int, int] = (1, 4)
    height: tuple[int, int] | None = None
    width: tuple[int, int] | None = None

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: tuple[int, int]) -> tuple[int, int]:
        return _check_range(value, "batch")

    @field_validator("height", "width")
    @classmethod
    def _pixels(cls, value: tuple[int, int] | None, info: Any) -> tuple[int, int] | None:
        if value is None:
            return None
        _check_range(value, info.field_name)
        for side in value:
            if side % 8:
                raise ValueError(f"{info.field_name} {side} is not a multiple of 8 pixels")
        return value


class ParityCase(_Strict):
    """One component-parity input: batch size and image resolution in pixels."""

    batch: int = Field(ge=1)
    height: int = Field(ge=8, multiple_of=8)
    width: int = Field(ge=8, multiple_of=8)


class LatencyRecipe(_Strict):
    """The latency harness: warm-up runs, then timed runs, baseline and target interleaved."""

    enabled: bool = True
    warmup: int = Field(1, ge=0)
    runs: int = Field(3, ge=1)
    pipeline_runs: int = Field(2, ge=1)


class QualityRecipe(_Strict):
    """Image quality for models that declare a quality check (digits-sd): prompt accuracy over every digit x seed,
    generated at `steps`. An artifact fails when its accuracy is more than `max_drop_points` below PyTorch's, or
    below `min_prompt_accuracy` (so a model that no longer draws digits fails even when PyTorch agrees)."""

    enabled: bool = True
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(5.0, ge=0)
    max_drop_points: float = Field(5.0, ge=0, le=100)
    min_prompt_accuracy: float = Field(0.8, ge=0, le=1)


class ValidationRecipe(_Strict):
    """End-to-end images (prompts x seeds at one resolution), component parity cases, and latency."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    negative_prompt: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    height: int | None = Field(None, ge=8, multiple_of=8)
    width: int | None = Field(None, ge=8, multiple_of=8)
    parity_cases: list[ParityCase] | None = None
    # img2img and inpaint: the init image and mask (white = repaint), relative to the recipe; generated if unset
    image: Path | None = None
    mask: Path | None = None
    strength: float = Field(0.75, gt=0, le=1)
    # the sampler, baseline and artifacts alike: a common name (euler-a, dpm++2m-karras, ...) or a diffusers class
    scheduler: str | None = None
    scheduler_config: dict[str, Any] = Field(default_factory=dict)
    # with ControlNets: the control image every net gets (relative to the recipe; generated if unset), its
    # conditioning scale and the fraction of the steps it acts in (diffusers' control_guidance_start / end)
    control_image: Path | None = None
    control_scale: float = Field(1.0, ge=0)
    control_start: float = Field(0.0, ge=0, le=1)
    control_end: float = Field(1.0, ge=0, le=1)
    latency: LatencyRecipe = Field(default_factory=LatencyRecipe)
    quality: QualityRecipe = Field(default_factory=QualityRecipe)
    # The PyTorch baseline beside each artifact set (false), or recorded once and freed before the sets load, with
    # latency timed in blocks (true: a full-size SDXL on 24 GiB); "auto" stages when both would not fit in memory.
    staged: bool | Literal["auto"] = "auto"
    # The baseline's modules too large to hold (T5-XXL, a 12B transformer) run block by block, each block's weights
    # read from the model's safetensors as it is called (true, false, or "auto": above 60 % of the memory budget)
    streamed_reference: bool | Literal["auto"] = "auto"
    # Where the sets ship: each named client loads the sets of its target and draws the first sample there
    # (diffship/clients); [] leaves the step out.
    clients: list[str] = Field(default_factory=lambda: list(CLIENT_NAMES))

    @field_validator("clients")
    @classmethod
    def _known_clients(cls, value: list[str]) -> list[str]:
        if unknown := [c for c in value if c not in CLIENT_NAMES]:
            raise ValueError(f"unknown client(s) {', '.join(unknown)}; choose from {', '.join(CLIENT_NAMES)}")
        return value

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("prompts must not be empty strings")
        return value


class Threshold(_Strict):
    """What an artifact of one precision must reach: per-output parity and per-image similarity to the baseline."""

    min_cosine: float = Field(ge=-1, le=1)
    max_rel_l2: float = Field(ge=0)
    min_psnr: float
    min_ssim: float = Field(ge=-1, le=1)


DEFAULT_THRESHOLDS = {
    "fp32": Threshold(min_cosine=0.99999, max_rel_l2=1e-4, min_psnr=40.0, min_ssim=0.98),
    "tf32": Threshold(min_cosine=0.9999, max_rel_l2=1e-2, min_psnr=35.0, min_ssim=0.95),
    "fp16": Threshold(min_cosine=0.999, max_rel_l2=5e-2, min_psnr=30.0, min_ssim=0.9),
    "bf16": Threshold(min_cosine=0.995, max_rel_l2=0.1, min_psnr=25.0, min_ssim=0.85),
    "int8": Threshold(min_cosine=0.99, max_rel_l2=0.15, min_psnr=20.0, min_ssim=0.7),
    "fp8": Threshold(min_cosine=0.99, max_rel_l2=0.15, min_psnr=20.0, min_ssim=0.7),
    "palette6": Threshold(min_cosine=0.99, max_rel_l2=0.15, min_psnr=20.0, min_ssim=0.7),
    "palette4": Threshold(min_cosine=0.98, max_rel_l2=0.2, min_psnr=18.0, min_ssim=0.6),
    "int4": Threshold(min_cosine=0.98, max_rel_l2=0.2, min_psnr=18.0, min_ssim=0.6),
}


class BudgetRecipe(_Strict):
    """The quality a recommended image must keep (`[budget]`): an accelerated one its PSNR and SSIM against the FP32
    baseline's image of the same seed and, for models with a quality check (digits-sd), how far its prompt accuracy
    may fall below PyTorch's; a set's own loop its precision's gates and, where given, a real-step cosine. The build's
    verdict stays its sets' gates; the budget picks `recommended`."""

    min_psnr: float = 30.0
    min_ssim: float = Field(0.9, ge=-1, le=1)
    max_accuracy_drop: float = Field(2.0, ge=0, le=100)
    # an exact set's denoiser on the baseline's real steps (cosine), beyond its precision's gate; None: the gate alone
    min_step_cosine: float | None = Field(None, ge=-1, le=1)


class CalibrationRecipe(_Strict):
    """Inputs for INT8 calibration, distillation and QAT: prompts run through the PyTorch pipeline, capturing the
    UNet's inputs (in turn: INT8 calibration takes as many generations as `samples` needs, distillation many)."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_CALIBRATION_PROMPTS), min_length=1)
    samples: int = Field(16, ge=1)
    # None: the validation's step count. Latents drift with the number of steps (on random-weight models their
    # spread grows from 1.8 at 3 steps to 6.5 at 20), so ranges calibrated on shorter generations clip the late
    # steps of longer ones (tiny-sd int8-hybrid at 20 steps: real-step cosine 0.977 calibrated at 8, 0.9925 at 20).
    steps: int | None = Field(None, ge=1)

    def steps_for(self, validation_steps: int) -> int:
        """The step count calibration generations run at."""
        return self.steps or validation_steps


class Int8AutoRecipe(_Strict):
    """The accuracy-aware INT8 search: how long it may take, and how far inside the INT8 threshold it aims (0: at
    the threshold, 1: perfect), because the build's gate is then checked on another trajectory."""

    time_limit_minutes: float = Field(60.0, gt=0)
    margin: float = Field(0.1, ge=0, lt=1)


class LoraRecipe(_Strict):
    """A LoRA merged into the model before export: its file (relative to the recipe) and scale."""

    path: Path
    scale: float = 1.0


class Recipe(_Strict):
    """A whole build."""

    model: str = "digits-sd"
    # a single-file checkpoint's configuration, a shipped name or a folder; the recipe key is `model_config`
    # (pydantic reserves that attribute name)
    checkpoint_config: str | None = Field(None, alias="model_config")
    variant: str | None = None  # weight files to load, e.g. fp16 (*.fp16.safetensors)
    loras: list[LoraRecipe] = Field(default_factory=list)  # merged in order before export (build and baseline alike)
    # ControlNet folders (relative to the recipe) or hub ids: each exported as its own component, with a UNet variant
    # that takes their residuals, validated end to end against diffusers' ControlNet pipeline
    controlnets: list[str] = Field(default_factory=list)
    components: list[str] | None = None
    targets: list[TargetRecipe] = Field(default_factory=lambda: [TargetRecipe(name="onnxruntime")], min_length=1)
    export: ExportRecipe = Field(default_factory=ExportRecipe)
    compile: CompileRecipe = Field(default_factory=CompileRecipe)
    shapes: ShapesRecipe = Field(default_factory=ShapesRecipe)
    validation: ValidationRecipe = Field(default_factory=ValidationRecipe)
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    calibration: CalibrationRecipe = Field(default_factory=CalibrationRecipe)
    int8_auto: Int8AutoRecipe = Field(default_factory=Int8AutoRecipe)
    compress: list[Step] = Field(default_factory=list)
    # pipeline accelerations measured on every set (each alone and all together), judged by `budget`
    accelerations: AccelerationGrid = Field(default_factory=AccelerationGrid)
    budget: BudgetRecipe = Field(default_factory=BudgetRecipe)
    allow_pickle: bool = False
    # the memory the build may use, in GiB (default: what the machine has available as it starts); a stage estimated
    # to need more is refused before any work (stages/preflight.py)
    memory_gib: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        batch_low, batch_high = self.shapes.batch
        v = self.validation
        for case in v.parity_cases or []:
            if not batch_low <= case.batch <= batch_high:
                raise ValueError(f"parity case batch {case.batch} is outside shapes.batch [{batch_low}, {batch_high}]")
        for side in ("height", "width"):
            allowed, wanted = getattr(self.shapes, side), getattr(v, side)
            if allowed and wanted and not allowed[0] <= wanted <= allowed[1]:
                raise ValueError(f"validation.{side} {wanted} is outside shapes.{side} {list(allowed)}")
        return self

    def threshold(self, precision: str) -> Threshold:
        """The recipe's threshold for `precision` (e.g. `int8-hybrid`), else for its family (`int8`), else the default."""
        family = precision.split("-")[0]
        for table in (self.thresholds, DEFAULT_THRESHOLDS):
            for key in (precision, family):
                if key in table:
                    return table[key]
        raise DiffshipError(f"No threshold for precision {precision!r}: add [thresholds.{precision}] to the recipe.")


def with_budget(recipe: Recipe, settings: dict[str, Any]) -> Recipe:
    """`recipe` with `settings` (`--budget`) replacing those keys of its budget."""
    try:
        budget = BudgetRecipe.model_validate({**recipe.budget.model_dump(), **settings})
    except ValidationError as exc:
        raise _explain(exc, "--budget") from None
    return recipe.model_copy(update={"budget": budget})


def _explain(exc: ValidationError, where: str) -> DiffshipError:
    problems = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{location}: {message}")
    return DiffshipError(f"Invalid recipe {where}: " + "; ".join(problems))


def parse_recipe(data: dict[str, Any], where: str = "(built from options)") -> Recipe:
    """A validated Recipe from plain data, with every problem listed in one error."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, where) from None


def load_recipe(path: Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a TOML recipe (or start from the defaults) and apply command-line overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path, "Recipe")
    return recipe_from_data(data, path.parent if path is not None else None, str(path) if path else "(built from options)",
                            overrides)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's tables, or a DiffshipError saying it is missing or invalid."""
    if not path.is_file():
        raise DiffshipError(f"{what} {path} does not exist.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DiffshipError(f"{what} {path} is not valid TOML: {exc}") from exc


def recipe_from_data(data: dict[str, Any], base: Path | None, where: str,
                     overrides: dict[str, Any] | None = None) -> Recipe:
    """A recipe from a TOML table whose relative paths (images, LoRAs, ControlNets, configs) are relative to `base`."""
    data = dict(data)
    validation = data.get("validation")
    if base is not None and isinstance(validation, dict):
        validation = data["validation"] = dict(validation)
        for key in ("image", "mask", "control_image"):
            if isinstance(validation.get(key), str):
                validation[key] = str(base / validation[key])
    if base is not None and isinstance(data.get("loras"), list):
        data["loras"] = [{**lora, "path": str(base / lora["path"])}
                         if isinstance(lora, dict) and isinstance(lora.get("path"), str) else lora
                         for lora in data["loras"]]
    if base is not None and isinstance(data.get("controlnets"), list):
        data["controlnets"] = [str(base / c) if isinstance(c, str) and (base / c).is_dir() else c
                               for c in data["controlnets"]]
    accelerations = data.get("accelerations")
    if base is not None and isinstance(accelerations, dict) and isinstance(accelerations.get("vae_decoder"), str):
        data["accelerations"] = {**accelerations, "vae_decoder": str(base / accelerations["vae_decoder"])}
    if base is not None and isinstance(data.get("model_config"), str) and (base / data["model_config"]).is_dir():
        data["model_config"] = str(base / data["model_config"])
    overrides = dict(overrides or {})
    if overrides.get("targets") is not None and isinstance(data.get("targets"), list):
        overrides["targets"] = _with_recipe_options(overrides["targets"], data["targets"])
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    return parse_recipe(data, where)


def _with_recipe_options(chosen: list[dict[str, Any]], recipe_targets: list[Any]) -> list[dict[str, Any]]:
    """The command line's targets, each with the `options` the recipe gives the target of that name: `--targets`
    chooses what to build, the recipe still says how."""
    options = {t.get("name"): t["options"] for t in recipe_targets if isinstance(t, dict) and "options" in t}
    return [{**t, "options": options[t["name"]]} if t.get("name") in options and "options" not in t else t
            for t in chosen]


def targets_from_cli(values: list[str]) -> list[dict[str, Any]]:
    """`onnxruntime:fp32,fp16` / `onnxruntime` strings as target recipes (precisions grouped per name)."""
    grouped: dict[str, list[str]] = {}
    for value in values:
        name, _, precisions = value.partition(":")
        grouped.setdefault(name.strip(), []).extend(p.strip() for p in precisions.split("+") if p.strip())
    return [{"name": n, **({"precisions": p} if p else {})} for n, p in grouped.items()]
