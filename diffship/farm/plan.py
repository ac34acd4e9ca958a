"""A matrix as tasks (plain data): per build, an export per component, a calibration capture when a precision needs
one, a compile per (target, precision, component), a validation per set, and the build folder's assembly; each with
the tasks it waits for and the resources it needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffship.errors import DiffshipError
from diffship.farm.matrix import Matrix, Row
from diffship.stages.context import check_targets, outline
from diffship.stages.unit import Stage, Unit
from diffship.targets import get_target
from diffship.validation.reference import weights_bytes

GIB = 2**30
# A stage's peak RSS as the process's imports plus a multiple of the FP32 weights it holds (a component's, or the whole
# model's), from the peaks measured at full size (docs/performance.md, issue 23: sdxl-arch at 1024x1024, 9.6 GiB
# UNet, 12.9 GiB model): export 14.63 GiB, ONNX Runtime INT8 18.79, OpenVINO BF16 14.97, the calibration capture
# 17.21, staged validation 18.62; unstaged validation holds the baseline and a set at once (about twice).
IMPORTS = 1 * GIB
PER_WEIGHT: dict[str, tuple[float, str]] = {
    "compress": (2.0, "model"),
    "export": (1.45, "component"),
    "calibrate": (1.3, "model"),
    "compile": (1.9, "component"),
    "validate": (1.4, "model"),
    "validate-unstaged": (2.2, "model"),
    "assemble": (0.0, "model"),
}


@dataclass(frozen=True)
class Task:
    """One stage of one build: `unit` None is the build folder's assembly (a `build()` that finds every stage cached)."""

    key: str
    row: str
    unit: Unit | None
    after: tuple[str, ...]
    memory: int
    resources: dict[str, float] = field(default_factory=dict)
    cpus: int = 1

    def demand(self) -> dict[str, float]:
        """Everything a node must offer to run it, in Ray's resource names."""
        return {"CPU": float(self.cpus), "memory": float(self.memory), **self.resources}


def plan_matrix(matrix: Matrix) -> list[Task]:
    """Every build's tasks, each after the tasks it reads (the order a single process can run them in)."""
    return [task for row in matrix.rows for task in plan_row(row)]


def plan_row(row: Row) -> list[Task]:
    """One build's tasks. The model is resolved here (a built-in is made once, into the shared cache)."""
    recipe = row.recipe
    check_targets(recipe, installed=False)  # whether each target is installed is the node's to say
    o = outline(recipe, installed=False)
    source, specs = o.source, o.specs
    sizes = {s.name: weights_bytes(source.folder / s.module) for s in specs}
    model = sum(weights_bytes(source.folder / m) for m in {s.module for s in specs})
    staged = recipe.validation.staged is not False

    def memory(stage: str, component: str | None = None) -> int:
        factor, of = PER_WEIGHT[stage]
        return IMPORTS + int(factor * (sizes[component] if of == "component" and component else model))

    def task(unit: Unit | None, after: list[str], stage: str, resources: dict[str, float] | None = None,
             component: str | None = None) -> Task:
        label = unit.label() if unit else "assemble"
        return Task(f"{row.name}: {label}", row.name, unit, tuple(after), memory(stage, component), resources or {},
                    row.farm.cpus)

    tasks: list[Task] = []
    first = []
    if recipe.compress:
        tasks.append(task(Unit("compress"), [], "compress"))
        first = [tasks[-1].key]
    exports = {s.name: task(Unit("export", s.name), first, "export", component=s.name) for s in specs}
    tasks += exports.values()
    calibrated = [(t, p) for t in recipe.targets for p in t.precisions if get_target(t.name, False).needs_calibration(p)]
    calibration = task(Unit("calibrate"), first, "calibrate") if calibrated else None
    tasks += [calibration] if calibration else []
    validations = []
    for target in recipe.targets:
        backend = get_target(target.name, installed=False)
        options = backend.parse_options(target.options)
        for precision in target.precisions:
            reads = [calibration.key] if calibration and (target, precision) in calibrated else []
            compiles = []
            if backend.writes_artifacts(precision, options):
                for s in specs:
                    compiles.append(task(Unit("compile", s.name, target.name, precision), [exports[s.name].key, *reads],
                                         "compile", _resources(row, target.name, "compile"), s.name))
            tasks += compiles
            after = [c.key for c in compiles] or [e.key for e in exports.values()]
            validations.append(task(Unit("validate", None, target.name, precision),
                                    sorted({*after, *(e.key for e in exports.values())}),
                                    "validate" if staged else "validate-unstaged",
                                    _resources(row, target.name, "validate")))
    tasks += validations
    tasks.append(task(None, [v.key for v in validations], "assemble"))
    return tasks


def _resources(row: Row, target: str, stage: Stage) -> dict[str, float]:
    """Custom resources a target declares for a stage (`STAGE_RESOURCES`): the build's GPU kind, or `macos`."""
    needs = get_target(target, installed=False).STAGE_RESOURCES.get(stage)
    if needs == "accelerator":
        if not row.farm.accelerator_type:
            raise DiffshipError(f"Build {row.name!r} builds {target}, whose engines run only on the GPU kind that built "
                                "them: name it in the build's [builds.farm] table, e.g. accelerator_type = \"H100\".")
        # a whole GPU of that kind (Ray's `accelerator_type=` is the same 0.001 of the kind's label)
        return {"GPU": 1.0, f"accelerator_type:{row.farm.accelerator_type}": 0.001}
    return {needs: 1.0} if needs else {}

