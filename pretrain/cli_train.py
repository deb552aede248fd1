"""``pretrain train CONFIG [--section.key=value ...]``."""

from __future__ import annotations

import dataclasses
import sys

from pretrain.config import Config, load_config
from pretrain.errors import UserError

HELP = """usage: pretrain train [CONFIG] [--section.key=value ...]

CONFIG is a YAML file or the name of a preset in configs/ (e.g. tiny).
Overrides use dotted keys, e.g. --model.n_layers=4 --train.steps=100 --parallel.tp=2.
Run under torchrun for several processes:
  torchrun --nproc_per_node 4 -m pretrain train CONFIG --parallel.dp_shard=2 --parallel.tp=2

sections and keys:
"""


def config_help() -> str:
    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out.append(f"  --{prefix}{f.name}={v!r}")

    walk(Config(), "")
    return "\n".join(out)


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    path, overrides = None, []
    for a in argv:
        if a.startswith("--"):
            if "=" not in a:
                raise UserError(f"override '{a}': expected --section.key=value")
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise UserError(f"unexpected argument '{a}' (one CONFIG, then --key=value overrides)")
    return path, overrides


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP + config_help())
        return 0
    path, overrides = parse_args(argv)
    cfg = load_config(path, overrides)
    from pretrain.train import train_main

    return train_main(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
