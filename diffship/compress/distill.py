"""Distillation: fine-tune a pruned or quantized UNet (the student) to reproduce the original's (the teacher's)
noise prediction.

The inputs are the teacher's own images, noised afresh at a random training timestep every step: data-free
(no training set needed) and diverse. Distilling on the captured denoising trajectories alone was tried first;
the student matched them to MSE 0.001 and learned nothing that carried to new seeds (MSE on fresh
trajectories equal to the signal's variance), because a few dozen trajectories are a few dozen points.

Checkpoints (student weights, optimizer, step, random state) are written atomically every `checkpoint_every`
steps; a run started again with the same student and settings resumes from the last one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT = "distill-checkpoint.pt"


def predict(denoiser: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's noise prediction for one minibatch of captured inputs, on the UNet's device."""
    device = next(denoiser.parameters()).device
    rows = {k: v.to(device) for k, v in rows.items()}
    added = {k: rows[k] for k in ("text_embeds", "time_ids") if k in rows}
    kwargs = {"added_cond_kwargs": added} if added else {}
    return denoiser(rows["sample"], rows["timestep"], rows["encoder_hidden_states"], **kwargs).sample


def run_calls(denoiser: nn.Module, calls: list[dict[str, np.ndarray]]) -> None:
    """Run the UNet on every captured call without gradients: what calibration observes."""
    with torch.no_grad():
        for call in calls:
            predict(denoiser, {k: torch.from_numpy(v) for k, v in call.items()})


@dataclass
class SampleSet:
    """The teacher's generated latents and, per image, the conditioning rows its UNet saw (uncond first under
    guidance), plus the noise schedule to noise them with."""

    latents: torch.Tensor  # (N, C, h, w), scaled as the UNet sees them
    conditioning: dict[str, torch.Tensor]  # each (N, rows, ...)
    alphas_cumprod: torch.Tensor
    guidance_scale: float

    @property
    def paired(self) -> bool:
        return self.guidance_scale > 1.0 and self.conditioning["encoder_hidden_states"].shape[1] == 2


def sample_set(captured: Any, denoiser: str, steps: int, scaling_factor: float, alphas_cumprod: torch.Tensor,
               guidance_scale: float) -> SampleSet:
    """A SampleSet from `validation.capture` output that kept every call of every generation of `denoiser`."""
    calls = captured.inputs[denoiser]
    firsts = calls[::steps]  # the first call of each generation carries its conditioning
    conditioning = {k: torch.from_numpy(np.stack([c[k] for c in firsts])) for k in firsts[0]
                    if k not in ("sample", "timestep")}
    latents = torch.from_numpy(np.concatenate([d["latent_sample"] for d in captured.inputs["vae_decoder"]]))
    return SampleSet(latents * scaling_factor, conditioning, alphas_cumprod.float().cpu(), guidance_scale)


def _minibatch(data: SampleSet, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`batch` images noised at random timesteps, each with all of its conditioning rows (uncond, cond)."""
    pick = torch.randint(len(data.latents), (batch,), generator=generator)
    x0 = data.latents[pick]
    t = torch.randint(len(data.alphas_cumprod), (batch,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = data.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    rows = data.conditioning["encoder_hidden_states"].shape[1]
    mini = {k: v[pick].flatten(0, 1) for k, v in data.conditioning.items()}
    mini["sample"] = noisy.repeat_interleave(rows, dim=0)
    mini["timestep"] = t.float().repeat_interleave(rows)
    return mini


def distill(student: nn.Module, teacher: nn.Module, data: SampleSet, steps: int, batch: int, lr: float,
            checkpoint_dir: Path, checkpoint_every: int, seed: int = 0,
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Minimise MSE(student, teacher) over `steps` minibatches of `batch` noised teacher images.

    Under classifier-free guidance (an unconditional and a conditional row per image) the loss also matches the
    guidance direction, conditional - unconditional, which sampling multiplies by the guidance scale and which
    plain MSE, dominated by the shared noise estimate, barely sees. It is weighted like the rows themselves:
    scaled by the guidance (x56 at 7.5) it swamped the shared estimate, and QAT traded one for the other
    (held-out MSE 8x worse than post-training INT8's, prompt accuracy 2.5 points down).
    """
    say = say or (lambda _: None)
    params = [p for p in student.parameters() if p.is_floating_point()]
    student.train()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start, losses = 0, []
    checkpoint = checkpoint_dir / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, losses = state["step"], state["losses"]
        say(f"      resuming distillation from its checkpoint at step {start}/{steps}")
    began = time.perf_counter()
    try:
        for step in range(start, steps):
            mini = _minibatch(data, batch, generator)
            with torch.no_grad():
                target = predict(teacher, mini)
            output = predict(student, mini)
            loss = nn.functional.mse_loss(output, target)
            if data.paired:
                loss = loss + nn.functional.mse_loss(output[1::2] - output[::2], target[1::2] - target[::2])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            done = step + 1
            if done % checkpoint_every == 0 or done == steps:
                _save(checkpoint, {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                                   "generator": generator.get_state(), "step": done, "losses": losses})
                recent = losses[-checkpoint_every:]
                say(f"      distill {done}/{steps}: loss {sum(recent) / len(recent):.5f}")
    finally:
        for p in params:
            p.requires_grad_(False)
        student.eval()
    first = losses[: max(1, len(losses) // 20)]
    last = losses[-max(1, len(losses) // 20):]
    return {"steps": steps, "batch": batch, "lr": lr, "images": len(data.latents), "resumed_from": start,
            "loss": "MSE + guidance-direction MSE" if data.paired else "MSE",
            "loss_first": sum(first) / len(first), "loss_last": sum(last) / len(last),
            "seconds": round(time.perf_counter() - began, 1)}


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)
