"""What a Core ML package holds (its spec's inputs, outputs, ops and weight storage) and the checks of a package
against the ONNX export it must match."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffship.targets.records import read_record

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec

# What each precision does to the weights of the components named in the `compress` option (the rest are FP16).
COMPRESSION: dict[str, dict[str, Any] | None] = {
    "fp16": None,
    "fp32": None,
    "int8-weights": {"kind": "linear", "nbits": 8},
    "palette6": {"kind": "palette", "nbits": 6},
    "palette4": {"kind": "palette", "nbits": 4},
}
GROUPED_PALETTE_SPEC = 9  # per-grouped-channel look-up tables: iOS 18 / macOS 15
# The consumers whose constant inputs are compressed: layer weights and embedding tables. Other constants (the
# text encoder's causal mask, which holds -inf in FP16) must stay exact.
WEIGHT_CONSUMERS = ("linear", "conv", "conv_transpose", "matmul", "gather")
_ARRAY_DTYPES = {0x10000 | 32: "float32", 0x10000 | 16: "float16", 0x10000 | 64: "float64", 0x20000 | 32: "int32",
                 0x20000 | 8: "int8"}


PACKAGE = "model.mlpackage"


INFO = "coreml.json"


WEIGHT_ROLES = {"linear.weight", "conv.weight", "conv_transpose.weight", "matmul.x", "matmul.y", "gather.x"}


def load_coremltools() -> Any:
    """coremltools, imported without its import-time chatter (native proxies missing off macOS, untested torch),
    which diffship reports itself."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools  # optional: coreml

    return coremltools


def _operations(spec: Any) -> Iterator[Any]:
    """Every operation of an ML program spec, nested blocks included."""
    def walk(block: Any) -> Iterator[Any]:
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    for function in spec.mlProgram.functions.values():
        yield from walk(function.block_specializations[function.opset])


def _feeds(spec: Any) -> dict[str, set[str]]:
    """For each value name, the op inputs it feeds, as "linear.weight", "layer_norm.beta"..."""
    feeds: dict[str, set[str]] = {}
    for op in _operations(spec):
        for role, value in op.inputs.items():
            for argument in value.arguments:
                if argument.WhichOneof("binding") == "name":
                    feeds.setdefault(argument.name, set()).add(f"{op.type}.{role}")
    return feeds


def non_weight_constants(spec: Any) -> list[str]:
    """Names of the const ops whose values feed no layer weight or embedding table (masks, biases, norm scales)."""
    feeds = _feeds(spec)
    return [op.attributes["name"].immediateValue.tensor.strings.values[0] for op in _operations(spec)
            if op.type == "const" and not feeds.get(op.outputs[0].name, set()) & WEIGHT_ROLES]


def op_counts(spec: Any) -> Counter[str]:
    return Counter(op.type for op in _operations(spec))


