"""Constraints declared with each config field, checked by one generic walk of the tree.

Declare with the default: ``lr: float = spec(3e-4, gt=0)``, ``keep: int = spec(3, ge=0, note="0: keep all")``,
``run_dir: str = spec("runs/x", path="required")``, ``dtype: str = spec("fp32", choices=("fp32", "bf16"))``.
Undeclared floats must still be finite and undeclared ints fit in int64; rules that relate several
fields stay in the config's ``validate``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any

from models.errors import UserError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Spec:
    """What one field allows (numbers: bounds/finiteness; strings: choices or path rules)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    allow_inf: bool = False  # +-inf allowed (still within the bounds); NaN never is
    also: tuple = ()  # values allowed besides the range (e.g. -1: "the rest")
    choices: tuple | None = None
    path: str | None = None  # "required": non-empty path; "optional": "" means a default
    nonempty: bool = False  # strings: not empty or whitespace
    note: str = ""  # what special values mean, shown in the error

    def describe(self, kind: str) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if kind == "str":
            what = {"required": "a non-empty path", "optional": "a path, or empty for the default"}.get(
                self.path, "a non-empty string" if self.nonempty else "a string")
            return what + " (not blank, no NUL character)" + (f" ({self.note})" if self.note else "")
        bounds = [f"{op} {v:g}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                  if v is not None]
        what = ("an integer" if kind == "int" else "a number" if self.allow_inf else "a finite number")
        out = what + (" " + " and ".join(bounds) if bounds else "")
        if self.also:
            out += " or " + " or ".join(map(str, self.also))
        return out + (f" ({self.note})" if self.note else "")


def spec(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **constraints):
    """A dataclass field with its constraint (see :class:`Spec`) in ``metadata["spec"]``."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"spec": Spec(**constraints)})


_DEFAULT = Spec()


def field_spec(f: dataclasses.Field) -> Spec:
    return f.metadata.get("spec", _DEFAULT)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(key: str, value: Any, sp: Spec, kind: str) -> None:
    if sp.choices is not None:
        raise UserError(f"{key}: {_short(value)} is not one of {', '.join(map(str, sp.choices))}")
    big = " (at most 64 bits)" if kind == "int" and abs(value) > INT64_MAX else ""
    raise UserError(f"{key}: {_short(value)} is not allowed; expected {sp.describe(kind)}{big}")


def _kind(tp: Any) -> str | None:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp)


def check_value(key: str, value: Any, sp: Spec, kind: str) -> None:
    """Raise UserError unless ``value`` (annotated as ``kind``) satisfies ``sp``."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {_short(value)}")
        return
    if kind == "str":
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {_short(value)}")
        if sp.choices is not None:
            if value not in sp.choices:
                _fail(key, value, sp, kind)
            return
        blank = not value.strip()
        if "\x00" in value or (sp.path and value and blank) or ((sp.path == "required" or sp.nonempty) and blank):
            _fail(key, value, sp, kind)
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind == "int" else numbers.Real):
        raise UserError(f"{key}: expected {'an integer' if kind == 'int' else 'a number'}, got {_short(value)}")
    if sp.choices is not None:
        if value not in sp.choices:
            _fail(key, value, sp, kind)
        return
    if value in sp.also:
        return
    ok = not math.isnan(value) and (sp.allow_inf or not math.isinf(value))
    ok = ok and (kind != "int" or abs(value) <= INT64_MAX)
    for bound, test in ((sp.gt, lambda b: value > b), (sp.ge, lambda b: value >= b),
                        (sp.lt, lambda b: value < b), (sp.le, lambda b: value <= b)):
        ok = ok and (bound is None or test(bound))
    if not ok:
        _fail(key, value, sp, kind)


_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of dataclass ``obj`` (recursively) against its declaration."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        _check(key, getattr(obj, f.name), hints[f.name], field_spec(f))


def _check(key: str, value: Any, tp: Any, sp: Spec) -> None:
    if dataclasses.is_dataclass(value):
        check_fields(value, key)
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {_short(value)}")
        for i, item in enumerate(value):
            _check(f"{key}[{i}]", item, args[min(i, len(args) - 1)], sp)
        return
    kind = _kind(tp)
    if kind:
        check_value(key, value, sp, kind)


def need(cond: bool, key: str, msg: str) -> None:
    """A rule across fields: raise ``UserError("model.<key>: <msg>")`` unless ``cond``."""
    if not cond:
        raise UserError(f"model.{key}: {msg}")
