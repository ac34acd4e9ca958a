"""The deployed pipeline of a family whose denoising loop is diffusers' own (SD3, Flux): diffusers' pipeline class
for the task, built over stand-ins that run the artifacts through Runners.

Flow matching, the shifted sigmas, Flux's 2x2 packing, position ids and embedded guidance, SD3's three encoders
and a folder without T5 are then diffusers' code by construction, not a copy of it; for the same seed the
pipeline draws diffusers' image, as optimum-intel's OpenVINO pipelines do over the same classes. Each stand-in
offers what these pipelines read of a module: its config, dtype and device, and its call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput, Transformer2DModelOutput

from diffship.accelerations import Accelerations, denoiser_graph
from diffship.errors import DiffshipError
from diffship.models.families import MAX_T5_TOKENS, Denoiser, denoiser_of
from diffship.models.loading import quiet_libraries
from diffship.runtime.accelerated import DenoiserCalls, cache_graphs
from diffship.runtime.generation import Generation, truncation_warnings, uint8_images
from diffship.runtime.tasks import accepted_by
from diffship.store.artifacts import read_json
from diffship.targets.runner import Runner

if TYPE_CHECKING:
    from diffship.runtime.pipeline import DeployedPipeline

# Pipeline arguments diffship never uses: no safety checker, no watermark, no IP-Adapter image encoder.
UNUSED = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False,
          "add_watermarker": False}


def pipeline_of(pipeline_class: type, modules: dict[str, Any], index: dict[str, Any]) -> Any:
    """An instance of `pipeline_class` over the loaded modules: absent optional modules None (an SDXL refiner has
    no first text encoder, an SD3 folder may have no T5), and the flags model_index.json records
    (`force_zeros_for_empty_prompt`, `requires_aesthetics_score`) as the folder's pipeline was saved with them."""
    accepted = inspect.signature(pipeline_class.__init__).parameters
    kwargs = {name: modules.get(name) for name in accepted
              if name in modules or name.startswith(("text_encoder", "tokenizer"))}
    kwargs |= {k: v for k, v in index.items() if k in accepted and not k.startswith("_") and not isinstance(v, list)}
    kwargs |= {k: v for k, v in UNUSED.items() if k in accepted}
    return pipeline_class(**kwargs)


def pipeline_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Initial latents (batch, channels, height, width), as diffusers draws them, in the form `pipe` takes them:
    packed into 2x2-patch tokens for a denoiser that reads tokens (Flux packs its own draw the same way)."""
    if denoiser_of(pipe).packed_latents and latents.ndim == 4:
        return pipe._pack_latents(latents, *latents.shape)
    return latents


def decoder_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What the VAE decoder is given for the pipeline's final `latents` (output_type="latent"): unpacked where they
    are tokens, then unscaled and shifted back as the pipeline does before decoding."""
    if denoiser_of(pipe).packed_latents:
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    config = pipe.vae.config
    return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


