"""`int8-auto` for TensorRT: the search of `int8_search` over Model Optimizer's quantizers, before the QDQ export.

TensorRT builds what the QDQ graph says, so the choice is made on the fake-quantized PyTorch UNet (on the GPU when
the build has one, else on the CPU): every Conv / Linear input quantizer enabled (the recipes' float layers
included), each ranked by its SQNR on captured real steps through forward hooks, and the fewest kept in float
(input quantizer disabled, weights still INT8) that meet the gate. Speeds are not known before the engine is built,
so the candidates carry no speedup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from diffship.compress.distill import predict
from diffship.targets.accuracy_gate import Clock, Gate, worst
from diffship.targets.int8_search import SQNR_CALLS, Site, search, sqnr_db

Say = Callable[[str], None]


def _outputs(denoiser: nn.Module, calls: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    device = next(denoiser.parameters()).device
    with torch.no_grad():
        return [predict(denoiser, {k: torch.from_numpy(v).to(device) for k, v in c.items()}).float().cpu().numpy()
                for c in calls]


def _input_quantizers(denoiser: nn.Module) -> dict[str, Any]:
    return {name: m.input_quantizer for name, m in denoiser.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "input_quantizer", None) is not None
            and m.input_quantizer.is_enabled}


def _sites(denoiser: nn.Module, quantizers: dict[str, Any], calls: list[dict[str, np.ndarray]]) -> list[Site]:
    energies = {name: [0.0, 0.0] for name in quantizers}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach().double()
            if getattr(module, "pre_quant_scale", None) is not None:  # SmoothQuant scales the input before quantizing
                x = x * module.pre_quant_scale.detach().double()
            energies[name][0] += float((x * x).sum())
            energies[name][1] += float(((output.detach().double() - x) ** 2).sum())
        return record

    handles = [q.register_forward_hook(hook(name)) for name, q in quantizers.items()]
    try:
        _outputs(denoiser, calls)
    finally:
        for h in handles:
            h.remove()
    return [Site(name, (name,), sqnr_db(*energies[name])) for name in quantizers]


def search_unet(denoiser: nn.Module, calls: list[dict[str, np.ndarray]], probes: list[dict[str, np.ndarray]],
                gate: Gate, quantize: Callable[[nn.Module], dict[str, Any]], say: Say,
                suspects: tuple[str, ...] = ()) -> dict[str, Any]:
    """Quantize `denoiser` in place with `quantize` (every layer), then disable the input quantizers the search keeps
    in float (all of them when it falls back: weight-only INT8); the search's record."""
    clock = Clock(gate)
    references, probe_references = _outputs(denoiser, calls), _outputs(denoiser, probes)
    info = quantize(denoiser)
    quantizers = _input_quantizers(denoiser)
    sites = _sites(denoiser, quantizers, calls[:SQNR_CALLS])
    say(f"      int8-auto: {len(sites)} quantized layer inputs ranked by SQNR on {min(len(calls), SQNR_CALLS)} real "
        f"steps in {clock.elapsed():.0f} s")

    def apply(kept: list[Site]) -> None:
        names = {s.name for s in kept}
        for name, q in quantizers.items():
            if name in names:
                q.disable()  # a disabled quantizer still applies SmoothQuant's input scale: the layer stays exact
            else:
                q.enable()

    def trial(kept: list[Site]) -> tuple[float, float, float]:
        apply(kept)
        run = lambda call: _outputs(denoiser, [call])[0]  # noqa: E731
        return worst(run, calls, references, gate), worst(run, probes, probe_references, gate), 0.0

    kept, record = search(sites, trial, gate, clock, 0.0, say, suspects)
    apply(sites if kept is None else kept)
    record["library"] = "nvidia-modelopt (fake-quantized denoiser; speed unknown until the engine is built)"
    if kept is None:
        record["fell_back_to"] = "weight-only INT8: every input quantizer disabled, INT8 weights kept"
    return {**info, "kept_float": [s.name for s in (sites if kept is None else kept)], "search": record}
