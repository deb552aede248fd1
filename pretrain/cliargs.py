"""Argument types for the verbs' argparse options, checked by the same declarations as config keys.

``p.add_argument("--workers", type=integer(ge=1))``, ``type=number(gt=0, lt=1)``, ``type=path()``
(``path(exists=True)`` for inputs), ``type=name()`` for other non-blank strings. A bad value is
one ``error: <prog>: argument --flag: ...`` line and exit 2, before any work starts.
``sbatch_value``/``sbatch_extra`` quote and check values for ``#SBATCH`` lines (``pretrain
launch slurm`` and ``pretrain data prepare --runner slurm``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.fields import Spec, check_value
from pretrain.errors import UserError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one UserError line (the CLI exits 2)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def _checked(kind: str, sp: Spec, text: str):
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind == 'int' else 'a number'}, "
                                         f"got {text!r}") from None
    try:
        check_value("", value, sp, kind)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None
    return value


def _typed(kind: str, sp: Spec, parse):
    parse.kind, parse.spec = kind, sp  # what the fuzz test reads to generate bad values
    parse.__name__ = kind
    return parse


def integer(**constraints):
    """An int option with Spec constraints (ge=, gt=, le=, lt=, also=, note=)."""
    sp = Spec(**constraints)
    return _typed("int", sp, lambda text: _checked("int", sp, text))


def number(**constraints):
    """A finite float option with Spec constraints."""
    sp = Spec(**constraints)
    return _typed("float", sp, lambda text: _checked("float", sp, text))


def _string(sp: Spec, exists: bool):
    def parse(text: str) -> str:
        try:
            check_value("", text, sp, "str")
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None
        if exists and not Path(text).exists():
            raise argparse.ArgumentTypeError(f"{text} does not exist")
        return text
    parse.exists = exists
    return _typed("str", sp, parse)


def path(exists: bool = False):
    """A non-blank path without NUL; ``exists``: it must be there already."""
    return _string(Spec(path="required"), exists)


def name():
    """A non-blank string (a split name, a JSON field, ...)."""
    return _string(Spec(nonempty=True), False)


def sbatch_value(name: str, value: str) -> str:
    """``value`` double-quoted for an ``#SBATCH`` line (UserError naming ``name`` if it cannot be)."""
    value = str(value)
    if not value or any(c in value for c in '"\\\n\r\0'):
        raise UserError(f"{name}: {value!r} cannot be passed to sbatch (empty, or holds a double "
                        f"quote, backslash or line break)")
    return f'"{value}"'


def sbatch_extra(extra: str) -> str:
    """One ``--sbatch`` value as a quoted ``#SBATCH`` option (UserError naming it if unusable)."""
    if not extra.startswith("--"):
        raise UserError(f"--sbatch {extra!r}: expected an sbatch long option such as --reservation=x")
    key, sep, value = extra.partition("=")
    if not key[2:].replace("-", "").isalnum():
        raise UserError(f"--sbatch {extra!r}: not an sbatch option name")
    return f"{key}={sbatch_value(key, value)}" if sep else key
