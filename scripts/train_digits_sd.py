"""Train `digits-sd`: a complete Stable Diffusion pipeline on scikit-learn's handwritten digits, from a seed.

The text encoder is a tiny CLIP text model kept at its seeded initialisation (frozen, as SD keeps CLIP frozen);
the VAE learns 32x32 digit images <-> 8x8x4 latents; the UNet learns noise prediction conditioned on prompts
such as "a handwritten digit seven", with 10 % empty prompts for classifier-free guidance. Weights are written
in FP16 safetensors (a few MB) into the package; the built-in model loads them as FP32.

    python scripts/train_digits_sd.py [--seed 0] [--vae-steps 1500] [--unet-steps 4000] [--out diffship/models/digits_sd]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from diffship.models.digits import (
    DIGITS_TEXT_ENCODER,
    DIGITS_UNET,
    DIGITS_VAE,
    PROMPT_TEMPLATES,
    TRAIN_SCHEDULER,
    digit_images,
    prompt_for,
)
from diffship.models.tokenizer import build_clip_tokenizer


def encode_prompts(encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "diffship" / "models" / "digits_sd")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    log = {"seed": args.seed}

    images, labels = digit_images()  # (N, 3, 32, 32) in [-1, 1], (N,)
    generator = torch.Generator().manual_seed(args.seed)

    def shifted(batch: torch.Tensor) -> torch.Tensor:
        # up to 2 px of random translation: the 8x8 originals are centred, the model should not care
        dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
        return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))

    # 1. VAE
    vae = AutoencoderKL(**DIGITS_VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=generator)
        x = shifted(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step}: loss {loss.item():.5f} ({time.perf_counter() - began:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        moments = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        scaling = float(1.0 / moments.std())
    vae.register_to_config(scaling_factor=scaling)
    log |= {"vae_steps": args.vae_steps, "vae_loss": loss.item(), "scaling_factor": scaling,
            "vae_seconds": time.perf_counter() - began}

    # 2. frozen text encoder and the prompt embeddings the UNet trains on
    torch.manual_seed(args.seed * 100)
    encoder = CLIPTextModel(CLIPTextConfig(pad_token_id=1, **DIGITS_TEXT_ENCODER)).eval()
    prompts = [prompt_for(d, t) for d in range(10) for t in range(len(PROMPT_TEMPLATES))]
    embeddings = encode_prompts(encoder, prompts).view(10, len(PROMPT_TEMPLATES), 77, -1)
    empty = encode_prompts(encoder, [""])[0]

    # 3. UNet: epsilon prediction on the VAE's latents
    unet = UNet2DConditionModel(**DIGITS_UNET)
    noise_scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.denoiser_steps, eta_min=1e-5)
    unet_began = time.perf_counter()
    for step in range(args.denoiser_steps):
        idx = torch.randint(0, len(images), (args.batch,), generator=generator)
        with torch.no_grad():
            latents = vae.encode(shifted(images[idx])).latent_dist.sample(generator=generator) * scaling
        template = torch.randint(0, len(PROMPT_TEMPLATES), (args.batch,), generator=generator)
        condition = embeddings[labels[idx], template]
        dropped = torch.rand(args.batch, generator=generator) < 0.1
        condition[dropped] = empty
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, condition).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == args.denoiser_steps - 1:
            print(f"unet step {step}: loss {loss.item():.5f} ({time.perf_counter() - began:.0f} s)", flush=True)
    log |= {"denoiser_steps": args.denoiser_steps, "unet_loss": loss.item(), "unet_seconds": time.perf_counter() - unet_began,
            "total_seconds": time.perf_counter() - began, "batch": args.batch, "torch": torch.__version__}

    args.out.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", encoder)):
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(args.out / f"{name}.safetensors"))
    (args.out / "vae_config.json").write_text(json.dumps({"scaling_factor": scaling}, indent=2) + "\n")
    (args.out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
