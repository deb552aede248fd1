"""Training stall per checkpoint save, synchronous vs ``checkpoint.async`` (not CI).

    .venv/bin/python bench/bench_async_ckpt.py [--d-model 768] [--layers 12] [--vocab 8192] [--saves 3]

Launches itself under torchrun (2 processes, gloo, CPU, FSDP dp_shard=2) with a ~100M-parameter
dense model and AdamW state (one training step first, so the optimizer state exists). Per mode:

- sync stall: wall time of ``save_checkpoint`` (DCP write, RNG, completion), all of which
  training waits for;
- async stall: wall time of ``AsyncSaver.save`` (staging the rank's shards into host memory;
  the first save also allocates the staging buffers, reported apart), with a training step
  running while the background write proceeds; the write's own duration is printed too;
- peak host RSS per rank (sampled every 5 ms from /proc/self/statm) during the async saves,
  and its increase over the RSS before the first async save (the staging copy).

Printed by rank 0 as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    def __init__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, rss_mb())


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from models.config import ModelConfig
    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain import checkpoint as ckpt
    from pretrain.async_ckpt import AsyncSaver

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    mc = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=12, n_kv_heads=4,
                     max_seq_len=64)
    pcfg = ParallelConfig(dp_shard=ws)
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    model = build_model(mc, init=False)
    n_params = sum(p.numel() for p in model.parameters())
    runner = parallelize(model, pcfg, world, seed=0)
    opt = torch.optim.AdamW([p for part in runner.parts for p in part.parameters()], lr=1e-4)
    x = torch.randint(0, args.vocab, (1, 33), generator=torch.Generator().manual_seed(rank))

    def train_step():
        runner.forward_backward([{"input_ids": x[:, :-1], "labels": x[:, 1:]}])
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    out = Path(args.out)
    sync = []
    for i in range(args.saves):
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.save_checkpoint(out / "sync", i + 1, runner.parts, opt, {"step": i + 1}, world, "{}", keep=1)
        sync.append(time.perf_counter() - t0)
    saver = AsyncSaver(world, 600)
    before = rss_mb()
    meter = PeakRSS()
    stalls, writes, phases = [], [], []
    for i in range(args.saves):
        dist.barrier()
        saver.save(out / "async", i + 1, runner.parts, opt, {"step": i + 1}, "{}", None, 1)
        stalls.append(saver.last_stall_s)
        phases.append(saver.last_phases)
        train_step()  # training goes on while the write proceeds
        saver.wait()
        writes.append(saver.last_write_s)
    peak = meter.stop()
    saver.close()
    res = {"rank": rank, "sync": sync, "async_stall": stalls, "async_write": writes, "rss_before_mb": before,
           "rss_peak_mb": peak, "phases": phases}
    gathered = [None] * ws
    dist.all_gather_object(gathered, res)
    if rank == 0:
        worst = lambda key, sl: [max(g[key][i] for g in gathered) for i in range(len(gathered[0][key]))][sl]
        sync_s = statistics.median(worst("sync", slice(None)))
        steady = statistics.median(worst("async_stall", slice(1, None)))
        print(json.dumps({
            "params_M": round(n_params / 1e6, 1), "processes": ws,
            "sync_stall_s": round(sync_s, 3),
            "async_stall_first_s": round(worst("async_stall", slice(0, 1))[0], 3),
            "async_stall_s": round(steady, 3), "async_over_sync": round(steady / sync_s, 3),
            "async_background_write_s": round(statistics.median(worst("async_write", slice(None))), 3),
            "peak_rss_mb_per_rank": [round(g["rss_peak_mb"]) for g in gathered],
            "staging_rss_increase_mb_per_rank": [round(g["rss_peak_mb"] - g["rss_before_mb"]) for g in gathered],
            "async_stall_phases_rank0": [{k: round(v, 3) for k, v in p.items()} for p in gathered[0]["phases"]],
        }, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--out", tmp, "--d-model", str(args.d_model), "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--saves", str(args.saves)]
        sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