def inspect_package(package: Path) -> dict[str, Any]:
    """Read a package's spec (no Core ML runtime needed): I/O with dtypes and shapes, op counts, how its weights are
    stored (dtype of each weight blob), the largest weight still in float, and the size on disk."""
    ct = load_coremltools()
    from coremltools.proto import MIL_pb2  # optional: coreml

    spec = ct.utils.load_spec(str(package))
    storage: Counter[str] = Counter()
    float_consts: dict[str, int] = {}  # const output name -> elements, for consts stored in float
    compressed: list[str] = []  # outputs of constexpr (decompressing) ops
    lut_entries: Counter[int] = Counter()  # look-up table sizes: 2 ** bits
    dtype_name = MIL_pb2.DataType.Name
    for op in _operations(spec):
        for role, value in [*((k, a.value) for k, v in op.inputs.items() for a in v.arguments
                              if a.WhichOneof("binding") == "value"), *op.attributes.items()]:
            if value.HasField("blobFileValue"):
                dtype = dtype_name(value.type.tensorType.dataType)
                storage[f"{op.type}.{role} {dtype}"] += 1
                dims = [d.constant.size for d in value.type.tensorType.dimensions]
                if op.type == "constexpr_lut_to_dense" and role == "lut":  # (..., entries, 1) from iOS 18, (entries,)
                    lut_entries[dims[-2] if len(dims) > 1 else dims[0]] += 1
                if op.type == "const" and dtype.startswith("FLOAT"):
                    float_consts[op.outputs[0].name] = int(np.prod(dims))
        if op.type.startswith("constexpr_"):
            compressed.append(op.outputs[0].name)
    roles = _feeds(spec)
    ops = op_counts(spec)
    return {
        "specification_version": spec.specificationVersion, "ml_program": spec.WhichOneof("Type") == "mlProgram",
        "functions": {name: f.opset for name, f in spec.mlProgram.functions.items()},
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output], "metadata": dict(spec.description.metadata.userDefined),
        "ops": dict(ops.most_common()), "op_count": sum(ops.values()), "weights": dict(storage.most_common()),
        # Biases and normalization scales are never compressed; what compression must reach are the layers' weights.
        "largest_float_weight": max((n for name, n in float_consts.items()
                                     if any(r.endswith(".weight") for r in roles.get(name, ()))), default=0),
        "lut_entries": {str(k): n for k, n in sorted(lut_entries.items())},
        "compressed_feeds": sorted({r for name in compressed for r in roles.get(name, ())}),
        "bytes": sum(p.stat().st_size for p in package.rglob("*") if p.is_file()),
    }


def _feature(f: Any) -> dict[str, Any]:
    array = f.type.multiArrayType
    return {"name": f.name, "dtype": _ARRAY_DTYPES.get(array.dataType, str(array.dataType)), "shape": list(array.shape),
            "enumerated": [list(s.shape) for s in array.enumeratedShapes.shapes]}


def check_package(package: Path) -> dict[str, Any]:
    """Verify a converted package against what it had to be: the ONNX export's input and output names and dtypes,
    the shapes it was built for (and none beyond), the deployment target, the weights' storage for its precision,
    and its metadata. Each check with its detail; `passed` when all pass."""
    info = read_info(package)
    held = inspect_package(package)
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    check("ML program", held["ml_program"] and held["specification_version"] == info["specification_version"],
          f"specification {held['specification_version']} ({info['minimum_deployment_target']} needs "
          f"{info['specification_version']})")
    expected_in, expected_out = info["onnx_io"]["inputs"], info["onnx_io"]["outputs"]
    for role, have, want in (("inputs", held["inputs"], expected_in), ("outputs", held["outputs"], expected_out)):
        names = [f["name"] for f in have]
        check(f"{role}: names", names == [f["name"] for f in want], f"{names} (ONNX: {[f['name'] for f in want]})")
        dtypes = {f["name"]: f["dtype"] for f in have}
        wrong = {f["name"]: (dtypes.get(f["name"]), f["dtype"]) for f in want if dtypes.get(f["name"]) != f["dtype"]}
        check(f"{role}: dtypes", not wrong, "as ONNX" if not wrong else
              "; ".join(f"{n}: {h} (ONNX {w})" for n, (h, w) in wrong.items()))
    built = info["shapes"]
    problems = []
    for f, onnx_f in zip(held["inputs"], expected_in, strict=False):
        accepts = f["enumerated"] or [f["shape"]]
        wanted = [s[f["name"]] for s in built if f["name"] in s]
        if sorted(map(tuple, accepts)) != sorted(set(map(tuple, wanted))):
            problems.append(f"{f['name']} accepts {accepts}, built for {wanted}")
        for shape in accepts:
            fixed = [(i, d) for i, d in enumerate(onnx_f["shape"]) if isinstance(d, int) and d > 0]
            if len(shape) != len(onnx_f["shape"]) or any(shape[i] != d for i, d in fixed):
                problems.append(f"{f['name']} shape {shape} does not fit the ONNX input {onnx_f['shape']}")
    check("inputs: shapes", not problems, "; ".join(problems) or
          ", ".join(f"{f['name']} {f['enumerated'] or f['shape']}" for f in held["inputs"]))
    out_problems = []
    for f, onnx_f in zip(held["outputs"], expected_out, strict=False):
        if f["shape"] and len(f["shape"]) != len(onnx_f["shape"]):
            out_problems.append(f"{f['name']} has rank {len(f['shape'])}, ONNX {len(onnx_f['shape'])}")
        elif f["shape"] and any(isinstance(d, int) and d > 0 and f["shape"][i] != d for i, d in enumerate(onnx_f["shape"])):
            out_problems.append(f"{f['name']} shape {f['shape']} does not fit the ONNX output {onnx_f['shape']}")
    check("outputs: shapes", not out_problems, "; ".join(out_problems) or
          ", ".join(f"{f['name']} {f['shape'] or 'follows the input shape'}" for f in held["outputs"]))
    check("weights", *_storage_verdict(info, held))
    meta = held["metadata"]
    check("metadata", meta.get("diffship.precision") == info["precision"] and "diffship.component" in meta
          and "diffship.version" in meta, f"precision {meta.get('diffship.precision')}, "
          f"component {meta.get('diffship.component')}")
    return {"checks": checks, "passed": all(c["passed"] for c in checks), "op_count": held["op_count"],
            "ops": held["ops"], "weights": held["weights"], "bytes": held["bytes"]}


