"""Pruning passes over a diffusers UNet: unstructured magnitude, structured channels, and attention heads.

Channel pruning uses torch-pruning's dependency graph, which follows the UNet's residual additions and skip
concatenations so that every layer reading a pruned channel loses it too; hand-tracking those in a UNet is
the bug farm its authors built it to avoid. Head pruning removes whole heads with torch-pruning's per-layer
functions, because its automatic head grouping does not see through scaled_dot_product_attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from diffship.compress import import_extra
from diffship.errors import DiffshipError

PRUNABLE = (nn.Conv2d, nn.Linear)


def weight_layers(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers whose weights the pruning passes act on."""
    return [(name, m) for name, m in denoiser.named_modules() if isinstance(m, PRUNABLE)]


def prune_magnitude(denoiser: nn.Module, sparsity: float, scope: str = "global") -> dict[str, Any]:
    """Zero the smallest-magnitude weights of every conv and linear layer, then make the zeros permanent.

    `global` ranks all weights together (layers lose different shares); `layer` takes `sparsity` of each layer.
    """
    if not 0.0 < sparsity < 1.0:
        raise DiffshipError(f"prune-magnitude: sparsity must be between 0 and 1 (exclusive), not {sparsity}.")
    layers = weight_layers(denoiser)
    if scope == "global":
        torch_prune.global_unstructured([(m, "weight") for _, m in layers], torch_prune.L1Unstructured, amount=sparsity)
    elif scope == "layer":
        for _, m in layers:
            torch_prune.l1_unstructured(m, "weight", amount=sparsity)
    else:
        raise DiffshipError(f"prune-magnitude: scope must be 'global' or 'layer', not {scope!r}.")
    for _, m in layers:
        torch_prune.remove(m, "weight")  # folds the mask into the weight: plain tensors with zeros in them
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return {"layers": len(layers), "weights": total, "zeroed": zeros, "sparsity": zeros / total, "scope": scope}


