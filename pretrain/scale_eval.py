"""Extra evaluations of scale-test points (``eval_tasks:`` in a sweep file).

``eval_tasks: [mqar]`` measures each finished point's MQAR recall (``pretrain/mqar_eval.py``)
on its final checkpoint and writes ``<run_dir>/eval_mqar.json``, which the report shows as the
``mqar_recall`` column. Options, all optional (defaults: the point's ``data.mqar.pairs`` and
``data.seq_len``, 256 samples, seed 0)::

    eval_tasks: [mqar]
    mqar: {pairs: 8, seq_len: 64, samples: 256, seed: 0}

A point whose ``eval_mqar.json`` was measured with the same options is not measured again.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.errors import UserError

TASKS = ("mqar",)
MQAR_OPTIONS = {"pairs": 1, "seq_len": 1, "samples": 1, "seed": 0, "batch_size": 1}  # option: minimum


def parse(data: dict, path: str) -> tuple[list[str], dict]:
    """(``eval_tasks``, ``mqar`` options) of a sweep file's mapping; UserError names the bad entry."""
    tasks = data.get("eval_tasks") or []
    if not isinstance(tasks, list) or any(t not in TASKS for t in tasks):
        raise UserError(f"{path}: eval_tasks: expected a list of {', '.join(TASKS)}; got {tasks!r}")
    opts = data.get("mqar") or {}
    if not isinstance(opts, dict):
        raise UserError(f"{path}: mqar: expected a mapping of {', '.join(MQAR_OPTIONS)}")
    for k, v in opts.items():
        if k not in MQAR_OPTIONS:
            raise UserError(f"{path}: mqar.{k}: unknown option; allowed: {', '.join(MQAR_OPTIONS)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < MQAR_OPTIONS[k]:
            raise UserError(f"{path}: mqar.{k}: {v!r} is not allowed; expected an integer >= {MQAR_OPTIONS[k]}")
    if opts and "mqar" not in tasks:
        raise UserError(f"{path}: mqar: options given but 'mqar' is not in eval_tasks")
    return list(tasks), dict(opts)


def measure_mqar(run_dir: Path, opts: dict) -> dict | None:
    """MQAR recall of ``run_dir``'s newest checkpoint (cached in ``eval_mqar.json``); None without one."""
    from pretrain import checkpoint as ckpt
    from pretrain.mqar_eval import checkpoint_recall

    out = Path(run_dir) / "eval_mqar.json"
    if ckpt.latest_checkpoint(run_dir) is None:
        return None
    try:
        old = json.loads(out.read_text())
        if old.get("options") == opts and old.get("checkpoint") == str(ckpt.latest_checkpoint(run_dir)):
            return old
    except (OSError, ValueError):
        pass
    result, _ = checkpoint_recall(str(run_dir), opts.get("pairs"), opts.get("seq_len"),
                                  opts.get("samples", 256), opts.get("seed", 0), opts.get("batch_size", 32))
    result["options"] = opts
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


def run_eval_tasks(tasks: list[str], mqar_opts: dict, run_dirs: dict[str, Path]) -> None:
    """Measure ``tasks`` for each finished point (``name -> run_dir``); a failure is reported, not fatal."""
    if "mqar" not in tasks:
        return
    for name, run_dir in run_dirs.items():
        try:
            r = measure_mqar(run_dir, mqar_opts)
        except UserError as e:
            print(f"  {name}: no MQAR recall: {e}", flush=True)
            continue
        if r is not None:
            print(f"  {name}: MQAR recall {r['recall']:.3f} ({r['pairs']} pairs, seq {r['seq_len']}, "
                  f"chance {r['chance']:.4f})", flush=True)


def read_evals(run_dir: Path) -> dict:
    """Report columns from a run's evaluation files (``mqar_recall``)."""
    try:
        return {"mqar_recall": float(json.loads((Path(run_dir) / "eval_mqar.json").read_text())["recall"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
