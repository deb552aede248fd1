"""Helpers for the config fuzz tests: every leaf of the config tree, found by introspection,
with hypothesis strategies for values its declaration refuses and values it allows."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import traceback
import typing
from dataclasses import dataclass
from typing import Callable

from hypothesis import strategies as st

from models.fields import INT64_MAX, Spec, field_spec
from pretrain.config import Config

KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass
class Leaf:
    key: str  # what the error line must name
    kind: str  # bool | int | float | str
    spec: Spec
    render: Callable[[str], str]  # the text a user types for this leaf -> one override
    get: Callable  # Config -> this leaf's value


def _text(kind: str, value) -> str:
    """What a user types for ``value``."""
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float":
        return repr(float(value))
    return str(value)


def leaves(cls=Config, prefix: str = "", getter=lambda c: c) -> list[Leaf]:
    """Every scalar of the config tree (tuple elements and one mixture entry included)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp, sp = prefix + f.name, hints[f.name], field_spec(f)
        get = (lambda g, n: lambda c: getattr(g(c), n))(getter, f.name)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, key + ".", get)
        elif origin is list and dataclasses.is_dataclass(args[0]):
            item = args[0]
            base = {g.name: g.default for g in dataclasses.fields(item)}
            base.update(path="d")
            item_hints = typing.get_type_hints(item)
            for g in dataclasses.fields(item):
                kind = KINDS[item_hints[g.name]]

                def render(text, key=key, name=g.name, kind=kind):
                    value = json.dumps(text, ensure_ascii=False) if kind == "str" else text
                    body = ", ".join(f"{k}: {value if k == name else json.dumps(v)}" for k, v in base.items())
                    return f"--{key}=[{{{body}}}]"
                out.append(Leaf(key, kind, field_spec(g), render,
                                (lambda get, n: lambda c: getattr(get(c)[0], n))(get, g.name)))
        elif origin is list:  # a list of scalars: one element
            def render(text, key=key, kind=KINDS[args[0]]):
                return f"--{key}=[{json.dumps(text, ensure_ascii=False) if kind == 'str' else text}]"
            out.append(Leaf(key, KINDS[args[0]], sp, render, (lambda get: lambda c: get(c)[0])(get)))
        elif origin is tuple:
            default = f.default
            for i, a in enumerate(args):
                def render(text, key=key, i=i, kind=KINDS[a], default=default):
                    parts = [text if j == i else _text(kind, v) for j, v in enumerate(default)]
                    return f"--{key}=[{', '.join(parts)}]"
                out.append(Leaf(key, KINDS[a], sp, render, (lambda get, i: lambda c: get(c)[i])(get, i)))
        else:
            out.append(Leaf(key, KINDS[tp], sp, lambda text, key=key: f"--{key}={text}", get))
    return out


# ---- values a declaration refuses / allows ------------------------------------------------

