"""The libraries that load diffship's folders where they ship, declared as data.

Each client lives in its own virtual environment, because they cannot share one with diffship or each other:
optimum-intel 2.2 needs optimum ~2.3 and transformers < 5.6, optimum-onnx 0.1 needs optimum ~2.1 and transformers
< 4.58, and diffship runs transformers 5. Validation runs each client's
runner script (diffship/clients/runners/) in its environment as a subprocess, so a crash in a client's native code
is that client's failure, never the build's. `diffship clients install` makes the environments (`make setup` runs
it); a client whose environment is missing is a skip with that reason, never a pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# torch is pinned so that nothing pulls a CUDA build (optimum-intel asks for torchvision, whose PyPI wheels pull one).
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Client:
    """One library that loads a set's folder: where its environment comes from and what it can run."""

    name: str  # "genai", "optimum-intel", "optimum-onnx": the report's and the recipe's key
    title: str
    package: str  # the distribution whose version the report gives
    target: str  # the sets it loads: "openvino" or "onnxruntime"
    runner: str  # diffship/clients/runners/<runner>.py
    requirements: tuple[str, ...]  # pip arguments, one pip call per entry (space-separated requirements)
    remove: tuple[str, ...] = ()  # packages a requirement drags in that the client does not import and that break
    runner_args: tuple[str, ...] = ()  # what the runner is told before the job files (optimum's: which library)
    # (the set's model_index `_class_name`, task) -> why this client cannot run that pipeline, or None
    refuses: Callable[[str, str], str | None] = lambda index_class, task: None
    # the set's folder -> why this client cannot load it, or None
    refuses_folder: Callable[[Path, str], str | None] = lambda folder, denoiser: None  # (set folder, denoiser)
    # (`_class_name`, height, width) -> how the client's own pipeline differs from diffusers' there, or None: said
    # beside its figure in the report (the threshold still judges the image)
    differs: Callable[[str, int, int], str | None] = lambda index_class, height, width: None


# The `_class_name`s OpenVINO GenAI 2026.4's pipelines accept (text2image_pipeline.cpp, image2image_pipeline.cpp,
# inpainting_pipeline.cpp), for the families diffship builds. An inpainting model is found by its UNet's channels.
TRANSFORMERS = ("StableDiffusion3Pipeline", "FluxPipeline")
GENAI_ACCEPTS = {
    "text2img": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", *TRANSFORMERS),
    "img2img": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", *TRANSFORMERS),
    "inpaint": ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionInpaintPipeline",
                "StableDiffusionXLInpaintPipeline", *TRANSFORMERS),
}


def _genai_refuses(index_class: str, task: str) -> str | None:
    if task not in GENAI_ACCEPTS:
        return f"OpenVINO GenAI 2026.4 has no {task} pipeline"
    if index_class not in GENAI_ACCEPTS[task]:
        return (f"OpenVINO GenAI 2026.4 has no pipeline for {index_class}: its {task} pipeline takes only "
                f"{', '.join(GENAI_ACCEPTS[task])} (so no SDXL refiner)")
    return None


def _genai_refuses_folder(folder: Path, denoiser: str) -> str | None:
    import openvino as ov  # optional: openvino

    model = ov.Core().read_model(str(folder / denoiser / "openvino_model.xml"))
    shape = next(p.get_partial_shape() for p in model.inputs if p.get_any_name() == "timestep")
    if shape.is_static and shape.to_shape()[0] != 1:
        return (f"the set's {denoiser} is static with {shape.to_shape()[0]} timesteps per call (the recipe fixes batch and "
                "size), and OpenVINO GenAI feeds one: build with the openvino option static_shapes = false for GenAI")
    return None


def _genai_differs(index_class: str, height: int, width: int) -> str | None:
    if "XL" in index_class and height != width:  # stable_diffusion_xl_pipeline.hpp, GenAI 2026.4
        return ("GenAI conditions SDXL on time_ids (width, height, 0, 0, width, height), diffusers on (height, width, "
                "...): a non-square image differs by that")
    return None


def _optimum_refuses(index_class: str, task: str) -> str | None:
    return "optimum has no ControlNet pipeline for these folders" if task == "controlnet" else None


GENAI = Client("genai", "OpenVINO GenAI", "openvino-genai", "openvino", "genai_client",
               # GenAI itself needs no torch; its TorchGenerator, which draws diffusers' latents for a seed, does
               (f"{TORCH} openvino-genai==2026.4.1.* openvino-tokenizers==2026.4.1.* numpy pillow",),
               refuses=_genai_refuses, refuses_folder=_genai_refuses_folder, differs=_genai_differs)
OPTIMUM_INTEL = Client(
    "optimum-intel", "optimum-intel", "optimum-intel", "openvino", "optimum_client",
    (f"{TORCH} optimum-intel[openvino]==2.2.0 transformers<5.6 huggingface-hub<1.22 diffusers<=0.39 pillow",),
    # PyPI's torchvision for torch 2.13 fails to import beside the CPU torch; optimum's diffusion path never uses it.
    remove=("torchvision",), runner_args=("intel",), refuses=_optimum_refuses)
OPTIMUM_ONNX = Client("optimum-onnx", "optimum-onnx", "optimum-onnx", "onnxruntime", "optimum_client",
                      (f"{TORCH} optimum-onnx[onnxruntime]==0.1.0 diffusers pillow",), runner_args=("onnx",),
                      refuses=_optimum_refuses)
CLIENTS = (GENAI, OPTIMUM_INTEL, OPTIMUM_ONNX)
NAMES = tuple(c.name for c in CLIENTS)


def client_named(name: str) -> Client:
    """The client called `name` (one of NAMES)."""
    return next(c for c in CLIENTS if c.name == name)


def clients_root() -> Path:
    """Where the clients' environments are: $DIFFSHIP_CLIENTS, else $XDG_DATA_HOME/diffship/clients (installed
    software, not cache: `diffship cache prune` never touches it)."""
    if env := os.environ.get("DIFFSHIP_CLIENTS"):
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "diffship" / "clients"


def python_of(client: Client) -> Path:
    """The interpreter of the client's environment."""
    return clients_root() / client.name / "bin" / "python"


def runner_path(client: Client) -> Path:
    return Path(__file__).parent / "runners" / f"{client.runner}.py"


def missing_reason(client: Client) -> str | None:
    """Why the client cannot run here (its environment is not made), or None."""
    if not (clients_root() / client.name / ".installed").is_file():
        return (f"{client.title} is not installed: no environment at {clients_root() / client.name} "
                f"(`diffship clients install` makes it; `make setup` runs that)")
    return None


def installed_versions(names: list[str]) -> dict[str, str]:
    """What each named client's environment holds ("missing" where none is made): part of a validation's cache key,
    so a client installed or upgraded since is run again."""
    found = {}
    for name in names:
        marker = clients_root() / name / ".installed"
        found[name] = json.dumps(json.loads(marker.read_text())["versions"], sort_keys=True) if marker.is_file() \
            else "missing"
    return found
