"""The static web app a `web-<precision>/` set carries: the page and its modules (`diffship/targets/webapp/app/`), the runtime
libraries copied from their npm packages, and `diffship-web.json`, which tells the page what the folder holds.

The runtime is onnxruntime-web (its WebGPU build, which also runs the WASM provider) and Hugging Face's tokenizers.js
for CLIP tokenization. They are npm packages, not Python ones: `make setup` installs them into `web/node_modules`
from `web/package-lock.json`; elsewhere point DIFFSHIP_WEB_RUNTIME at a node_modules folder that has them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.families import family_named
from diffship.store.artifacts import atomic_write_json, read_json

APP = Path(__file__).parent / "app"
CONFIG = "diffship-web.json"
# npm package file -> where the page imports it from (ort.webgpu.min.mjs loads the asyncify WASM build, which has
# both the WebGPU and the WASM execution providers)
RUNTIME_FILES = {
    "onnxruntime-web/dist/ort.webgpu.min.mjs": "runtime/ort.webgpu.min.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs": "runtime/ort-wasm-simd-threaded.asyncify.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm": "runtime/ort-wasm-simd-threaded.asyncify.wasm",
    "@huggingface/tokenizers/dist/tokenizers.min.mjs": "runtime/tokenizers.min.mjs",
}
APP_ROLES = ("text_encoder", "denoiser", "vae_decoder")  # the graphs the page runs, by role


def runtime_folder() -> Path:
    """The node_modules folder the runtime files are copied from, or an error saying how to install them."""
    default = Path(__file__).resolve().parents[3] / "web" / "node_modules"
    folder = Path(os.environ.get("DIFFSHIP_WEB_RUNTIME") or default)
    missing = [name for name in RUNTIME_FILES if not (folder / name).is_file()]
    if missing:
        raise DiffshipError(
            f"The web app needs onnxruntime-web and @huggingface/tokenizers from npm; {folder} lacks "
            f"{', '.join(missing)}. Run `make setup` in a diffship checkout (npm ci --prefix web), or `npm install "
            "onnxruntime-web@1.30.0 @huggingface/tokenizers@0.2.0` and set DIFFSHIP_WEB_RUNTIME to its node_modules.")
    return folder


def write_app(set_dir: Path, components: dict[str, Path], precision: str, family: str, say: Any = None) -> Path:
    """Copy the page, its modules and the runtime into `set_dir`, and describe the folder in diffship-web.json."""
    runtime = runtime_folder()
    config = app_config(set_dir, components, precision, family)
    shutil.copytree(APP, set_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    for package_file, target in RUNTIME_FILES.items():
        (set_dir / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(runtime / package_file, set_dir / target)
    atomic_write_json(set_dir / CONFIG, config)
    if say:
        say(f"[web {precision}] app written: {set_dir.name}/index.html (serve the folder with any static server)")
    return set_dir / "index.html"


def check_family(family_name: str) -> None:
    """Refuse a family whose conditioning the app does not make (SDXL's second text encoder and time ids)."""
    family = family_named(family_name)
    if family.loop == "diffusers":
        raise DiffshipError(f"The web app's JavaScript port runs diffship's UNet loop; {family.short}'s (flow matching, "
                            "T5 and its tokenizer, a transformer denoiser) is diffusers' pipeline class, which the "
                            "page does not have. Set the web target's option app = false to build the graphs alone.")
    if family.time_ids or len(family.text_encoders) != 1:
        raise DiffshipError(f"The web app runs SD 1.x / 2.x pipelines (one CLIP text encoder); {family.short}'s "
                            "conditioning is not in it yet. Set the web target's option app = false to build the "
                            "graphs alone.")


def app_config(set_dir: Path, components: dict[str, Path], precision: str, family_name: str) -> dict[str, Any]:
    """What the page needs to know: the graphs and their pinned shapes, the tokenizer, scheduler and VAE settings."""
    from diffship.targets.onnx_graph import input_shapes, weight_bytes  # start-up time: onnx

    check_family(family_name)
    family = family_named(family_name)
    # role -> the component the page runs in it, keyed by role in diffship-web.json so the page names no model
    chosen = dict(zip(APP_ROLES, (family.text_encoders[0], family.denoiser.component, "vae_decoder"), strict=True))
    missing = [c for c in chosen.values() if c not in components]
    if missing:
        raise DiffshipError(f"The web app needs the {', '.join(missing)} component(s); the build made "
                            f"{', '.join(components)}.")
    graphs = {}
    for role, name in chosen.items():
        path = components[name]
        graphs[role] = {"path": path.relative_to(set_dir).as_posix(),
                        "external_data": sorted(p.name for p in path.parent.iterdir()
                                                if p.name.startswith(f"{path.name}_data")),
                        "inputs": {k: list(v) for k, v in input_shapes(path).items()},
                        "bytes": weight_bytes(path)}
    sample = graphs["denoiser"]["inputs"]["sample"]
    vae = read_json(components["vae_decoder"].parent / "config.json")
    scale = vae.get("scaling_factor", 0.18215)
    return {"precision": precision, "family": family.name, "title": family.title,
            "webgpu_needs_shader_f16": precision == "fp16", "wasm": precision != "fp16",
            "components": graphs, "hidden_state": family.hidden_state,
            "tokenizer": tokenizer_config(set_dir / family.tokenizers[0]),
            "scheduler": finite(read_json(set_dir / "scheduler" / _scheduler_file(set_dir))),
            "latents": [1, *sample[1:]], "denoiser_batch": sample[0],
            "image": [sample[2] * _vae_scale(vae), sample[3] * _vae_scale(vae)],
            "vae": {"scaling_factor": scale, "shift_factor": vae.get("shift_factor")},
            "runtime": {"onnxruntime": "runtime/ort.webgpu.min.mjs", "wasm_paths": "runtime/",
                        "tokenizers": "runtime/tokenizers.min.mjs", "onnxruntime_version": _npm_version(
                            "onnxruntime-web")}}


def tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer.json for tokenizers.js (written from the slow tokenizer's files when the folder lacks one), with the
    padding diffusers applies: `padding="max_length"` to the model's length with the tokenizer's pad token."""
    from transformers import AutoTokenizer  # start-up time: transformers

    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if not (folder / "tokenizer.json").is_file():
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    base = folder.name
    return {"json": f"{base}/tokenizer.json", "config": f"{base}/tokenizer_config.json",
            "max_length": int(tokenizer.model_max_length), "pad_id": int(tokenizer.pad_token_id),
            "eos_id": int(tokenizer.eos_token_id)}


def finite(value: Any) -> Any:
    """`value` with non-finite floats as null: diffusers writes `-Infinity` into DPM-Solver configs
    (lambda_min_clipped), which JSON.parse refuses; the page's schedulers read null as diffusers' default."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _scheduler_file(set_dir: Path) -> str:
    return "scheduler_config.json" if (set_dir / "scheduler" / "scheduler_config.json").is_file() else "config.json"


def _vae_scale(vae: dict[str, Any]) -> int:
    return 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _npm_version(package: str) -> str | None:
    manifest = runtime_folder() / package / "package.json"
    return json.loads(manifest.read_text(encoding="utf-8")).get("version") if manifest.is_file() else None
