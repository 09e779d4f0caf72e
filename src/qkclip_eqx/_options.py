"""How an option is declared, once, beside its field, and THE validator of
option values.

A field of a config dataclass ([`qkclip_eqx.MLAConfig`][],
[`qkclip_eqx.TransformerConfig`][], [`qkclip_eqx.RunConfig`][], ...) carries
its help line, its resume rule and its range in the field's metadata:

    rope_theta: float = dataclasses.field(
        default=10_000.0, metadata=doc("RoPE base frequency", resume=..., check=">0")
    )

`RunConfig` makes one run field of every model-config field (see
`_run_config.py`), `qkclip-train` one flag, and `config.json` one key, all
from that declaration. [`check_fields`][] reads the annotation (types, the
allowed values of a `Literal`, a nested config) and `check`, for every entry
point: the constructor, `from_dict`/`from_json` and the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

#: The resume rule of a field that shapes the model, its optimizer state or
#: the data stream: a checkpoint whose value differs is refused.
MUST_MATCH_RULE = "must match"

#: A field's range, checked by `check_fields`.
Check = Literal[">0", ">=0", "[0,1]"]
_CHECKS: dict[str, tuple[str, Callable[[float], bool]]] = {
    ">0": ("> 0", lambda v: v > 0),
    ">=0": (">= 0", lambda v: v >= 0),
    "[0,1]": ("in [0, 1]", lambda v: 0 <= v <= 1),
}


def doc(
    help: str,
    *,
    resume: str | None = None,
    check: Check | None = None,
    run: Any = dataclasses.MISSING,
    run_name: str | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    """The metadata of one option (`dataclasses.field(metadata=doc(...))`).

    - `help`: the one line of its `qkclip-train` flag.
    - `resume`: `MUST_MATCH_RULE`, or what changing it on `--resume` does
      (docs/checkpoints.md). Required for a run option.
    - `check`: its range (`">0"`, `">=0"`, `"[0,1]"`), checked with the type.
    - `run`: a model-config field's value in a run when the config has no
      default (e.g. `dim`); `run=None` makes a model field no run option.
    - `run_name`: the run field's name where it differs from the field's.
    - `hint`: a line added to the error of a wrong value.
    """
    meta: dict[str, Any] = {"help": help}
    for key, value in (("resume", resume), ("check", check), ("run_name", run_name)):
        if value is not None:
            meta[key] = value
    if hint is not None:
        meta["hint"] = hint
    if run is not dataclasses.MISSING:
        meta["run"] = run
    return meta


@functools.cache
def hints_of(cls: type) -> dict[str, Any]:
    """The annotations of a config's fields, resolved (`typing.get_type_hints`
    returns nothing for the `no_type_check` configs)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        scope = vars(sys.modules[klass.__module__])
        for name, tp in vars(klass).get("__annotations__", {}).items():
            hints[name] = eval(tp, scope) if isinstance(tp, str) else tp  # noqa: S307  # our own annotations
    return hints


def is_config(tp: Any) -> bool:
    """Whether `tp` is a nested config dataclass (such as `YaRN`)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def optional_config(tp: Any) -> type | None:
    """The config class of an annotation `C | None` (or `C`), else None."""
    args = typing.get_args(tp) if _is_union(tp) else (tp,)
    found = [a for a in args if is_config(a)]
    return found[0] if found else None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_name(tp: Any) -> str:
    """An annotation in words: `int`, `'mla' or 'gqa'`, `float or null`."""
    if _is_union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def fits(value: Any, tp: Any) -> bool:
    """Whether `value` fits the annotation `tp` (an int fits a float; a bool
    is no number)."""
    if _is_union(tp):
        return any(fits(value, a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _problem(name: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with one field's value, or None."""
    if not fits(value, tp):
        args = typing.get_args(tp)
        choices = [a for a in args if isinstance(a, str)] or [
            c for a in args if typing.get_origin(a) is Literal for c in typing.get_args(a)
        ]
        if choices:
            allowed = ", ".join(repr(c) for c in choices)
            none = " or None" if type(None) in args else ""
            text = f"{name} must be one of {allowed}{none}, got {value!r}"
        else:
            text = f"{name} must be {type_name(tp)}, got {value!r}"
        return text + (f" ({meta['hint']})" if "hint" in meta else "")
    check = meta.get("check")
    if check is not None and value is not None:
        words, ok = _CHECKS[check]
        if not ok(value):
            return f"{name} must be {words}, got {value!r}"
    return None


def check_fields(obj: Any) -> None:
    """THE check of a config's fields against their declarations: each value
    fits its annotation (type, allowed values, nested config) and its `check`.

    Raises one `ValueError` naming every bad field as `Owner.field`, and the
    allowed values of an enum-like field.
    """
    owner = type(obj).__name__
    hints = hints_of(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        problem = _problem(f.name, getattr(obj, f.name), hints[f.name], f.metadata)
        if problem is not None:
            problems.append(f"{owner}.{problem}")
    if problems:
        raise ValueError("; ".join(problems))


def as_config(cls: type, value: Any, *, owner: str) -> Any:
    """`value` as a `cls` (a nested config): a `cls` as is, a dict (from
    `config.json` or flags) as `cls(**value)`, naming unknown or missing keys."""
    if not isinstance(value, dict):
        return value
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"{owner}: not fields of {cls.__name__}: {', '.join(unknown)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in value
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{owner} needs {', '.join(missing)} (the {cls.__name__} has no default)")
    hints = hints_of(cls)
    return cls(**{k: as_value(v, hints[k]) for k, v in value.items()})


def as_value(value: Any, tp: Any) -> Any:
    """A JSON value as its field's type: an integer where a float is due (JSON
    writes 30.0 as 30 in hand-written files) becomes that float."""
    floats = tp is float or float in typing.get_args(tp)
    if floats and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
