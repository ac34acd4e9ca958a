"""A deployed Stable Diffusion pipeline: prompt -> image through Runners only.

It mirrors diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline step for step (prompt
encoding, classifier-free guidance, scheduler, VAE decode and post-processing), with the neural
components replaced by whatever target the artifacts were built for. The scheduler is diffusers'
own, loaded from the artifact folder, so epsilon and v-prediction behave exactly as in diffusers.
Given the same initial latents (or the same seed) it reproduces the diffusers PyTorch pipeline.
"""

from __future__ import annotations

import inspect
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship.accelerations import Accelerations, diffusers_loop_refuses, step_plan
from diffship.errors import DiffshipError
from diffship.host.memory import budget as memory_budget
from diffship.models.families import Family, controlnet_names, family_named
from diffship.runtime import diffusers_loop, inpaint
from diffship.runtime.accelerated import DenoiserCalls, cache_graphs, decoder_for
from diffship.runtime.control import ControlledDenoiser, control_images
from diffship.runtime.generation import Generation, truncation_warnings, uint8_images
from diffship.runtime.img2img import as_array, call_default, init_latents, preprocess, strength_timesteps
from diffship.runtime.lazy_runners import ComponentLoader, pool_for
from diffship.runtime.schedulers import make_scheduler
from diffship.store.artifacts import atomic_write_bytes, read_json
from diffship.store.manifest import ArtifactSet, open_artifacts
from diffship.targets.runner import Runner

DECODER, ENCODER = "vae_decoder", "vae_encoder"


