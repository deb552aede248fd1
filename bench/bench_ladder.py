"""Residual modes under tensor parallelism: forward-only latency, training step time and
exposed communication for ``standard`` vs ``ladder`` vs ``parallel`` at tp=2 (not CI).

    .venv/bin/python bench/bench_ladder.py [--d-model 512] [--layers 4] [--prompt 32] [--iters 20]

Launches itself under torchrun (2 processes, gloo, CPU). All three modes run in the same
process group, same model size, same inputs, interleaved round by round so that machine
noise hits them alike. Printed per mode:

- forward ms: median latency of one forward pass over a short prompt (batch 1), no grad:
  the inference-style path (no KV cache, not a serving system);
- train ms: median wall time of a forward/backward/optimizer step;
- exposed comm: from torch.profiler, the time the rank spent blocked waiting for a
  collective (``wait_tensor``, plus synchronous c10d collectives) as a share of the
  profiled wall time. With ladder the sublayer-output reductions (forward) and the
  input-gradient reductions (backward) are waited one sublayer later, so less of their
  time should be blocked.

On gloo/CPU the collectives run on CPU threads that compete with the compute for the
same (shared) cores, so the overlap a GPU gets from a separate NCCL stream is only partly
available here; read the ratios as indicative and noisy.
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

MODES = ("standard", "ladder", "parallel")
WAIT_KEYS = ("wait_tensor", "c10d::allreduce_", "c10d::reduce_scatter_", "c10d::allgather_",
             "c10d::_allgather_base_", "c10d::_reduce_scatter_base_")


def _exposed_ms(prof) -> tuple[float, dict]:
    total, keys = 0.0, {}
    for e in prof.key_averages():
        if any(k in e.key for k in WAIT_KEYS):
            keys[e.key] = e.self_cpu_time_total / 1000.0  # us -> ms, self time: no double count
            total += keys[e.key]
    return total, keys


def worker(args) -> dict:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from models.config import ModelConfig
    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pcfg = ParallelConfig(tp=2, dp_shard=1, sequence_parallel=args.sp)
    world = build_world(pcfg, rank, dist.get_world_size(), 0, torch.device("cpu"))
    built = {}
    for mode in MODES:
        cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, pattern="*-",
                          n_heads=args.heads, n_kv_heads=args.heads, max_seq_len=max(args.seq, args.prompt),
                          residual=mode)
        runner = parallelize(build_model(cfg, init=False), pcfg, world, seed=0)
        opt = build_optimizer(runner.parts, OptimConfig(lr=1e-4, warmup_steps=0))
        built[mode] = (runner, opt)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    mb = [{"input_ids": x[:, :-1], "labels": x[:, 1:]}]

    def forward(mode):
        with torch.no_grad():
            built[mode][0].model(prompt)

    def train_step(mode):
        runner, opt = built[mode]
        runner.forward_backward(mb)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, mode):
        dist.barrier()
        t0 = time.perf_counter()
        fn(mode)
        return (time.perf_counter() - t0) * 1000

    times = {m: {"forward": [], "train": []} for m in MODES}
    for m in MODES:  # warm-up
        for _ in range(2):
            forward(m)
            train_step(m)
    for _ in range(args.iters):
        for m in MODES:
            times[m]["forward"].append(timed(forward, m))
        for m in MODES:
            if len(times[m]["train"]) < args.train_iters:
                times[m]["train"].append(timed(train_step, m))
    out = {}
    for m in MODES:
        res = {k: statistics.median(v) for k, v in times[m].items()}
        for what, fn, n in (("forward", forward, args.iters), ("train", train_step, args.train_iters)):
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(m)
                wall = (time.perf_counter() - t0) * 1000
            ms, keys = _exposed_ms(prof)
            res[f"{what}_exposed_frac"] = ms / wall
            res[f"{what}_detail"] = {k: v / wall for k, v in keys.items()}
        out[m] = res
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    dist.destroy_process_group()
    return gathered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4, help="blocks (attention + MLP each)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length of the forward-only path")
    ap.add_argument("--seq", type=int, default=128, help="training sequence length")
    ap.add_argument("--batch", type=int, default=4, help="training rows per step")
    ap.add_argument("--iters", type=int, default=20, help="forward-only repetitions")
    ap.add_argument("--train-iters", type=int, default=6)
    ap.add_argument("--sp", action="store_true", help="sequence parallel")
    ap.add_argument("--detail", action="store_true", help="per-op breakdown of the blocked time (rank 0)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args)
        if int(os.environ["RANK"]) == 0:
            Path(args.worker).write_text(json.dumps(res))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, *sys.argv[1:], "--worker", str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=1800)
        per_rank = json.loads(out.read_text())
    # a step is as slow as its slowest rank
    res = {m: {k: max(r[m][k] for r in per_rank) for k in per_rank[0][m] if "detail" not in k}
           for m in MODES}
    sp = " +sp" if args.sp else ""
    print(f"tp=2{sp} gloo, d_model={args.d_model}, {args.layers} blocks; forward: batch 1 x {args.prompt} "
          f"tokens; train: {args.batch} x {args.seq} tokens (median ms; noisy shared CPU)")
    print(f"{'mode':10s} {'forward ms':>11s} {'vs std':>7s} {'train ms':>9s} {'vs std':>7s} "
          f"{'fwd exposed comm':>17s} {'train exposed comm':>19s}")
    base = res["standard"]
    for m in MODES:
        r = res[m]
        print(f"{m:10s} {r['forward']:11.2f} {r['forward'] / base['forward']:7.3f} {r['train']:9.1f} "
              f"{r['train'] / base['train']:7.3f} {100 * r['forward_exposed_frac']:16.1f}% "
              f"{100 * r['train_exposed_frac']:18.1f}%")
    if args.detail:
        for m in MODES:
            for what in ("forward", "train"):
                d = per_rank[0][m][f"{what}_detail"]
                print(f"  rank 0 {m} {what}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(d.items())))


if __name__ == "__main__":
    main()