def _group_norm_pruner() -> Any:
    """torch-pruning's GroupNorm handler, but free to remove single channels; num_groups shrinks to keep
    channels-per-group where it can. The stock handler prunes the same count from every group, which with
    one or two channels per group (small UNets) means pruning nothing at all."""
    tp = import_extra("torch_pruning")

    class Pruner(tp.function.GroupNormPruner):
        def get_in_channel_groups(self, layer: nn.GroupNorm) -> int:
            return 1

        get_out_channel_groups = get_in_channel_groups

        def prune_out_channels(self, layer: nn.GroupNorm, idxs: list[int]) -> nn.Module:
            per_group = layer.num_channels // layer.num_groups
            layer = super().prune_out_channels(layer, idxs)
            groups = max(1, layer.num_channels // per_group)
            while layer.num_channels % groups:
                groups -= 1
            layer.num_groups = groups
            return layer

        prune_in_channels = prune_out_channels

    return Pruner()


class _Forward(nn.Module):
    """The UNet as tensors in, tensor out, which is what torch-pruning traces."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"added_cond_kwargs": added} if added else {}
        return self.denoiser(sample, timestep, encoder_hidden_states, **kwargs).sample


def example_inputs(call: dict[str, Any], device: torch.device | str = "cpu") -> tuple[Any, ...]:
    """One captured UNet call as the positional inputs of `_Forward`, on `device`."""
    tensors = {k: torch.as_tensor(v).to(device) for k, v in call.items()}
    added = {k: tensors[k] for k in ("text_embeds", "time_ids") if k in tensors}
    return tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"], added


def prune_channels(denoiser: nn.Module, ratio: float, call: dict[str, Any], round_to: int | None = None) -> dict[str, Any]:
    """Physically remove `ratio` of the channels of every prunable group (L2 magnitude importance).

    Kept whole: conv_out (the model's output), and the q/k/v projections, whose width is heads x head size
    (`prune-heads` removes whole heads instead).
    """
    from diffusers.models.attention_processor import Attention  # start-up time: diffusers

    tp = import_extra("torch_pruning")

    if not 0.0 < ratio < 1.0:
        raise DiffshipError(f"prune-channels: ratio must be between 0 and 1 (exclusive), not {ratio}.")
    ignored: list[nn.Module] = [denoiser.conv_out]
    for m in denoiser.modules():
        if isinstance(m, Attention):
            ignored += [m.to_q, m.to_k, m.to_v]
    before = _widths(denoiser)
    denoiser.requires_grad_(True)  # torch-pruning traces the graph through autograd
    try:
        pruner = tp.pruner.MetaPruner(
            _Forward(denoiser), example_inputs(call, next(denoiser.parameters()).device),
            importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
            customized_pruners={nn.GroupNorm: _group_norm_pruner()})
        pruner.step()
    finally:
        denoiser.requires_grad_(False)
    sync_attributes(denoiser)
    _as_leaves(denoiser)
    after = _widths(denoiser)
    changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    kept = sum(a for _, a in changed.values()) / max(1, sum(b for b, _ in changed.values()))
    return {"ratio": ratio, "round_to": round_to, "layers_changed": len(changed), "channels_kept": kept,
            "examples": dict(list(changed.items())[:4])}


def sync_attributes(denoiser: nn.Module) -> None:
    """Update the channel counts diffusers' blocks keep beside their layers (they assert on them in forward)."""
    from diffusers.models.downsampling import Downsample2D  # start-up time: diffusers
    from diffusers.models.upsampling import Upsample2D  # start-up time: diffusers

    for m in denoiser.modules():
        if isinstance(m, (Downsample2D, Upsample2D)) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels


def _as_leaves(module: nn.Module) -> None:
    """Re-wrap pruned weights as plain leaf parameters (pruning under autograd leaves some as graph outputs,
    which an optimizer refuses and pickling drags along)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)


def _widths(denoiser: nn.Module) -> dict[str, int]:
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) for name, m in weight_layers(denoiser)}


def prune_heads(denoiser: nn.Module, heads: int) -> dict[str, Any]:
    """Remove the `heads` least important heads of every attention layer (L2 norm of the head's q/k/v rows and
    output-projection columns), shrinking the projections and the layer's head count."""
    from diffusers.models.attention_processor import Attention  # start-up time: diffusers

    tp = import_extra("torch_pruning")

    layers = [(name, m) for name, m in denoiser.named_modules() if isinstance(m, Attention)]
    if not layers:
        raise DiffshipError("prune-heads: this denoiser has no attention layers.")
    for name, m in layers:
        if heads >= m.heads:
            raise DiffshipError(f"prune-heads: heads = {heads}, but attention layer {name} has {m.heads} heads; "
                                f"at most {m.heads - 1} can be removed from it.")
    removed = {}
    for name, m in layers:
        size = m.to_q.out_features // m.heads
        if m.to_k.out_features != m.to_q.out_features or m.to_v.out_features != m.to_q.out_features:
            raise DiffshipError(f"prune-heads: {name} has q/k/v projections of different widths; not supported.")
        out = m.to_out[0]
        score = torch.stack([
            sum(p.weight[h * size:(h + 1) * size].float().pow(2).sum() for p in (m.to_q, m.to_k, m.to_v))
            + out.weight[:, h * size:(h + 1) * size].float().pow(2).sum() for h in range(m.heads)])
        drop = sorted(score.argsort()[:heads].tolist())
        idxs = [c for h in drop for c in range(h * size, (h + 1) * size)]
        for p in (m.to_q, m.to_k, m.to_v):
            tp.prune_linear_out_channels(p, idxs)
        tp.prune_linear_in_channels(out, idxs)
        removed[name] = drop
        m.heads -= heads
        m.inner_dim = m.inner_kv_dim = m.to_q.out_features
    _as_leaves(denoiser)
    return {"heads_removed_per_layer": heads, "layers": len(layers), "removed": removed}
