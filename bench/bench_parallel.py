"""Per-rank training-state memory and step time of parallel layouts on this machine (not CI).

    .venv/bin/python bench/bench_parallel.py [--steps 6] [--d-model 256] [--layouts all]

Memory = this rank's parameters + gradients + AdamW state (local shards, bytes counted
from the tensors), for dp_shard = 1, 2, 4 next to the ideal 1/N. Step time = median
wall time of a forward/backward/optimizer step after two warm-up steps. Each layout
runs under torchrun on gloo (CPU); with more processes than cores the times mostly show
oversubscription, so read them as a smoke check of overheads, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "single": (1, {}),
    "dp_shard=2": (2, {"dp_shard": 2}),
    "dp_shard=4": (4, {"dp_shard": 4}),
    "dp_replicate=2": (2, {"dp_replicate": 2, "dp_shard": 1}),
    "hsdp 2x2": (4, {"dp_replicate": 2, "dp_shard": 2}),
    "tp=2": (2, {"tp": 2, "dp_shard": 1}),
    "tp=2 +sp": (2, {"tp": 2, "dp_shard": 1, "sequence_parallel": True}),
    "pp=2 1f1b": (2, {"pp": 2, "dp_shard": 1}),
    "pp=2 interleaved": (2, {"pp": 2, "dp_shard": 1, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}),
    "pp=2 zbv": (2, {"pp": 2, "dp_shard": 1, "pp_schedule": "zbv"}),
    "tp=2 x dp_shard=2": (4, {"tp": 2, "dp_shard": 2, "sequence_parallel": True}),
    "pp=2 x tp=2": (4, {"pp": 2, "tp": 2, "dp_shard": 1, "sequence_parallel": True}),
    "pp=2 x dp_shard=2": (4, {"pp": 2, "dp_shard": 2}),
}


def _bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def worker(layout: dict, args) -> dict:
    import torch
    import torch.distributed as dist

    from models.config import ModelConfig
    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    torch.set_num_threads(1)
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ws > 1 else 0
    pcfg = ParallelConfig(**layout)
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, pattern="*-",
                      n_heads=8, n_kv_heads=4, max_seq_len=args.seq)
    runner = parallelize(build_model(cfg, init=False), pcfg, world, seed=0)
    opt = build_optimizer(runner.parts, OptimConfig(lr=1e-3, warmup_steps=0))
    rows = args.batch // world.dp_size
    micro = max(rows // 2, 1)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.steps + 2):
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        x = x[world.dp_rank * rows:(world.dp_rank + 1) * rows]
        mbs = [{"input_ids": x[i:i + micro, :-1], "labels": x[i:i + micro, 1:]} for i in range(0, rows, micro)]
        if ws > 1:
            dist.barrier()
        t0 = time.perf_counter()
        loss = runner.forward_backward(mbs)
        runner.reduce_loss(loss)
        runner.clip_grad_norm_(1.0)
        mem = {"params": sum(_bytes(p) for part in runner.parts for p in part.parameters()),
               "grads": sum(_bytes(p.grad) for part in runner.parts for p in part.parameters() if p.grad is not None)}
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ws > 1:
            dist.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    mem["optim"] = sum(_bytes(v) for st in opt.state.values() for v in st.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)
    out = {"rank": rank, "step_s": statistics.median(times), **mem}
    if ws > 1:
        allout = [None] * ws
        dist.all_gather_object(allout, out)
        dist.destroy_process_group()
        out = {"ranks": allout}
    else:
        out = {"ranks": [out]}
    return out


def launch(name: str, nproc: int, layout: dict, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable]
        if nproc > 1:
            cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [__file__, "--worker", json.dumps(layout), "--out", str(out), "--steps", str(args.steps),
                "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab),
                "--seq", str(args.seq), "--batch", str(args.batch)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layouts", default="all", help="comma-separated names, or all")
    args = ap.parse_args()
    if args.worker is not None:
        res = worker(json.loads(args.worker), args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(res))
        return
    names = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    results = {n: launch(n, *LAYOUTS[n], args) for n in names}
    print(f"model: d_model={args.d_model} layers={args.layers}x'*-' vocab={args.vocab} seq={args.seq} "
          f"global batch={args.batch}; {os.cpu_count()} CPU cores, gloo\n")
    base = results.get("single")
    if base:
        print("per-rank training state (params + grads + AdamW), MiB; rank 0")
        print(f"{'layout':<14}{'params':>9}{'grads':>9}{'optim':>9}{'total':>9}{'vs 1 rank':>11}{'ideal':>8}")
        b = base["ranks"][0]
        b_total = b["params"] + b["grads"] + b["optim"]
        for n, dp in (("single", 1), ("dp_shard=2", 2), ("dp_shard=4", 4)):
            if n not in results:
                continue
            r = max(results[n]["ranks"], key=lambda r: r["params"] + r["grads"] + r["optim"])
            tot = r["params"] + r["grads"] + r["optim"]
            print(f"{n:<14}{r['params'] / 2**20:>9.2f}{r['grads'] / 2**20:>9.2f}{r['optim'] / 2**20:>9.2f}"
                  f"{tot / 2**20:>9.2f}{tot / b_total:>11.3f}{1 / dp:>8.3f}")
        print()
    print(f"{'layout':<22}{'procs':>6}{'step (s)':>10}{'vs single':>11}")
    for n, res in results.items():
        t = max(r["step_s"] for r in res["ranks"])
        rel = f"{t / max(r['step_s'] for r in base['ranks']):.2f}x" if base else "-"
        print(f"{n:<22}{len(res['ranks']):>6}{t:>10.3f}{rel:>11}")


if __name__ == "__main__":
    main()