def invalid_texts(leaf: Leaf) -> st.SearchStrategy[str]:
    """Texts that must be refused: wrong type, out of range, NaN/inf, empty, huge."""
    sp, kind = leaf.spec, leaf.kind
    junk = st.sampled_from(["abc", "[1, 2]", "{a: 1}", "1.5.2", "--", "0x"])
    if kind == "bool":
        return st.one_of(junk, st.sampled_from(["1", "0", "yes", "on", "", "null", "1.0"]))
    if kind == "str":
        nul = st.text(max_size=5).map(lambda t: t + "\x00")
        if sp.choices is not None:
            return st.one_of(nul, st.text(max_size=12).filter(lambda t: t not in sp.choices))
        if sp.path or sp.nonempty:
            blank = st.text(alphabet=" \t\n\r", max_size=4)
            return st.one_of(nul, blank if sp.path != "optional" else blank.filter(bool))
        return nul
    strategies = [junk, st.sampled_from(["", "true", "null"])]
    if kind == "int":
        strategies += [st.sampled_from(["nan", "inf", "-inf", "1.5", "1e3"]),
                       st.integers(min_value=INT64_MAX + 1, max_value=2**200).map(str),
                       st.floats(allow_nan=False, allow_infinity=False)
                       .filter(lambda x: x != int(x)).map(repr)]
    else:
        overflow = ["inf", "-inf", ".inf", "1e400", "-1e999"]  # (1e400 is inf)
        strategies.append(st.sampled_from(["nan", "NaN", "-nan"] + ([] if sp.allow_inf else overflow)))
    if sp.choices is not None:
        strategies.append(st.integers(-10, 10).filter(lambda v: v not in sp.choices).map(str))
    else:
        low = sp.ge if sp.ge is not None else sp.gt
        if low is not None:  # below the range: < ge, or <= gt
            num = st.integers(max_value=int(math.ceil(low)) - 1 if sp.ge is not None else int(math.floor(low))) \
                if kind == "int" else st.floats(max_value=low, exclude_max=sp.ge is not None, allow_nan=False,
                                                allow_infinity=False)
            strategies.append(num.filter(lambda v: v not in sp.also).map(lambda v: _text(kind, v)))
        high = sp.le if sp.le is not None else sp.lt
        if high is not None:
            num = st.integers(min_value=int(math.ceil(high)), max_value=INT64_MAX) if kind == "int" else \
                st.floats(min_value=high, allow_nan=False, allow_infinity=False)
            strategies.append(num.filter(lambda v: (sp.le is None or v > sp.le) and (sp.lt is None or v >= sp.lt))
                              .map(lambda v: _text(kind, v)))
    return st.one_of(*strategies)


_PRINTABLE = st.characters(blacklist_categories=("Cs", "Cc"))


def valid_values(leaf: Leaf) -> st.SearchStrategy:
    """Values the declaration allows (cross-field rules may still refuse some)."""
    sp, kind = leaf.spec, leaf.kind
    if kind == "bool":
        return st.booleans()
    if sp.choices is not None:
        return st.sampled_from(sp.choices)
    if kind == "str":
        min_size = 1 if (sp.path == "required" or sp.nonempty) else 0
        return st.text(alphabet=_PRINTABLE, min_size=min_size, max_size=20).filter(
            lambda t: t == "" and min_size == 0 or t.strip() != "")
    lo = sp.ge if sp.ge is not None else sp.gt
    hi = sp.le if sp.le is not None else sp.lt
    if kind == "int":
        ints = st.integers(min_value=int(lo) if lo is not None else -INT64_MAX,
                           max_value=int(hi) if hi is not None else INT64_MAX).filter(
            lambda v: (sp.gt is None or v > sp.gt) and (sp.lt is None or v < sp.lt))
        return st.one_of(ints, st.sampled_from(sp.also)) if sp.also else ints
    return st.floats(min_value=lo, max_value=hi, exclude_min=sp.gt is not None and sp.ge is None,
                     exclude_max=sp.lt is not None and sp.le is None, allow_nan=False,
                     allow_infinity=sp.allow_inf)


# ---- running the CLI in-process -------------------------------------------------------------

def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``pretrain.cli.main(argv)``; a traceback is reported in stderr."""
    from pretrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001  (the fuzz asserts there is none)
            traceback.print_exc()
            rc = 1
    return rc, out.getvalue(), err.getvalue()


def assert_one_error(rc: int, err: str, needle: str, what: str) -> None:
    """Exit 2 with exactly one stderr line, ``error: ...`` naming ``needle``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, f"{what}: exit {rc}\n{err}"
    errors = [line for line in lines if re.match(r"^error: ", line)]
    assert len(errors) == 1 and len(lines) == 1, f"{what}: expected one error line, got\n{err}"
    assert needle in errors[0], f"{what}: error does not name {needle!r}: {errors[0]}"


def tree(root: str) -> list[str]:
    """Every path under ``root`` (to prove nothing was created)."""
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)
