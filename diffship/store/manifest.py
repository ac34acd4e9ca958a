"""Reading a diffship output folder: its manifest (typed, so a broken one is an error, not a crash), the artifact sets
it lists, and opening one of them with every recorded file checked and every path confined to the folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffship.errors import DiffshipError
from diffship.store.artifacts import MANIFEST_NAME, read_json, sha256_file
from diffship.store.confinement import check_artifact, check_links, inside

MANIFEST_SCHEMA = 1


class _Record(BaseModel):
    # A manifest holds much more than a reader needs (reports, versions, results); only these parts are read.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class FileRecord(_Record):
    """One file of an artifact: its path relative to the output folder, size and sha256."""

    path: str
    bytes: int = Field(ge=0)
    sha256: str


class ComponentRecord(_Record):
    """One component's artifact (the file a backend loads) and the files it consists of."""

    path: str
    files: list[FileRecord]


class SetRecord(_Record):
    """One artifact set of a build: target, precision, its pipeline folder and components."""

    target: str
    precision: str
    pipeline: str = "."
    status: str = "unvalidated"
    components: dict[str, ComponentRecord]
    pipeline_files: list[FileRecord] = Field(default_factory=list)


class _ExportComponent(_Record):
    files: list[FileRecord]


class _Source(_Record):
    model: str
    family: str | None = None
    folder: str | None = None  # the resolved diffusers folder (in the cache for built-ins, merges and conversions)


class _Target(_Record):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class _Recipe(_Record):
    targets: list[_Target] = Field(default_factory=list)


class Manifest(_Record):
    """What readers take from manifest.json: a build's sets, or an export's components, and how they were built."""

    schema_version: int = Field(alias="schema")
    kind: str = "export"
    source: _Source | None = None
    shapes: dict[str, tuple[int, int]] | None = None
    artifacts: dict[str, SetRecord] = Field(default_factory=dict)
    components: dict[str, _ExportComponent] = Field(default_factory=dict)
    pipeline_files: list[FileRecord] = Field(default_factory=list)
    recipe: _Recipe | None = None
    generation: dict[str, Any] | None = None  # the sampling validation used, when the recipe named a scheduler
    recommended: dict[str, Any] | None = None  # the fastest set and accelerations within the build's quality budget

    def sets(self) -> dict[str, SetRecord]:
        """The artifact sets, by key (`onnxruntime-fp32`); an export folder is one ONNX Runtime FP32 set."""
        if self.kind == "build":
            return self.artifacts
        components = {c: ComponentRecord(path=f"{c}/model.onnx", files=e.files) for c, e in self.components.items()}
        return {"onnxruntime-fp32": SetRecord(target="onnxruntime", precision="fp32", components=components,
                                              pipeline_files=self.pipeline_files)}


def read_manifest(folder: Path) -> Manifest:
    """Load a diffship output folder's manifest, with a clear error when the folder is not one or the file is broken."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DiffshipError(f"{folder} is not a diffship output folder (no {MANIFEST_NAME}); run `diffship export` first.")
    data = read_json(path)
    if data.get("schema") != MANIFEST_SCHEMA:
        raise DiffshipError(f"{path} has manifest schema {data.get('schema')!r}; this diffship reads {MANIFEST_SCHEMA}.")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DiffshipError(f"{path} is not a valid diffship manifest ({exc.error_count()} problem(s); first at "
                            f"{where}: {first['msg']}); the folder is damaged: rebuild it.") from None


def verify_files(root: Path, entries: list[FileRecord]) -> None:
    """Refuse a folder whose files differ from what its manifest recorded (size, then sha256)."""
    for entry in entries:
        path = inside(root, entry.path, f"{root / MANIFEST_NAME}: file")
        if not path.is_file():
            raise DiffshipError(f"{path} is listed in {root / MANIFEST_NAME} but missing; the artifact folder is incomplete.")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise DiffshipError(
                f"{path} does not match the sha256 recorded in {root / MANIFEST_NAME}: it was modified or "
                "corrupted after the build. Refusing to run it; rebuild the artifacts."
            )


@dataclass(frozen=True)
class ArtifactSet:
    """One deployable set: the pipeline folder (tokenizers, scheduler, configs) and one artifact per component."""

    root: Path
    pipeline: Path
    target: str
    precision: str
    components: dict[str, Path]
    shapes: dict[str, list[int]] | None  # {"batch": [min, max], "height": [...], "width": [...]}; None: any
    status: str  # "passed", "failed", "spec-checked" (converted and checked, could not run here), or "unvalidated"
    options: dict[str, Any] | None = None  # the target options the build used (device, hints...), to run it the same way
    family: str | None = None  # the pipeline family the manifest records (None: detect it from the pipeline folder)


def open_artifacts(folder: Path, target: str | None = None, precision: str | None = None,
                   verify: bool = True) -> ArtifactSet:
    """Pick one artifact set from a build or export folder. Every path it would read must lie inside the folder
    (always, since whoever wrote the folder wrote its hashes too); with `verify`, every file must match its hash."""
    folder = folder.resolve()
    manifest = read_manifest(folder)
    sets = manifest.sets()
    matching = {k: s for k, s in sets.items()
                if (target is None or s.target == target) and (precision is None or s.precision == precision)}
    if not matching:
        have = ", ".join(f"{s.target} {s.precision}" for s in sets.values()) or "no artifact sets"
        raise DiffshipError(f"{folder} has no {target or ''} {precision or ''} artifacts; it has: {have}.")
    chosen = next(iter(matching.values()))
    listed = f"{folder / MANIFEST_NAME}"
    check_links(folder)
    pipeline = inside(folder, chosen.pipeline, f"{listed}: pipeline folder")
    components = {c: inside(folder, e.path, f"{listed}: {c} artifact") for c, e in chosen.components.items()}
    if verify:
        verify_files(folder, [f for c in chosen.components.values() for f in c.files] + chosen.pipeline_files)
    for artifact in components.values():
        check_artifact(artifact)
    recorded = [t.options for t in (manifest.recipe.targets if manifest.recipe else []) if t.name == chosen.target]
    shapes = {k: list(v) for k, v in manifest.shapes.items()} if manifest.shapes else None
    return ArtifactSet(folder, pipeline, chosen.target, chosen.precision, components, shapes, chosen.status,
                       recorded[0] if recorded else None, manifest.source.family if manifest.source else None)
