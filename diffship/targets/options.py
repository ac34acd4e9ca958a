"""Every target's `[targets.options]` as one pydantic model on one base, and one policy for the VAE under FP16.

The base refuses unknown keys and bad values with the choices named (a `DiffshipError`: exit 2), reads TOML lists
as tuples, and is frozen and strict (`"yes"` is not a bool; the options' repr is part of cache keys). A target's
own rules are field types (`Literal` choices) and validators that raise `ValueError` with the whole sentence.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from diffship.errors import DiffshipDeprecation, DiffshipError
from diffship.models.families import family_named

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec

VaePrecision = Literal["auto", "fp16", "fp32"]
OLD_VAE_NAME = "fp16_vae"  # ONNX Runtime's and the web target's name for `vae_precision` before one name served all


# pydantic's bound errors, and how a field's bound of each kind reads
BOUNDS = {"greater_than": "above", "greater_than_equal": "at least", "less_than": "below",
          "less_than_equal": "at most", "gt": "above", "ge": "at least", "lt": "below", "le": "at most"}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]  # a TOML list of strings


class TargetOptions(BaseModel):
    """Base of every target's options: frozen, strict, unknown keys refused, errors said as sentences."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    title: ClassVar[str] = "target"  # the target as messages name it: "ONNX Runtime", "Core ML"

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None = None) -> Self:
        """The recipe's options for this target, or a DiffshipError naming the bad key or value and the choices."""
        try:
            return cls.model_validate(dict(options or {}))
        except ValidationError as exc:
            raise DiffshipError(explain(cls, exc)) from None


class VaeOptions(TargetOptions):
    """Options of a target that converts components to FP16, which declares `vae_precision: VaePrecision = "auto"`
    among its fields: "auto" keeps a VAE known to overflow in FP16 (SDXL's) in FP32 and converts the others, "fp16" /
    "fp32" force it (`vae_fp32_reason`). Its old name `fp16_vae` is still read, with a deprecation line."""

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        if not isinstance(data, dict) or OLD_VAE_NAME not in data:
            return data
        if "vae_precision" in data:
            raise ValueError(f"{cls.title} options give both vae_precision and {OLD_VAE_NAME} (its old name): keep "
                             "vae_precision.")
        warnings.warn(f"{cls.title} option {OLD_VAE_NAME} is now called vae_precision; the old name will stop "
                      "working in a later release.", DiffshipDeprecation, stacklevel=2)
        renamed = {k: v for k, v in data.items() if k != OLD_VAE_NAME}
        return renamed | {"vae_precision": data[OLD_VAE_NAME]}


def vae_fp32_reason(spec: ComponentSpec, mode: str) -> str | None:
    """Why `spec`'s component stays FP32 where a set converts to FP16, or None; `mode` is its `vae_precision`."""
    if spec.role not in ("vae_encoder", "vae_decoder") or mode == "fp16":
        return None
    if mode == "fp32":
        return "the recipe keeps the VAE in FP32 (vae_precision = 'fp32')"
    if (declared := family_named(spec.family)).vae_overflows_fp16:
        return f"{declared.short}'s VAE overflows in FP16 (vae_precision = 'auto'; set 'fp16' to convert it anyway)"
    return None


def explain(model: type[TargetOptions], exc: ValidationError) -> str:
    """One sentence per bad option, in diffship's words."""
    title = model.title
    errors = exc.errors(include_url=False)
    if unknown := sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"):
        known = sorted(model.model_fields)
        return f"Unknown {title} option(s) {', '.join(unknown)}; known: {', '.join(known)}."
    by_field: dict[str, list[Any]] = {}
    for e in errors:
        by_field.setdefault(str(e["loc"][0]) if e["loc"] else "", []).append(e)
    sentences = []
    for name, found in by_field.items():
        field = model.model_fields.get(name)
        value = found[0].get("input")
        custom = [str(e["ctx"]["error"]) for e in found if e["type"] == "value_error"]
        if custom:
            sentences += custom
        elif len(found) > 1 and field is not None:  # a union: say every kind of value it takes
            sentences.append(f"{title} {name} must be {_either(_allowed(field.annotation))}, not {value!r}.")
        else:
            sentences.append(_sentence(title, name, found[0], field))
    return " ".join(dict.fromkeys(sentences))


def _sentence(title: str, name: str, e: Any, field: Any) -> str:
    value = e.get("input")
    if e["type"] == "literal_error" and field is not None:
        return f"Unknown {title} {name} {value!r}; choose {_either([str(c) for c in _choices(field.annotation)])}."
    if e["type"] == "bool_type":
        return f"{title} {name} must be true or false, not {value!r}."
    if e["type"] in ("int_type", "int_parsing", "int_from_float"):
        return f"{title} {name} must be a whole number, not {value!r}."
    if e["type"] in ("float_type", "float_parsing"):
        return f"{title} {name} must be a number, not {value!r}."
    if e["type"] in BOUNDS and field is not None:
        return f"{title} {name} must be {_range(field)}, got {value!r}."
    where = ".".join(str(part) for part in e["loc"])
    return f"{title} option {where}: {e['msg'][0].lower()}{e['msg'][1:]} (got {value!r})."


def _range(field: Any) -> str:
    """A field's bounds in words: "within [0, 5]", "(0, 100]", "at least 1", "positive"."""
    bounds = {kind: getattr(m, kind) for m in field.metadata for kind in ("ge", "gt", "le", "lt") if hasattr(m, kind)}
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high:
        return f"within {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    if low == ("gt", 0):
        return "positive"
    kind, limit = low or high or ("", 0)
    return f"{BOUNDS.get(kind, kind)} {limit:g}"


def _leaves(annotation: Any) -> list[Any]:
    """An annotation's alternatives through unions and Optional: `bool`, `int`, a `Literal[...]`..."""
    if annotation is type(None):
        return []
    if get_origin(annotation) is Literal or not get_args(annotation):
        return [annotation]
    return [leaf for alternative in get_args(annotation) for leaf in _leaves(alternative)]


def _allowed(annotation: Any) -> list[str]:
    """What values of `annotation` look like, for a message: true, false, 'auto', a whole number..."""
    words = {bool: ["true", "false"], int: ["a whole number"], float: ["a number"], str: ["text"]}
    return [part for leaf in _leaves(annotation)
            for part in ([repr(c) for c in get_args(leaf)] if get_origin(leaf) is Literal else words.get(leaf, []))]


def _either(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The literal choices an annotation allows (through Optional and unions)."""
    return tuple(c for leaf in _leaves(annotation) if get_origin(leaf) is Literal for c in get_args(leaf))
