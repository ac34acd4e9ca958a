"""Weight variants (`*.fp16.safetensors`, loaded by diffusers with `variant="fp16"`): a folder of links in the cache
that names the variant's files as the default weights, so every loader in diffship (and diffusers' pipelines for
the baseline) reads them without a variant argument, upcast to FP32 at load like any FP16 weights.

A link farm rather than a converted copy: no weights are duplicated on disk; the links are made once per folder
content and kept in the cache.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from diffship.errors import DiffshipError
from diffship.models.families import detect_family
from diffship.store import cache
from diffship.store.artifacts import staged_dir

# diffusion_pytorch_model.fp16.safetensors, model.fp16.safetensors, model-00001-of-00002.fp16.safetensors,
# diffusion_pytorch_model.safetensors.index.fp16.json
VARIANT_FILE = re.compile(r"^(?P<stem>.+?)\.(?P<variant>[A-Za-z0-9_]+)\.(?P<ext>safetensors|bin)$")
VARIANT_INDEX = re.compile(r"^(?P<stem>.+\.(safetensors|bin)\.index)\.(?P<variant>[A-Za-z0-9_]+)\.json$")
REVISION = 1


def _split(name: str) -> tuple[str, str | None]:
    """(default file name, variant) of a weight file name; variant None for a default weights file."""
    if match := VARIANT_INDEX.match(name):
        return f"{match['stem']}.json", match["variant"]
    if (match := VARIANT_FILE.match(name)) and not re.fullmatch(r"\d{5}-of-\d{5}", match["variant"]):
        return f"{match['stem']}.{match['ext']}", match["variant"]
    return name, None


def weight_components(folder: Path) -> list[str]:
    """The model folders diffship loads from the pipeline: its family's denoiser, the VAE and the text encoders."""
    family = detect_family(folder)
    return [family.denoiser.component, "vae", *family.encoders_in(folder)]


def variants_in(folder: Path) -> dict[str, tuple[set[str], bool]]:
    """Per weight component: the variants it has, and whether it has default (variant-less) weights."""
    found = {}
    for component in weight_components(folder):
        sub = folder / component
        if not sub.is_dir():
            continue
        names = [p.name for p in sub.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".bin"))]
        kinds = [_split(n)[1] for n in names]
        found[component] = ({k for k in kinds if k}, any(k is None for k in kinds))
    return found


def choose_variant(folder: Path, variant: str | None) -> str | None:
    """The variant to load: the one asked for (every component must have it), or the only one a folder without
    default weights has; None to load the default weights."""
    found = variants_in(folder)
    if variant is not None:
        lacking = sorted(c for c, (variants, _) in found.items() if variant not in variants)
        if lacking:
            have = sorted(set().union(*(v for v, _ in found.values())))
            raise DiffshipError(f"--variant {variant}: {', '.join(lacking)} in {folder} has no *.{variant}.safetensors "
                                f"weights (variants there: {', '.join(have) or 'none'}).")
        return variant
    if all(default for _, default in found.values()):
        return None
    only = {v for variants, default in found.values() if not default for v in variants}
    if len(only) == 1:
        return only.pop()
    missing = sorted(c for c, (_, default) in found.items() if not default)
    raise DiffshipError(f"{', '.join(missing)} in {folder} hold no default weights"
                        + (f" but several variants ({', '.join(sorted(only))}): choose one with --variant." if only
                           else "."))


def with_variant(folder: Path, variant: str, say: Callable[[str], None] | None = None) -> Path:
    """A cached folder where `variant`'s weight files carry the default names (links, no copies)."""
    say = say or (lambda _: None)
    key = cache.key(stage="variant", folder=cache.folder_hash(folder), variant=variant, revision=REVISION)
    root = cache.scratch_root() if cache.unwritable_reason() is not None else cache.cache_root()
    linked = root / "models" / f"variant-{variant}-{key[:16]}"
    if (linked / "model_index.json").is_file():
        return linked
    say(f"Loading the {variant} variant of {folder} (*.{variant}.safetensors), upcast to FP32 at load.")
    weighted = set(weight_components(folder))
    with cache.locked(linked, say, f"{variant} variant of {folder.name}"), staged_dir(linked, owned=True) as staging:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = path.relative_to(folder)
            name, found = _split(path.name)
            if relative.parts[0] in weighted and (found != variant if found else _has_variant(path, variant)):
                continue  # another variant's file, or the default weights the variant replaces
            target = staging / relative.parent / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(path, target)
    return linked


def link_tree(source: Path, target: Path, skip: set[str] = frozenset()) -> None:
    """`source`'s files linked into `target`, except the top-level folders in `skip`."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        if relative.parts[0] in skip:
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        _link(path, target / relative)


def _has_variant(path: Path, variant: str) -> bool:
    """Whether a default weights file has a `variant` sibling that replaces it."""
    return any(_split(p.name) == (path.name, variant) for p in path.parent.iterdir())


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the same bytes, no copy; the cache entry survives the source folder's removal
    except OSError:
        try:
            target.symlink_to(source.resolve())  # another filesystem
        except OSError:
            shutil.copy2(source, target)
