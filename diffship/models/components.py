"""Exportable components declared as data, their tensor-only wrappers, and valid sample inputs.

A spec names each input and output with its dtype and shape, where a string in the shape is a
named dynamic axis. The exporter, parity check, runtime and (later) the other targets all read
these declarations, so a component is described once. Names follow optimum's ONNX configs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffship.errors import DiffshipError
from diffship.models.families import (
    MAX_T5_TOKENS,
    Denoiser,
    Family,
    Role,
    component_config,
    controlnets_in,
    detect_family,
    family_named,
)
from diffship.models.specs import Dim, TensorSpec

__all__ = ["CLIENT_OUTPUTS", "ComponentSpec", "Dim", "TensorSpec", "cache_specs", "component_specs", "run_torch",
           "with_cache_specs", "wrap"]

TRACE_TOKENS = 16  # the variable text tokens an export traces with (`ComponentSpec.trace_sequence`)

# Outputs a component has for the clients' layout only (optimum, GenAI); diffship's pipeline never reads them.
CLIENT_OUTPUTS = "hidden_states."


@dataclass(frozen=True)
class ComponentSpec:
    """An exportable component: which pipeline module it wraps, its inputs, outputs and spatial scale."""

    name: str  # text_encoder, text_encoder_2, the denoiser's component, vae_encoder, vae_decoder
    module: str  # folder in the pipeline: text_encoder, text_encoder_2, the denoiser's, vae
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vae_scale: int  # image pixels per latent pixel
    vocab_size: int = 0
    latent_axes: bool = False  # True for the denoiser: its height/width axes count latent pixels
    role: Role = "text_encoder"  # what the pipeline uses it for; code asks the role, never the name
    family: str = ""  # the family that declared it (how its conditioning inputs are made)
    latent_multiple: int = 8  # the denoiser's: every image side is a multiple of vae_scale x this
    # its text tokens (the "sequence" axis): fewest, as the pipeline feeds them by default, most
    min_sequence: int = 77
    sequence: int = 77
    max_sequence: int = 77
    cache_depth: int = 0  # deep-feature caching's graphs: how many outer block pairs a shallow step runs

    @property
    def denoiser(self) -> Denoiser:
        """The denoiser of the family that declared this component (how its pipeline's denoiser is wrapped, fed)."""
        return family_named(self.family).denoiser

    @property
    def is_denoiser(self) -> bool:
        return self.role == "denoiser"

    @property
    def denoises(self) -> bool:
        """The denoiser, plain or taking ControlNet residuals: what INT8 calibrates on its captured real inputs."""
        return self.role in ("denoiser", "controlled_denoiser", "caching_denoiser", "shallow_denoiser")

    @property
    def deep_cache_graph(self) -> bool:
        """One of deep-feature caching's graphs: calibrated like the denoiser, and searched on its own real steps in
        an int8-auto set (every output gated, the cached features too)."""
        return self.role in ("caching_denoiser", "shallow_denoiser")

    @property
    def norms_at_image_resolution(self) -> bool:
        """Its GroupNorms run on image-sized groups (the VAE), where float summation loses FP32 accuracy."""
        return self.role in ("vae_encoder", "vae_decoder")

    @property
    def in_denoising_loop(self) -> bool:
        """Runs once per step on the latents, both guidance halves at once: the denoiser, its ControlNet-residual
        variant and the ControlNets."""
        return self.role in ("denoiser", "controlled_denoiser", "controlnet", "caching_denoiser", "shallow_denoiser")

    def axis_sizes(self, batch: int, height: int, width: int, sequence: int | None = None) -> dict[str, int]:
        """Sizes of the named axes for an image of height x width pixels (and `sequence` text tokens, by default
        what the pipeline feeds)."""
        sequence = self.sequence if sequence is None else sequence
        multiple = self.vae_scale * self.latent_multiple
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise DiffshipError(f"Resolution {height}x{width} must be positive multiples of {multiple} pixels.")
        latent_h, latent_w = height // self.vae_scale, width // self.vae_scale
        if self.latent_axes:
            height, width = latent_h, latent_w
        sizes = {"batch": batch, "sequence": sequence, "height": height, "width": width,
                 "latent_height": latent_h, "latent_width": latent_w,
                 "image_height": latent_h * self.vae_scale, "image_width": latent_w * self.vae_scale}
        # the down-sampled sides of a denoiser's residuals (ControlNet outputs), latent pixels / 2, 4, 8
        sizes |= {f"{side}_{f}": value // f for side, value in (("height", latent_h), ("width", latent_w))
                  for f in (2, 4, 8)}
        # a packed denoiser's tokens: one per latent_multiple x latent_multiple latent patch (Flux's 2x2)
        sizes["image_tokens"] = (latent_h // self.latent_multiple) * (latent_w // self.latent_multiple)
        sizes["tokens"] = sequence + sizes["image_tokens"]  # a transformer's text and image tokens together
        return sizes

    @property
    def trace_sequence(self) -> int:
        """The text tokens an export traces with: what the pipeline feeds where the axis is fixed (CLIP's 77), else
        a few (the axis is dynamic, and a trace runs the whole model at its size: 512 of T5's tokens through Flux.1's
        12B transformer is 25 TFLOP before a byte is written)."""
        if self.min_sequence == self.max_sequence:
            return self.sequence
        return min(self.sequence, self.min_sequence - 1 + TRACE_TOKENS)  # SD3's 77 CLIP tokens + 16 of T5's

    def sample_inputs(self, batch: int, height: int, width: int, seed: int = 0,
                      sequence: int | None = None) -> dict[str, np.ndarray]:
        """Valid inputs for this component at the given batch and image resolution (and `sequence` text tokens, by
        default what the pipeline feeds), deterministic in `seed`."""
        sizes = self.axis_sizes(batch, height, width, sequence)
        rng = np.random.default_rng(seed)
        return {t.name: _sample(t, t.concrete(sizes), rng, self, height, width) for t in self.inputs}

    def image_size(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The image (height, width) in pixels that a first input of `shape` stands for; None for text."""
        axes = self.inputs[0].shape
        if self.role == "text_encoder" or "height" not in axes:  # text, or packed latents (Flux): no image sides
            return None
        scale = 1 if self.role == "vae_encoder" else self.vae_scale  # the encoder's input is the image itself
        return shape[axes.index("height")] * scale, shape[axes.index("width")] * scale

    def batch_for(self, batch: int, guided: bool) -> int:
        """The batch one call sees for `batch` images: the denoising loop runs both halves of guidance at once (not
        where guidance is an input of the denoiser, Flux's)."""
        doubles = guided and self.in_denoising_loop and self.denoiser.guidance_doubles_batch
        return batch * (2 if doubles else 1)

    def rows(self, call: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One call's inputs split into single-row calls: inputs with a batch axis sliced, the others (Flux's
        position ids) whole in each."""
        batched = {t.name for t in self.inputs if t.shape and t.shape[0] == "batch"}
        count = len(next(v for k, v in call.items() if k in batched))
        return [{k: v[i:i + 1] if k in batched else v for k, v in call.items()} for i in range(count)]

    def export_patches(self) -> AbstractContextManager[Any]:
        """What exporting this component needs patched in the libraries' code (its denoiser's declaration)."""
        patches = self.denoiser.export_patches if self.in_denoising_loop else None
        return patches() if patches else nullcontext()

    def named_in(self, names: tuple[str, ...] | list[str]) -> bool:
        """Whether an option's component list names this one: by its name, or the denoiser by its role."""
        return self.name in names or (self.is_denoiser and "denoiser" in names)

    def pipeline_outputs(self) -> ComponentSpec:
        """This spec without the outputs only the clients read (a text encoder's per-layer `hidden_states.N`, in
        optimum's layout): what a target builds whose sets no client loads (Core ML)."""
        return replace(self, outputs=tuple(o for o in self.outputs if not o.name.startswith(CLIENT_OUTPUTS)))


def _sample(t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, spec: ComponentSpec,
            height: int, width: int) -> np.ndarray:
    if t.name == "input_ids":
        # <|startoftext|> words <|endoftext|> padding, as a tokenizer would produce
        ids = rng.integers(0, spec.vocab_size - 2, size=shape)
        ends = rng.integers(2, shape[1], size=shape[0])
        for row, end in enumerate(ends):
            ids[row, 0], ids[row, end:] = spec.vocab_size - 2, spec.vocab_size - 1
        return ids.astype(t.dtype)
    if t.name == "timestep" and spec.denoiser.timestep_scale != 1000:  # a fraction of the schedule (Flux's t / 1000)
        return rng.uniform(0, spec.denoiser.timestep_scale, size=shape).astype(t.dtype)
    if t.name == "timestep":  # whole steps, as schedulers give them and as i64 timesteps (optimum, GenAI) carry
        return rng.integers(0, 1000, size=shape).astype(t.dtype)
    if t.name == "img_ids":  # (0, row, column) of each packed latent patch, as diffusers' Flux pipelines make them
        sizes = spec.axis_sizes(1, height, width)
        rows, columns = sizes["height"] // spec.latent_multiple, sizes["width"] // spec.latent_multiple
        grid = np.stack(np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij"), axis=-1).reshape(-1, 2)
        return np.concatenate([np.zeros((len(grid), 1)), grid], axis=1).astype(t.dtype)
    if t.name == "txt_ids":  # zeros: text tokens carry no position in Flux's RoPE
        return np.zeros(shape, dtype=t.dtype)
    if t.name == "guidance":  # the embedded guidance scale, in the range users give it
        return rng.uniform(1.0, 5.0, size=shape).astype(t.dtype)
    if t.name == "time_ids":  # as the family's pipeline builds them for this size
        return np.tile(np.array(family_named(spec.family).time_id_values(height, width), dtype=t.dtype), (shape[0], 1))
    if t.name == "sample" and spec.role == "vae_encoder":  # an image in [-1, 1]
        return rng.uniform(-1, 1, size=shape).astype(t.dtype)
    if t.name == "controlnet_cond":  # a control image in [0, 1], as diffusers' control image processor gives it
        return rng.uniform(0, 1, size=shape).astype(t.dtype)
    if t.name == "conditioning_scale":
        return np.asarray(rng.uniform(0.5, 1.5), dtype=t.dtype).reshape(shape)
    return rng.standard_normal(size=shape).astype(t.dtype)


def component_specs(folder: Path, family: Family | None = None) -> list[ComponentSpec]:
    """The exportable components of the pipeline in `folder`, read from its configs (no weights loaded)."""
    family = family or detect_family(folder)
    denoiser = family.denoiser
    config = family.denoiser_config(folder)
    vae = component_config(folder, "vae")
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    latent = vae.get("latent_channels", 4)
    specs = []
    penultimate = family.hidden_state == "penultimate_hidden_state"
    for name in family.encoders_in(folder):
        te = component_config(folder, name)
        if te.get("model_type") == "t5":  # SD3's and Flux's T5 encoder: its last hidden state alone
            states = TensorSpec("last_hidden_state", "float32", ("batch", "sequence", te["d_model"]))
            specs.append(ComponentSpec(name, name, (TensorSpec("input_ids", "int32", ("batch", "sequence")),),
                                       (states,), scale, vocab_size=te["vocab_size"], role="text_encoder",
                                       family=family.name, latent_multiple=denoiser.latent_multiple,
                                       min_sequence=1, sequence=family.t5_tokens, max_sequence=MAX_T5_TOKENS))
            continue
        hidden = te["hidden_size"]
        projected = name == family.pooled_from or name in family.projected
        pooled = TensorSpec("text_embeds" if projected else "pooler_output", "float32",
                            ("batch", te.get("projection_dim", hidden) if projected else hidden))
        states = ("batch", "sequence", hidden)
        last = TensorSpec("last_hidden_state", "float32", states)
        # optimum's order, which its pipelines read by name and OpenVINO GenAI by position: CLIPTextModel gives
        # last_hidden_state, pooler_output; the projection model text_embeds first (diffusers' SDXL takes a 2-D
        # first output as the pooled embedding).
        outputs = [pooled, last] if projected else [last, pooled]
        if penultimate:
            # SDXL conditions on hidden_states[-2]: every layer's state as optimum exports them (GenAI reads output
            # num_hidden_layers + 1), then diffship's own name for the one it uses, last so no position moves.
            layers = te.get("num_hidden_layers", 12)
            outputs += [TensorSpec(f"hidden_states.{i}", "float32", states) for i in range(layers + 1)]
            outputs.append(TensorSpec("penultimate_hidden_state", "float32", states))
        specs.append(ComponentSpec(name, name, (TensorSpec("input_ids", "int32", ("batch", "sequence")),),
                                   tuple(outputs), scale, vocab_size=te.get("vocab_size", 49408),
                                   role="text_encoder", family=family.name, latent_multiple=denoiser.latent_multiple))
    inputs, outputs = denoiser.inputs(config, family), denoiser.outputs(config)
    text = dict(zip(("min_sequence", "sequence", "max_sequence"), family.denoiser_sequence, strict=True))
    on_latents = {"vae_scale": scale, "latent_axes": True, "family": family.name,
                  "latent_multiple": denoiser.latent_multiple, **text}  # its height/width axes are latent pixels
    specs.append(ComponentSpec(denoiser.component, denoiser.component, inputs, outputs, role="denoiser", **on_latents))
    if denoiser.residuals and (controlnets := controlnets_in(folder)):
        residuals = denoiser.residuals(config)
        for name in controlnets:
            net = component_config(folder, name)
            cond = TensorSpec("controlnet_cond", "float32",
                              ("batch", net.get("conditioning_channels", 3), "image_height", "image_width"))
            net_inputs = (*inputs[:3], cond, TensorSpec("conditioning_scale", "float32", (1,)), *inputs[3:])
            specs.append(ComponentSpec(name, name, net_inputs, residuals, role="controlnet", **on_latents))
        specs.append(ComponentSpec(denoiser.controlled, denoiser.component, (*inputs, *residuals), outputs,
                                   role="controlled_denoiser", **on_latents))
    specs.append(ComponentSpec(
        "vae_encoder", "vae",
        (TensorSpec("sample", "float32", ("batch", vae.get("in_channels", 3), "height", "width")),),
        (TensorSpec("latent_parameters", "float32", ("batch", 2 * latent, "latent_height", "latent_width")),),
        scale, role="vae_encoder", family=family.name, latent_multiple=denoiser.latent_multiple,
    ))
    specs.append(ComponentSpec(
        "vae_decoder", "vae",
        (TensorSpec("latent_sample", "float32", ("batch", latent, "latent_height", "latent_width")),),
        (TensorSpec("sample", "float32", ("batch", vae.get("out_channels", 3), "height", "width")),),
        scale, role="vae_decoder", family=family.name, latent_multiple=denoiser.latent_multiple,
    ))
    return specs


# --- wrappers: tensor-only forward functions over the diffusers / transformers modules ---------------


class TextEncoder(nn.Module):
    """CLIP text encoder: input_ids -> the outputs named in its spec."""

    def __init__(self, encoder: nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.encoder, self.outputs = encoder, outputs

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids=input_ids, output_hidden_states="penultimate_hidden_state" in self.outputs)
        values = {
            "last_hidden_state": lambda: out.last_hidden_state,
            "pooler_output": lambda: out.pooler_output,
            "text_embeds": lambda: out.text_embeds,
            # a copy: ONNX needs each graph output to be its own value
            "penultimate_hidden_state": lambda: out.hidden_states[-2].clone(),
        }
        return tuple(values[name]() if name in values else out.hidden_states[int(name.split(".")[1])]
                     for name in self.outputs)


class VaeEncoder(nn.Module):
    """AutoencoderKL encoder: image -> latent distribution parameters (mean and log-variance)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].parameters


class VaeDecoder(nn.Module):
    """AutoencoderKL decoder: (unscaled) latent -> image in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def cache_specs(denoiser: ComponentSpec, folder: Path, depth: int) -> list[ComponentSpec]:
    """Deep-feature caching's two graphs of `denoiser` (its spec) at `depth`: the whole denoiser also returning the
    features, and its outer blocks taking them (`families/unet_cache.py`); an error where its structure has none."""
    declared = denoiser.denoiser
    if declared.cache_features is None:
        raise DiffshipError(f"Deep-feature caching is not available for the {declared.title}: it needs a denoiser "
                            "whose outer blocks wrap its deep ones (a UNet).")
    features = declared.cache_features(family_named(denoiser.family).denoiser_config(folder), depth)
    return [replace(denoiser, name=declared.caching(depth), outputs=(*denoiser.outputs, features),
                    role="caching_denoiser", cache_depth=depth),
            replace(denoiser, name=declared.shallow(depth), inputs=(*denoiser.inputs, features),
                    role="shallow_denoiser", cache_depth=depth)]


def with_cache_specs(specs: list[ComponentSpec], folder: Path, depth: int | None) -> list[ComponentSpec]:
    """`specs` and, where deep features are cached down to skip connection `depth`, the denoiser's two graphs for it."""
    if depth is None:
        return specs
    return [*specs, *cache_specs(next(s for s in specs if s.is_denoiser), folder, depth)]


def modules_used(spec: ComponentSpec, module: nn.Module) -> set[str]:
    """Names (in `module`) of the submodules `spec`'s wrapper runs, found by running it once at its smallest size:
    a graph of part of a module (deep-feature caching's shallow one) holds only their weights."""
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda mod, *_: ran.add(mod)) for m in module.modules()]
    side = spec.vae_scale * spec.latent_multiple
    try:
        run_torch(wrap(spec, module), spec, spec.sample_inputs(1, side, side))
    finally:
        for hook in hooks:
            hook.remove()
    return {name for name, m in module.named_modules() if m in ran}


def _caching_side(side: str) -> Callable[[nn.Module, ComponentSpec], nn.Module]:
    def build(module: nn.Module, spec: ComponentSpec) -> nn.Module:
        return getattr(spec.denoiser, side)(module, tuple(t.name for t in spec.inputs), spec.cache_depth)
    return build


def _denoiser_side(side: str) -> Callable[[nn.Module, ComponentSpec], nn.Module]:
    """The wrapper the spec's denoiser declares for `side` (its own, its ControlNets', its controlled variant)."""
    def build(module: nn.Module, spec: ComponentSpec) -> nn.Module:
        declared = getattr(spec.denoiser, side)
        if declared is None:
            raise DiffshipError(f"The {spec.denoiser.title} takes no ControlNets; {spec.name!r} cannot be wrapped.")
        return declared(module, tuple(t.name for t in spec.inputs))
    return build


# role -> (pipeline module, its spec) -> tensor-only wrapper; the denoising roles ask the family's denoiser
WRAPPERS: dict[str, Callable[[nn.Module, ComponentSpec], nn.Module]] = {
    "text_encoder": lambda module, spec: TextEncoder(module, tuple(o.name for o in spec.outputs)),
    "vae_encoder": lambda module, spec: VaeEncoder(module),
    "vae_decoder": lambda module, spec: VaeDecoder(module),
    "denoiser": _denoiser_side("wrap"),
    "controlnet": _denoiser_side("wrap_controlnet"),
    "controlled_denoiser": _denoiser_side("wrap_controlled"),
    "caching_denoiser": _caching_side("wrap_caching"),
    "shallow_denoiser": _caching_side("wrap_shallow"),
}


def wrap(spec: ComponentSpec, module: nn.Module) -> nn.Module:
    """The tensor-only wrapper for `spec` around its loaded pipeline module, in eval mode."""
    if spec.role not in WRAPPERS:
        raise DiffshipError(f"No wrapper for component {spec.name!r} (role {spec.role!r}).")
    return WRAPPERS[spec.role](module, spec).eval()


def run_torch(wrapper: nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a wrapper on named numpy inputs and return named numpy outputs, as a Runner would."""
    args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in spec.inputs]
    with torch.inference_mode():
        out = wrapper(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.float().numpy() for t, o in zip(spec.outputs, out, strict=True)}