def denoiser_call(denoiser: Denoiser, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One call diffusers makes to the denoiser as its named inputs (the timestep as one float per batch row, as the
    exported graphs take it) and the ControlNet residuals it was given: what the stand runs and capture records."""
    inputs, residuals = denoiser.call_inputs(args, kwargs)
    batch = next(iter(inputs.values())).shape[0]  # the latents come first
    inputs["timestep"] = torch.as_tensor(inputs["timestep"]).float().reshape(-1).expand(batch)
    return inputs, residuals


@dataclass
class Clock:
    """Seconds spent in each kind of module call during one generation."""

    text: float = 0.0
    steps: list[float] = field(default_factory=list)
    decode: float = 0.0


class Stand:
    """What diffusers' pipelines read of any module: config (attribute access), dtype, device, its submodules."""

    def __init__(self, config: dict[str, Any], clock: Clock):
        self.config, self.clock = FrozenDict(config), clock
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def modules(self) -> Iterator[Stand]:  # diffusers looks for offload hooks on every submodule
        yield self


class EncoderOutput:
    """A text encoder's named outputs as transformers returns them: `[0]` is the projected pooled embedding where
    the encoder has one, else the last hidden state; `.hidden_states` every layer's (or the two the pipeline reads)."""

    def __init__(self, values: dict[str, np.ndarray]):
        self.values = {k: torch.from_numpy(np.asarray(v)) for k, v in values.items()}

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != 0:
            raise IndexError(index)
        return self.values.get("text_embeds", self.values["last_hidden_state"])

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__["values"]
        if name == "hidden_states":
            layers = sorted((k for k in values if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
            return tuple(values[k] for k in layers) if layers else (values["penultimate_hidden_state"],
                                                                    values["last_hidden_state"])
        if name in values:
            return values[name]
        raise AttributeError(name)


class TextEncoderStand(Stand):
    """A text encoder: input ids in, its outputs as transformers' model returns them (`EncoderOutput`)."""

    def __init__(self, runner: Runner, config: dict[str, Any], clock: Clock):
        super().__init__(config, clock)
        self.runner = runner

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> EncoderOutput:
        started = time.perf_counter()
        out = EncoderOutput(self.runner.run({"input_ids": input_ids.numpy().astype(np.int32)}))
        self.clock.text += time.perf_counter() - started
        return out


class DenoiserStand(Stand):
    """The transformer: diffusers' keyword call in, the prediction out (`return_dict` as diffusers asks); under
    block caching, the caching or the shallow graph as the schedule says for this call (one call a step)."""

    def __init__(self, calls: DenoiserCalls, config: dict[str, Any], denoiser: Denoiser, clock: Clock):
        super().__init__(config, clock)
        self.calls, self.denoiser = calls, denoiser

    def cache_context(self, name: str) -> Any:  # diffusers' step caches (FirstBlockCache ...): none on a graph
        return nullcontext()

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        started = time.perf_counter()
        inputs, _ = denoiser_call(self.denoiser, args, kwargs)
        feed = {k: np.ascontiguousarray(v.detach().float().numpy()) for k, v in inputs.items()}
        out = torch.from_numpy(self.calls.run(denoiser_graph(len(self.clock.steps), self.calls.deep_cache), feed))
        self.clock.steps.append(time.perf_counter() - started)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class VaeStand(Stand):
    """The VAE: `encode` to diffusers' latent distribution, `decode` to the image, over the two exported halves."""

    def __init__(self, decoder: Runner, encoder: Runner | None, config: dict[str, Any], clock: Clock):
        super().__init__(config, clock)
        self.decoder, self.encoder = decoder, encoder

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        if self.encoder is None:
            raise RuntimeError("no vae_encoder artifact")  # DeployedPipeline refuses the task before this
        parameters = self.encoder.run({"sample": x.float().numpy()})["latent_parameters"]
        dist = DiagonalGaussianDistribution(torch.from_numpy(parameters))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        started = time.perf_counter()
        sample = torch.from_numpy(self.decoder.run({"latent_sample": z.float().numpy()})["sample"])
        self.clock.decode += time.perf_counter() - started
        return DecoderOutput(sample=sample) if return_dict else (sample,)


def task_pipeline(deployed: DeployedPipeline, task: str, clock: Clock, accelerations: Accelerations | None = None) -> Any:
    """diffusers' pipeline for `task` over stand-ins of the deployed runners (built per call: it is cheap, and
    each generation's clock and cached features are its own)."""
    folder, family = deployed.artifacts.pipeline, deployed.family
    runners = deployed.runners
    modules: dict[str, Any] = {"scheduler": deployed.scheduler}
    for name, tokenizer_name in zip(family.text_encoders, family.tokenizers, strict=True):
        if name in runners:
            modules[name] = TextEncoderStand(runners[name], read_json(folder / name / "config.json"), clock)
            modules[tokenizer_name] = deployed.tokenizer_of[tokenizer_name]
    component = family.denoiser.component
    calls = DenoiserCalls(deployed.runner, component, None, False, accelerations,
                          cache_graphs(deployed.artifacts, family.denoiser, accelerations))
    modules[component] = DenoiserStand(calls, deployed.denoiser_config, family.denoiser, clock)
    modules["vae"] = VaeStand(runners["vae_decoder"], runners.get("vae_encoder"), deployed.vae_config, clock)
    quiet_libraries()  # importing a pipeline class imports transformers' image processors, which warn
    pipe = pipeline_of(getattr(diffusers, family.pipelines[task]), modules, read_json(folder / "model_index.json"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(deployed: DeployedPipeline, task: str, prompts: list[str], negatives: list[str] | None,
             height: int | None, width: int | None, steps: int, guidance_scale: float, seed: int, batch: int,
             latents: torch.Tensor | None, on_step: Callable[[int, int], None] | None, image: Any, mask: Any,
             strength: float | None, controls: list[Any] | None, max_sequence_length: int | None,
             accelerations: Accelerations | None = None) -> Generation:
    """One call of diffusers' pipeline for `task` over the artifacts, timed as the runtime's own loop is (text
    encoders, each denoiser call, decode, total). Images are the model's native size unless given, an init image
    resized to it, as these families' diffusers pipelines do (the UNet loop draws at the init image's size)."""
    family = deployed.family
    if controls:
        raise DiffshipError(f"diffship builds no ControlNets for {family.short} yet; generate without control images.")
    if negatives and not family.negative_prompts:
        raise DiffshipError(f"{family.title} has no classifier-free guidance here (its guidance is embedded in the "
                            "transformer): a negative prompt would be ignored, so it is refused.")
    height, width = height or deployed.native_resolution[0], width or deployed.native_resolution[1]
    deployed.check_request(len(prompts) * batch, height, width)
    if steps < 1:
        raise DiffshipError(f"Number of steps must be at least 1, got {steps}.")
    # diffusers' pipelines refuse more than 512; one token is all AOTInductor's dynamic sequence does not take
    if max_sequence_length is not None and not 2 <= max_sequence_length <= MAX_T5_TOKENS:
        raise DiffshipError(f"--max-sequence-length must be 2 to {MAX_T5_TOKENS} T5 tokens, got {max_sequence_length}.")
    task_kwargs = {k: v for k, v in (("image", image), ("mask_image", mask), ("strength", strength)) if v is not None}
    clock = Clock()
    pipe = task_pipeline(deployed, task, clock, accelerations)

    def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_step:
            on_step(i + 1, pipe.num_timesteps)
        return kwargs

    arguments: dict[str, Any] = {"height": height, "width": width, "num_inference_steps": steps,
                                 "guidance_scale": guidance_scale, "num_images_per_prompt": batch,
                                 "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np",
                                 "callback_on_step_end": on_step_end, **task_kwargs}
    if latents is not None:
        arguments["latents"] = pipeline_latents(pipe, latents.to(torch.float32))
    if max_sequence_length is not None:
        arguments["max_sequence_length"] = max_sequence_length
    started = time.perf_counter()
    with torch.inference_mode():
        out = pipe(prompt=prompts, negative_prompt=negatives, **accepted_by(pipe, arguments))
    total = time.perf_counter() - started
    timings = {"steps": clock.steps, "text_encode": clock.text, "decode": clock.decode, "total": total}
    texts = prompts + (negatives or [])
    warnings = [w for name, kind in family.tokenizers_in(deployed.artifacts.pipeline)
                for w in truncation_warnings(deployed.tokenizer_of[name], texts,
                                             (max_sequence_length or family.t5_tokens) if kind.startswith("T5") else None)]
    return Generation(uint8_images(out.images), np.empty(0), timings, warnings)