def _storage_verdict(info: dict[str, Any], held: dict[str, Any]) -> tuple[bool, str]:
    """Whether the weights are stored as the precision says: all float in the compute precision when uncompressed;
    compressed (int8 data, or uint4 / uint6 look-up indices) above the size threshold when compressed."""
    weights, compression = held["weights"], info["compression"]
    floats = {k: n for k, n in weights.items() if k.startswith("const.")}
    summary = ", ".join(f"{n} x {k}" for k, n in weights.items())
    if compression is None:
        want = "FLOAT16" if info["compute_precision"] == "fp16" else "FLOAT32"
        ok = bool(floats) and all(k.endswith(want) for k in floats) and all(k.startswith("const.") for k in weights)
        return ok, f"{summary} (expected every weight {want}, none compressed)"
    precision, ios18 = info["precision"], info["specification_version"] >= GROUPED_PALETTE_SPEC
    bits = (COMPRESSION.get(precision) or {}).get("nbits", 0)
    if precision == "int8-weights":
        want = "constexpr_blockwise_shift_scale.data INT8" if ios18 else "constexpr_affine_dequantize.quantized_data INT8"
    else:  # n-bit indices from iOS 18 on; packed into bytes before, where the table size tells the bits
        want = f"constexpr_lut_to_dense.indices UINT{bits if ios18 else 8}"
    tables = held.get("lut_entries", {})
    wrong_tables = precision != "int8-weights" and set(tables) != {str(2**bits)}
    threshold = compression["weight_threshold"]
    stray = [r for r in held["compressed_feeds"] if r.split(".")[0] not in WEIGHT_CONSUMERS]
    ok = weights.get(want, 0) > 0 and held["largest_float_weight"] <= threshold and not stray and not wrong_tables
    if precision != "int8-weights":
        want += f", look-up tables of {2**bits} entries (found {', '.join(tables) or 'none'})"
    return ok, (f"{summary}; largest weight left in float: {held['largest_float_weight']} elements "
                f"(threshold {threshold}; expected {want}); compressed values feed "
                f"{', '.join(held['compressed_feeds'])}" + (f" (not layer weights: {', '.join(stray)})" if stray else ""))


def read_info(package: Path) -> dict[str, Any]:
    """The coreml.json beside a package, or a clear error when the package or its record is missing."""
    return read_record(package, INFO, "Core ML package")


def held_io(io: dict[str, Any], spec: ComponentSpec) -> dict[str, Any]:
    """The ONNX export's I/O less the outputs the package leaves out (`ComponentSpec.pipeline_outputs`)."""
    kept = {o.name for o in spec.outputs}
    return {**io, "outputs": [f for f in io["outputs"] if f["name"] in kept]}


def verify(components: dict[str, Path]) -> dict[str, Any]:
    """Spec checks of every package of a set (runs anywhere): per component, and whether all passed."""
    results = {name: check_package(path) for name, path in components.items()}
    return {"components": results, "passed": all(r["passed"] for r in results.values())}
