"""What a pipeline family declares, and the folder readers every family's detection uses.

A family is data: its text encoders and tokenizers, the diffusers pipeline that is its baseline per task (and the
`_class_name` its deployed folders declare), the pipeline classes that may name it in model_index.json, its denoiser
(a `Denoiser`: which component, how it is wrapped, fed and sized) and how that denoiser is conditioned. Runtime,
baseline, capture, validation and targets read these fields; none names a family or a denoiser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffship.errors import DiffshipError
from diffship.store.artifacts import read_json

if TYPE_CHECKING:
    from diffship.models.specs import TensorSpec

MAX_T5_TOKENS = 512  # the longest max_sequence_length SD3's and Flux's pipelines take
Role = Literal["text_encoder", "denoiser", "vae_encoder", "vae_decoder", "controlnet", "controlled_denoiser",
               "caching_denoiser", "shallow_denoiser"]
Task = Literal["text2img", "img2img", "inpaint", "controlnet"]


@dataclass(frozen=True)
class SensitiveLayers:
    """Layer-name fragments INT8 treats with care, by what each quantizer does with them (each list is what its
    consumer was validated with; a new denoiser declares its own)."""

    kept_float: tuple[str, ...]  # fixed recipes keep them in float (OpenVINO int8-hybrid's ignored scope)
    searched_first: tuple[str, ...]  # int8-auto's search and ONNX Runtime's static INT8 try these first
    trained_float: tuple[str, ...]  # QAT and quanto leave these unquantized


@dataclass(frozen=True)
class Denoiser:
    """The model that denoises the latents, as its family declares it: the component (its pipeline folder and the
    pipeline's attribute), how diffship wraps, feeds and sizes it, and what INT8 keeps in float."""

    component: str  # folder, pipeline attribute and component name
    title: str  # for messages and the report
    inputs: Callable[[dict[str, Any], Family], tuple[TensorSpec, ...]] = field(repr=False)  # (config, family)
    outputs: Callable[[dict[str, Any]], tuple[TensorSpec, ...]] = field(repr=False)
    wrap: Callable[[Any, tuple[str, ...]], Any] = field(repr=False)  # (module, input names) -> tensor-only wrapper
    # one call diffusers' pipelines make to it (args, kwargs) -> its named inputs, and the ControlNet residuals given
    call_inputs: Callable[[tuple[Any, ...], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] = field(repr=False)
    sensitive: SensitiveLayers
    latent_multiple: int  # its height and width in latent pixels must divide by this
    default_sample_size: int  # latent side when its config names none
    onnx_model_type: str  # onnxruntime.transformers' optimizer model type for its graph
    # ControlNets, where the denoiser takes them: the residuals one adds and the wrappers of both sides.
    residuals: Callable[[dict[str, Any]], tuple[TensorSpec, ...]] | None = field(default=None, repr=False)
    wrap_controlled: Callable[[Any, tuple[str, ...]], Any] | None = field(default=None, repr=False)
    wrap_controlnet: Callable[[Any, tuple[str, ...]], Any] | None = field(default=None, repr=False)
    controlnet_class: str | None = None  # the diffusers class of its ControlNets
    # Deep-feature caching, where its structure allows it: the features a shallow step reuses at a depth, (config,
    # depth) -> their spec, and the wrappers (module, input names, depth) of the caching and the shallow graph.
    cache_features: Callable[[dict[str, Any], int], TensorSpec] | None = field(default=None, repr=False)
    wrap_caching: Callable[[Any, tuple[str, ...], int], Any] | None = field(default=None, repr=False)
    wrap_shallow: Callable[[Any, tuple[str, ...], int], Any] | None = field(default=None, repr=False)
    controlnet_fits: tuple[str, ...] = ()  # config keys a ControlNet must share with it
    timestep_scale: float = 1000.0  # its timesteps run over [0, this] (Flux's pipeline passes t / 1000)
    packed_latents: bool = False  # takes the latents as tokens of 2x2 patches (Flux): images need no 4-D latents
    # its schedulers step through whole timesteps, which clients (OpenVINO GenAI) feed as i64; flow matching's are
    # fractions of 1000
    whole_timesteps: bool = True
    # its graph embeds the raw timestep as diffusers' `get_timestep_embedding` with its config's flip / shift, so the
    # mobile target may compute that on the host (the UNet's; Flux scales t by 1000 and embeds its guidance alike)
    host_embedding: bool = False
    guidance_doubles_batch: bool = True  # classifier-free guidance runs both halves in one call (not Flux's embedded)
    # What its export needs patched (numerically the same ops in forms the TorchScript exporter writes at opset 17)
    export_patches: Callable[[], AbstractContextManager[Any]] | None = field(default=None, repr=False)

    @property
    def controlled(self) -> str:
        """The component name of its variant taking ControlNet residuals."""
        return f"controlled_{self.component}"

    def caching(self, depth: int) -> str:
        """The component name of its graph that also returns the deep features cached at `depth`."""
        return f"caching_{self.component}_d{depth}"

    def shallow(self, depth: int) -> str:
        """The component name of its graph that runs the outer `depth` blocks on cached deep features."""
        return f"shallow_{self.component}_d{depth}"

    def in_channels(self, config: dict[str, Any]) -> int:
        """Its input channels (as the config gives them: a mistyped config fails where the model is built, which
        names the file)."""
        channels: int = config.get("in_channels", 4)
        return channels

    def native_size(self, config: dict[str, Any], vae_scale: int) -> int:
        """The image side (pixels) its pipeline was trained at: the latent sample size times the VAE's scale."""
        side: int = config.get("sample_size", self.default_sample_size) * vae_scale
        return side


@dataclass(frozen=True)
class Family:
    """One pipeline kind (SD 1.x, SD 2.x, SDXL base, SDXL refiner), declared once."""

    name: str  # the key in cache keys and manifests: "sd1", "sd2", "sdxl", "sdxl-refiner"
    title: str
    short: str  # for messages: "SD 1.x", "SDXL"
    text_encoders: tuple[str, ...]  # pipeline folders, in the order their hidden states are concatenated
    tokenizers: tuple[str, ...]  # one per text encoder
    pipelines: Mapping[str, str]  # task -> the diffusers pipeline class that is the baseline for it
    declared_by: frozenset[str]  # model_index.json `_class_name`s that may hold this kind
    matches: Callable[[Path, dict[str, Any]], bool] = field(repr=False)  # (folder, model_index) -> is this kind
    denoiser: Denoiser
    tokenizer_classes: tuple[str, ...]  # the transformers class of each tokenizer
    hidden_state: str = "last_hidden_state"  # the text encoder output the denoiser cross-attends to
    pooled_from: str | None = None  # the text encoder whose projected pooled output is the denoiser's text_embeds
    time_ids: int = 0  # SDXL micro-conditioning values per sample (6: sizes and crop; 5: the refiner's aesthetics)
    vae_overflows_fp16: bool = False  # its VAE's activations exceed FP16's range (SDXL): kept FP32 under "auto"
    controlnet_pipeline: str | None = None  # the diffusers pipeline that runs its ControlNets (the "controlnet" task)
    projected: tuple[str, ...] = ()  # text encoders besides `pooled_from` whose projected pooled output it reads (SD3)
    optional_encoders: tuple[str, ...] = ()  # text encoders a folder may leave out (SD3's T5), as diffusers allows
    # transformer-only single files of this family: diffusers' names for them (`infer_diffusers_model_type`) and
    # tensor-name fragments that tell them at any width (diffusers tells some by their full-size widths only)
    checkpoint_types: tuple[str, ...] = ()
    checkpoint_marks: tuple[str, ...] = ()
    negative_prompts: bool = True  # Flux's embedded guidance has no negative half: a negative prompt does nothing
    t5_tokens: int = 0  # T5's tokens at the pipeline's default max_sequence_length (0: no T5)
    clip_tokens: int = 77  # CLIP's tokens in the denoiser's text sequence (Flux reads only CLIP's pooled output)
    # Whose denoising loop runs the deployed pipeline: diffship's own (the UNet families: ControlNets, the web app's
    # port) or diffusers' pipeline class over runner-backed modules (flow matching, packed latents, position ids).
    loop: Literal["diffship", "diffusers"] = "diffship"

    @property
    def denoiser_sequence(self) -> tuple[int, int, int]:
        """The denoiser's text tokens at least (one T5 token), at the pipeline's default, and at most (T5's 512,
        which diffusers' pipelines allow at most); CLIP's fixed 77 without T5."""
        if not self.t5_tokens:
            return self.clip_tokens, self.clip_tokens, self.clip_tokens
        return self.clip_tokens + 1, self.clip_tokens + self.t5_tokens, self.clip_tokens + MAX_T5_TOKENS

    @property
    def aesthetic_conditioning(self) -> bool:
        """Whether the time ids carry an aesthetic score (the SDXL refiner's 5) instead of a target size."""
        return self.time_ids == 5

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.pipelines)

    def encoders_in(self, folder: Path) -> tuple[str, ...]:
        """Its text encoders the folder has: all but the optional ones it leaves out (model_index.json [null, null])."""
        index = read_model_index(folder)
        return tuple(name for name in self.text_encoders
                     if name not in self.optional_encoders or has_component(index, name))

    def tokenizers_in(self, folder: Path) -> tuple[tuple[str, str], ...]:
        """(tokenizer folder, transformers class) of each text encoder the folder has."""
        present = self.encoders_in(folder)
        return tuple((t, kind) for e, t, kind in zip(self.text_encoders, self.tokenizers, self.tokenizer_classes,
                                                     strict=True) if e in present)

    def denoiser_config(self, folder: Path) -> dict[str, Any]:
        """config.json of the folder's denoiser."""
        return component_config(folder, self.denoiser.component)

    def tasks_for(self, denoiser_channels: int, latent_channels: int) -> tuple[str, ...]:
        """What a model of this family can do: an inpainting denoiser (latents + mask + masked-image latents as
        input channels) only inpaints."""
        return ("inpaint",) if denoiser_channels == 2 * latent_channels + 1 else self.tasks

    def time_id_values(self, height: int, width: int, aesthetic_score: float = 6.0) -> list[float]:
        """The time ids diffusers builds for an image of height x width with no crop (original = target size)."""
        if self.time_ids == 6:
            return [height, width, 0, 0, height, width]
        if self.time_ids == 5:
            return [height, width, 0, 0, aesthetic_score]
        return []


CONTROLNET = "controlnet"


def controlnet_names(count: int) -> list[str]:
    """The pipeline folders of `count` ControlNets, as diffusers' MultiControlNetModel saves them."""
    return [CONTROLNET if i == 0 else f"{CONTROLNET}_{i}" for i in range(count)]


def controlnets_in(folder: Path) -> list[str]:
    """The ControlNet folders of a pipeline folder, in order."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return [name for name in controlnet_names(len(index)) if name in index]


def read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, or an error saying this is not a diffusers pipeline folder."""
    if not (folder / "model_index.json").is_file():
        raise DiffshipError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. "
            "Point --model at the folder written by `DiffusionPipeline.save_pretrained` (the one with "
            "model_index.json, unet/, vae/, text_encoder/), or use a built-in name (see `diffship models`)."
        )
    return read_json(folder / "model_index.json")


def component_config(folder: Path, component: str) -> dict[str, Any]:
    """config.json of one component folder, with a clear error if the component is absent."""
    path = folder / component / "config.json"
    if not path.is_file():
        raise DiffshipError(
            f"{folder} is missing the `{component}` component ({component}/config.json not found); "
            "a Stable Diffusion pipeline folder needs it."
        )
    return read_json(path)


def has_component(index: dict[str, Any], component: str) -> bool:
    """Whether model_index.json lists `component` with a class (diffusers writes [null, null] for an absent one)."""
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def prediction_type(folder: Path) -> str:
    """epsilon or v_prediction, from the scheduler config (SD 2.x 768 models predict v)."""
    path = folder / "scheduler" / "scheduler_config.json"
    return read_json(path).get("prediction_type", "epsilon") if path.is_file() else "epsilon"
