"""Training throughput of every tiny preset (``configs/*tiny.yaml``) on CPU, one table.

Each preset trains ``--steps`` optimizer steps in this process on one thread, all with the
same data (the tests' stdlib corpus, 512-token BPE), global batch, micro-batch and sequence
length; the preset's own model is kept (its vocabulary is set to the corpus's 512 and its
``max_seq_len`` to the sequence length: it sizes only the RoPE tables). Step time is the median over the
steps after ``--skip`` warm-up steps of the process CPU time of the trainer's step (one
thread: CPU time is the work, and a shared machine disturbs it less than wall time; the
trainer's own wall time per step, ``metrics.jsonl``, is printed beside it). A preset added to configs/ (``<name>_tiny.yaml``)
is picked up without editing this file; one this tree cannot build is listed as skipped::

    .venv/bin/python bench/bench_presets.py [--steps 30] [--seq 128] [--batch 8] [--out runs/bench_presets]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def presets() -> list[str]:
    """Preset names of every ``configs/*tiny.yaml`` (``tiny`` itself included), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in (ROOT / "configs").glob("*tiny.yaml"))


def preset_config(name: str, data: Path, run_dir: Path, args):
    """The preset with the bench's common data, batch, length and logging settings."""
    from pretrain.config import load_config

    over = {"data.path": str(data), "data.seq_len": args.seq, "model.vocab_size": 512,
            "train.global_batch": args.batch, "train.micro_batch": args.batch, "train.steps": args.steps,
            "train.eval_every": 0, "train.eval_batches": 1, "checkpoint.every": 0, "checkpoint.keep": 1,
            "logging.run_dir": str(run_dir), "logging.progress": "off", "train.dtype": "fp32",
            "model.max_seq_len": args.seq}
    return load_config(name, [f"--{k}={v}" for k, v in over.items()])


def cpu_timed_steps() -> list[float]:
    """Wrap the trainer's step to append its process CPU seconds to the returned list."""
    from pretrain.train import TrainLoop

    times: list[float] = []
    step = TrainLoop.step

    def timed(self):
        c0 = time.process_time()
        rec = step(self)
        times.append(time.process_time() - c0)
        return rec

    TrainLoop.step = timed
    return times


def bench_one(name: str, data: Path, out: Path, args, cpu: list[float]) -> dict:
    """Train preset ``name``; its row of the table."""
    from pretrain.train import train

    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = preset_config(name, data, run_dir, args)
    cpu.clear()
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall_step = statistics.median([r["step_time_s"] for r in recs if "step_time_s" in r][args.skip:])
    step = statistics.median(cpu[args.skip:])
    tokens = args.batch * args.seq
    return {"preset": name, "pattern": cfg.model.pattern, "params": summary["params"],
            "step_ms": 1000 * step, "tokens_per_s": tokens / step, "wall_step_ms": 1000 * wall_step,
            "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"], "wall_s": wall}


def table(rows: list[dict], args) -> str:
    lines = [f"{args.steps} steps, batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, "
             f"1 thread; step time: median CPU time after {args.skip} warm-up steps (tokens/s from it); "
             f"wall: the trainer's median wall time per step", "",
             "| preset | pattern | params | step ms (CPU) | tokens/s | step ms (wall) | loss first -> last |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['preset']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['preset']} | `{r['pattern']}` | {r['params']:,} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['wall_step_ms']:.1f} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    from pretrain.errors import UserError
    from sweep_arch import build_corpus

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated preset names")
    ap.add_argument("--out", default="runs/bench_presets")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    args = ap.parse_args()
    if args.steps <= args.skip:
        ap.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    out = Path(args.out)
    data = build_corpus(out)
    names = [n for n in presets() if not args.only or n in args.only.split(",")]
    rows, cpu = [], cpu_timed_steps()
    for name in names:
        try:
            row = bench_one(name, data, out / "runs", args, cpu)
        except UserError as e:  # a preset this tree cannot build or run at these settings
            row = {"preset": name, "skipped": str(e).splitlines()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = table(rows, args)
    print()
    print(text)
    (out / "table.md").write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