def initial_latents(seed: int, batch: int, channels: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """The latents diffusers draws for `torch.Generator().manual_seed(seed)` on the CPU (before init_noise_sigma)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, channels, latent_height, latent_width), generator=generator, dtype=torch.float32)


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], NCHW -> uint8 NHWC, exactly as diffusers' image processor and numpy_to_pil do."""
    images = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return uint8_images(images)


class DeployedPipeline:
    """Text-to-image over loaded Runners, with the tokenizers, scheduler and configs from the artifact folder."""

    def __init__(self, artifacts: ArtifactSet, runners: dict[str, Runner], load_seconds: dict[str, float],
                 loader: ComponentLoader | None = None):
        import diffusers  # start-up time: diffusers
        import transformers  # start-up time: transformers

        self.artifacts, self.runners, self.load_seconds = artifacts, runners, load_seconds
        # how components asked for later (an acceleration's graphs) load: as the first ones did
        self.loader = loader or ComponentLoader(artifacts, None, None, load_seconds, None)
        folder = artifacts.pipeline
        self.family = pipeline_family(artifacts)
        # an optional encoder left out (SD3's T5) has no tokenizer either
        self.tokenizer_of = {name: getattr(transformers, kind).from_pretrained(folder / name)
                             for name, kind in self.family.tokenizers_in(folder)}
        self.tokenizers = list(self.tokenizer_of.values())
        scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
        scheduler_class = getattr(diffusers, scheduler_config["_class_name"], None)
        if scheduler_class is None:
            raise DiffshipError(f"Unknown scheduler {scheduler_config['_class_name']!r} in {folder / 'scheduler'}.")
        self.scheduler = scheduler_class.from_config(scheduler_config)
        self.denoiser = self.family.denoiser
        self.denoiser_config = self.family.denoiser_config(folder)
        self.vae_config = read_json(folder / "vae_decoder" / "config.json")
        self.force_zeros = bool(read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt", False))
        self.vae_scale = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self.step_takes = self._step_takes()

    def use_scheduler(self, name: str | None, overrides: dict[str, Any] | None = None) -> None:
        """Sample with another scheduler built from the folder's config (`runtime.schedulers`)."""
        self.scheduler = make_scheduler(self.scheduler, name, overrides)
        self.step_takes = self._step_takes()

    def _step_takes(self) -> set[str]:
        step = inspect.signature(self.scheduler.step).parameters
        return {name for name in ("eta", "generator") if name in step}

    @classmethod
    def load(cls, folder: Path, target: str | None = None, precision: str | None = None, verify: bool = True,
             options: Any = None, loras: list[Any] | None = None) -> DeployedPipeline:
        """Open a build or export folder, check its files against the manifest's hashes, and load it (with `loras`
        merged into its weights as they load, where the backend can)."""
        artifacts = open_artifacts(folder, target, precision, verify)
        changes = None
        if loras:
            from diffship.runtime.lora import runtime_changes  # start-up time: diffusers

            changes = runtime_changes(artifacts, loras)
        return cls.from_artifacts(artifacts, options, changes)

    @classmethod
    def from_artifacts(cls, artifacts: ArtifactSet, options: Any = None,
                       changes: dict[str, list[Any]] | None = None, memory: int | None = None) -> DeployedPipeline:
        """Load one Runner per component the pipeline needs, timing each load (with the build's options by default);
        components with weight `changes` (a LoRA at run time, `runtime.lora`) load with them. A set that does not fit
        in `memory` whole (default: the memory budget; `lazy_runners.pool_for`) loads each component when first
        called, one large one at a time (`runtime/lazy_runners.py`)."""
        family = pipeline_family(artifacts)
        needed = [*family.encoders_in(artifacts.pipeline), family.denoiser.component, DECODER]
        missing = [c for c in needed if c not in artifacts.components]
        if missing:
            raise DiffshipError(f"{artifacts.root} cannot generate images: it has no {', '.join(missing)} artifact.")
        names = [*needed, *([ENCODER] if ENCODER in artifacts.components else [])]
        seconds: dict[str, float] = {}
        paths = [artifacts.components[name] for name in names]
        pool = pool_for(paths, memory_budget() if memory is None else memory)
        loader = ComponentLoader(artifacts, options, changes, seconds, pool)
        return cls(artifacts, {name: loader(name) for name in names}, seconds, loader)

    @property
    def native_resolution(self) -> tuple[int, int]:
        side = self.denoiser.native_size(self.denoiser_config, self.vae_scale)
        return side, side

    def check_request(self, batch: int, height: int, width: int) -> None:
        """Refuse a batch or resolution the artifacts were not built for, before any work."""
        multiple = self.vae_scale * self.denoiser.latent_multiple
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise DiffshipError(f"Resolution {height}x{width} must be positive multiples of {multiple} pixels for this model.")
        shapes = self.artifacts.shapes
        if not shapes:
            return
        for what, value in (("batch", batch), ("height", height), ("width", width)):
            low, high = shapes[what]
            if not low <= value <= high:
                raise DiffshipError(
                    f"{what} {value} is outside the range these artifacts were built for ({low} to {high}); "
                    "rebuild with wider [shapes] in the recipe."
                )

    # --- text ------------------------------------------------------------------------------------------

    def _ids(self, tokenizer: Any, texts: list[str]) -> np.ndarray:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids
        return ids.astype(np.int32)

    def encode(self, prompts: list[str], negative: list[str] | None, guidance: bool) -> dict[str, np.ndarray]:
        """Denoiser conditioning for the prompts (and the negatives first, under guidance), as diffusers builds it:
        the family's hidden state of each text encoder side by side, and its pooled embedding where it has one."""
        cond = self._encode(prompts)
        if guidance:
            if negative is None and self.force_zeros and self.family.pooled_from:
                uncond = {k: np.zeros_like(v) for k, v in cond.items()}
            else:
                uncond = self._encode(negative or [""] * len(prompts))
            cond = {k: np.concatenate([uncond[k], v]) for k, v in cond.items()}
        return cond

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        outputs = {name: self.runners[name].run({"input_ids": self._ids(tokenizer, texts)})
                   for name, tokenizer in zip(self.family.text_encoders, self.tokenizers, strict=True)}
        hidden = [out[self.family.hidden_state] for out in outputs.values()]
        cond = {"encoder_hidden_states": hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1)}
        if self.family.pooled_from:
            cond["text_embeds"] = outputs[self.family.pooled_from]["text_embeds"]
        return cond

    # --- generation ------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, height: int | None = None,
                 width: int | None = None, steps: int = 20, guidance_scale: float = 7.5, seed: int = 0, batch: int = 1,
                 latents: torch.Tensor | None = None,
                 on_step: Callable[[int, int], None] | None = None, image: Any = None, mask: Any = None,
                 strength: float | None = None, aesthetic_score: float | None = None,
                 negative_aesthetic_score: float | None = None, controls: list[Any] | None = None,
                 max_sequence_length: int | None = None, accelerations: Accelerations | None = None) -> Generation:
        """Generate `batch` images per prompt: from noise; from `image` (img2img); or repainting the white part of
        `mask` over `image` (inpaint). `strength` defaults to diffusers' for the task; `latents` (before
        init_noise_sigma) replace text-to-image's seeded draw; `accelerations` change the denoising loop."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise DiffshipError("No prompt given.")
        negatives = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        if negatives is not None and len(negatives) != len(prompts):
            raise DiffshipError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.")
        task = self._task(image, mask, latents)
        if max_sequence_length is not None and self.family.loop != "diffusers":
            raise DiffshipError(f"--max-sequence-length sets how many tokens T5 reads; a {self.family.title} model has "
                                "no T5 (its CLIP reads 77 tokens).")
        if self.family.loop == "diffusers":  # SD3, Flux: diffusers' pipeline class over the runners
            if accelerations is not None and (unfit := diffusers_loop_refuses(accelerations)):
                raise DiffshipError(f"{unfit} in diffship's own denoising loop; a {self.family.title} model runs "
                                    "diffusers' (block caching runs there: --accelerate deep-cache, or none).")
            return diffusers_loop.generate(self, task, prompts, negatives, height, width, steps, guidance_scale, seed,
                                           batch, latents, on_step, image, mask, strength, controls,
                                           max_sequence_length, accelerations)
        pixels = preprocess(as_array(image), self.vae_scale) if task == "img2img" else None
        native_h, native_w = self.native_resolution if pixels is None else tuple(pixels.shape[-2:])
        height, width = height or native_h, width or native_w
        if pixels is not None and (height, width) != (native_h, native_w):
            raise DiffshipError(f"The init image is {native_w}x{native_h} after rounding down to a multiple of "
                                f"{self.vae_scale}; img2img generates at the image's size, not {width}x{height}.")
        n = len(prompts) * batch
        self.check_request(n, height, width)
        if steps < 1:
            raise DiffshipError(f"Number of steps must be at least 1, got {steps}.")
        guidance = guidance_scale > 1.0
        timings: dict[str, Any] = {"steps": []}
        started = time.perf_counter()

        # One prompt's embeddings repeated `batch` times consecutively, as num_images_per_prompt does.
        repeated = [p for p in prompts for _ in range(batch)]
        repeated_neg = None if negatives is None else [p for p in negatives for _ in range(batch)]
        warnings = truncation_warnings(self.tokenizers[0], prompts + (negatives or []))
        conditioning = self.encode(repeated, repeated_neg, guidance)
        timings["text_encode"] = time.perf_counter() - started
        if self.family.time_ids:
            conditioning["time_ids"] = self._time_ids(height, width, n, guidance, aesthetic_score,
                                                      negative_aesthetic_score)

        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (n, self.vae_config.get("latent_channels", 4), height // self.vae_scale, width // self.vae_scale)
        self.scheduler.set_timesteps(steps)
        inpainting = None
        if task != "text2img":
            strength = strength if strength is not None else call_default(self.family.pipelines[task], "strength")
            timesteps = strength_timesteps(self.scheduler, steps, strength)
        if pixels is not None:
            latents = init_latents(self.runners[ENCODER], pixels, n, self.vae_config, self.scheduler, timesteps[:1],
                                   generator)
        elif task == "inpaint":
            latents, inpainting = inpaint.prepare(
                self.runners[ENCODER], as_array(image), as_array(mask), height, width, n, guidance, self.vae_scale,
                self.vae_config, self.scheduler, timesteps, strength, self.in_channels, generator)
        else:
            if latents is None:
                latents = torch.randn(shape, generator=generator, dtype=torch.float32)
            elif tuple(latents.shape) != shape:
                raise DiffshipError(f"Latents of shape {tuple(latents.shape)} given; this request needs {shape}.")
            latents = latents.to(torch.float32) * self.scheduler.init_noise_sigma
            timesteps = self.scheduler.timesteps
        extra = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in self.step_takes}
        controlled = self._controlled(controls, task, height, width, n, guidance) if controls else None
        plan = step_plan(len(timesteps), accelerations, guidance)
        calls = DenoiserCalls(self.runner, self.denoiser.component, conditioning, guidance, accelerations,
                              cache_graphs(self.artifacts, self.denoiser, accelerations), controlled)
        for i, t in enumerate(timesteps):
            step_started = time.perf_counter()
            model_input = torch.cat([latents] * 2) if plan[i].guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if inpainting is not None:
                model_input = inpainting.denoiser_input(model_input)
            noise = torch.from_numpy(calls(plan[i], i, len(timesteps), model_input.numpy(), float(t)))
            if plan[i].guided:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            if inpainting is not None:
                latents = inpainting.after_step(latents, i, timesteps, self.scheduler)
            timings["steps"].append(time.perf_counter() - step_started)
            if on_step:
                on_step(i + 1, len(timesteps))

        decode_started = time.perf_counter()
        decoder, vae_config = decoder_for(self.artifacts, accelerations) or (DECODER, self.vae_config)
        decoded = self.runner(decoder).run({"latent_sample": self._unscale(latents, vae_config).numpy()})["sample"]
        images = to_uint8(decoded)
        timings["decode"] = time.perf_counter() - decode_started
        timings["total"] = time.perf_counter() - started
        return Generation(images, latents.numpy(), timings, warnings)

    def load_accelerations(self, accelerations: Accelerations | None) -> None:
        """Load the graphs `accelerations` run now, so that no image's time includes their load."""
        for name in cache_graphs(self.artifacts, self.denoiser, accelerations).values():
            self.runner(name)
        if decoder := decoder_for(self.artifacts, accelerations):
            self.runner(decoder[0])

    def runner(self, name: str) -> Runner:
        """The runner of component `name`, loaded on first use (with the set's options and any weight changes)."""
        if name not in self.runners:
            if name not in self.artifacts.components:
                raise DiffshipError(f"{self.artifacts.root} has no {name} artifact.")
            self.runners[name] = self.loader(name)
        return self.runners[name]

    @property
    def controlnets(self) -> list[str]:
        """The ControlNet components of these artifacts, in the build's order."""
        return [c for c in controlnet_names(len(self.artifacts.components)) if c in self.artifacts.components]

    def _controlled(self, controls: list[Any], task: str, height: int, width: int, n: int, guidance: bool) -> Any:
        """The ControlNets' denoising call for this request, their runners and the denoiser variant loaded on first
        use."""
        if not self.controlnets:
            raise DiffshipError(f"{self.artifacts.root} has no ControlNet: build with --controlnet to use control images.")
        if task != "text2img":
            raise DiffshipError("Control images condition text-to-image generation; not with --image / --mask.")
        for name in [*self.controlnets, self.denoiser.controlled]:
            self.runner(name)
        images = control_images(controls, height, width, self.vae_scale, n, guidance)
        residuals = self.denoiser.residuals(self.denoiser_config) if self.denoiser.residuals else ()
        return ControlledDenoiser([self.runners[c] for c in self.controlnets], self.runners[self.denoiser.controlled],
                                  controls, images, residuals)

    @property
    def tasks(self) -> tuple[str, ...]:
        """What these artifacts can do (an inpainting denoiser only inpaints)."""
        return self.family.tasks_for(self.in_channels, self.vae_config.get("latent_channels", 4))

    @property
    def in_channels(self) -> int:
        """The denoiser's input channels (an inpainting one takes the mask and the masked image's latents too)."""
        return self.denoiser.in_channels(self.denoiser_config)

    def _task(self, image: Any, mask: Any, latents: torch.Tensor | None) -> str:
        """text2img, img2img or inpaint, from what was given; an error when this model cannot do it."""
        task = "text2img" if image is None else ("img2img" if mask is None else "inpaint")
        if mask is not None and image is None:
            raise DiffshipError("A mask needs the image it masks (--image).")
        if task not in self.tasks:
            needs = {"text2img": "no --image", "img2img": "an init image (--image)",
                     "inpaint": "an image and a mask (--image, --mask)"}
            raise DiffshipError(f"This {self.family.title} model does {' and '.join(self.tasks)}, not {task}: give "
                                f"{needs[self.tasks[0]]}.")
        if task != "text2img":
            if latents is not None:
                raise DiffshipError("Initial latents replace text-to-image's random draw; img2img and inpainting "
                                    "draw from the image.")
            if ENCODER not in self.runners:
                raise DiffshipError(f"{self.artifacts.root} has no vae_encoder artifact, which {task} needs: rebuild "
                                    "with it among the recipe's components.")
        return task

    def _time_ids(self, height: int, width: int, n: int, guidance: bool, aesthetic: float | None = None,
                  negative_aesthetic: float | None = None) -> np.ndarray:
        """SDXL micro-conditioning per image, the negatives first under guidance; the refiner's carry aesthetic
        scores (the negative half the negative score), diffusers' defaults unless given."""
        task = self.family.pipelines.get("img2img", "")
        scores = [call_default(task, "aesthetic_score") if aesthetic is None else aesthetic,
                  call_default(task, "negative_aesthetic_score") if negative_aesthetic is None else negative_aesthetic] \
            if self.family.aesthetic_conditioning else [0.0, 0.0]
        positive = self.family.time_id_values(height, width, scores[0])
        negative = self.family.time_id_values(height, width, scores[1])
        return np.array(([negative] * n if guidance else []) + [positive] * n, dtype=np.float32)

    def _unscale(self, latents: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        scaling = config.get("scaling_factor", 0.18215)
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1)
            std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1)
            return latents * std / scaling + mean
        return latents / scaling


def pipeline_family(artifacts: ArtifactSet) -> Family:
    """The family the artifacts' manifest records."""
    if not artifacts.family:
        raise DiffshipError(f"{artifacts.root}'s manifest records no model family; it was written by an older "
                            "diffship: rebuild it.")
    return family_named(artifacts.family)


def save_images(images: np.ndarray, out: Path) -> list[Path]:
    """Write uint8 NHWC images as PNG: `out` itself for one image, `out-<i>.png` beside it for several."""
    from PIL import Image  # start-up time: PIL

    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
    return paths
