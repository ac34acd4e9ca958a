"""The export stage: each component of the build to ONNX (opset 17), through the cache that `diffship export`
shares."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from diffship.exporters.pipeline import ModuleLoader, cached_export, choose_streamed, component_entry
from diffship.models.components import ComponentSpec
from diffship.stages.context import Context

EXPORT_FOLDER = "onnx"


def export_stage(c: Context, specs: list[ComponentSpec], export_dir: Path | None) -> dict[str, Any]:
    """Each component's ONNX export, copied into `export_dir` (None: only made sure of in the cache)."""
    modules = ModuleLoader(c.source.folder, c.recipe.allow_pickle)
    opset, say = c.recipe.export.opset, c.say
    entries: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        prefix = f"[export {i + 1}/{len(specs)}] {spec.name}"
        streamed = choose_streamed(c.recipe.export.streamed, c.source.folder, spec.module)
        done = cached_export(c.source, spec, c.family, c.module_hashes[spec.module], opset, c.versions, modules,
                             export_dir / spec.name if export_dir else None, c.force, say,
                             on_export=functools.partial(say, f"{prefix}: exporting{' streamed' if streamed else ''}"
                                                              " ..."), streamed=streamed,
                             stored_weights=c.recipe.export.stored_weights)
        c.hits[f"export:{spec.name}"] = done.hit
        if export_dir is not None:
            entries[spec.name] = component_entry(export_dir, export_dir / spec.name, done.info["seconds"])
        if done.hit:
            say(f"{prefix}: cached (no work)")
        else:
            size = sum(f["bytes"] for f in entries[spec.name]["files"]) if export_dir else 0
            say(f"{prefix}: done" + (f", {size / 2**20:.1f} MiB" if size else "") + f" in {done.info['seconds']:.1f} s")
    modules.loaded.clear()
    return entries
