"""Muon vs AdamW: optimizer-step time and bytes sent per rank under FSDP, and held-out loss.

    .venv/bin/python bench/bench_muon.py step [--d-model 256] [--layers 4] [--iters 5]
    .venv/bin/python bench/bench_muon.py quality [--steps 300] [--data DIR]

``step``: for dp_shard = 1, 2, 4 (torchrun, gloo), the median wall time of
``optimizer.step()`` for AdamW and for Muon on the same sharded model and gradients, their
ratio, and the bytes each rank sends for Muon's gather-to-owner and scatter-back (AdamW
sends none: it is element-wise on the shards). ``quality``: tiny dense model, same data
and steps, a small lr sweep for each optimizer; best held-out loss of each.
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


def step_worker(args) -> None:
    import torch
    import torch.distributed as dist

    from models.config import ModelConfig
    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from parallel import muon as muon_mod
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    torch.set_num_threads(1)
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ws > 1 else 0
    pcfg = ParallelConfig(dp_shard=ws)
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    mcfg = ModelConfig(vocab_size=4096, d_model=args.d_model, n_layers=args.layers, pattern="*-",
                       n_heads=args.d_model // 64, n_kv_heads=args.d_model // 64, max_seq_len=128)
    out = {}
    for name in ("adamw", "muon"):
        runner = parallelize(build_model(mcfg, init=False), pcfg, world, seed=0)
        opt = build_optimizer(runner.parts, OptimConfig(name=name, lr=1e-3))
        g = torch.Generator().manual_seed(rank)
        for p in runner.parts[0].parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            grad = torch.randn(local.shape, generator=g)
            p.grad = type(p).from_local(grad, p.device_mesh, p.placements) if hasattr(p, "to_local") else grad
        times = []
        muon_mod.SENT_BYTES[0] = 0
        for _ in range(args.iters + 1):
            if ws > 1:
                dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = {"s": statistics.median(times[1:]), "bytes": muon_mod.SENT_BYTES[0] / (args.iters + 1)}
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))
    if ws > 1:
        dist.destroy_process_group()


def step_bench(args) -> None:
    print(f"optimizer.step(), d_model {args.d_model}, {args.layers} blocks, fp32, gloo, median of {args.iters}")
    print(f"{'dp_shard':>8} {'adamw s':>9} {'muon s':>9} {'muon/adamw':>10} {'muon MB sent/rank':>18}")
    for n in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "_step_worker", "--out", str(out), "--d-model", str(args.d_model),
                   "--layers", str(args.layers), "--iters", str(args.iters)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            subprocess.run(cmd, check=True, env=env, timeout=1800, capture_output=True)
            r = json.loads(out.read_text())
        a, m = r["adamw"], r["muon"]
        print(f"{n:>8} {a['s']:>9.4f} {m['s']:>9.4f} {m['s'] / a['s']:>10.2f} {m['bytes'] / 2**20:>18.2f}")


def quality_bench(args) -> None:
    from pretrain.config import load_config
    from pretrain.train import train

    data = args.data
    if data is None:
        from pretrain.data.corpus import stdlib_corpus
        from pretrain.data.prepare import prepare
        from pretrain.data.tokenizer import train_tokenizer

        root = Path(tempfile.mkdtemp())
        corpus = stdlib_corpus(root / "corpus.jsonl", max_bytes=2_000_000)
        tok = train_tokenizer([str(corpus)], root / "tok", vocab_size=1024)
        prepare([str(corpus)], root / "data", tokenizer=tok, sample_len=129, val_fraction=0.05, workers=1,
                progress=False)
        data = str(root / "data")
    best = {}
    for name in args.optims:
        for lr in args.lrs:
            run = Path(tempfile.mkdtemp()) / "run"
            s = train(load_config("tiny", [
                f"--data.path={data}", f"--logging.run_dir={run}", "--logging.progress=off",
                f"--optim.name={name}", f"--optim.lr={lr}", f"--train.steps={args.steps}",
                "--optim.warmup_steps=20", "--data.seq_len=128", "--model.max_seq_len=128",
                "--model.vocab_size=1024", "--train.global_batch=16", "--train.eval_batches=8",
                "--checkpoint.every=0", "--model.d_model=128", "--model.n_layers=4"]))
            print(f"{name} lr {lr:g}: held-out {s['val_loss']:.4f}", flush=True)
            if name not in best or s["val_loss"] < best[name][1]:
                best[name] = (lr, s["val_loss"])
    for name, (lr, loss) in best.items():
        print(f"best {name}: lr {lr:g} held-out {loss:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["step", "quality", "_step_worker"])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="")
    ap.add_argument("--optims", nargs="+", default=["adamw", "muon"], help="quality: optimizers to run")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="quality: lr grid")
    args = ap.parse_args()
    {"step": step_bench, "quality": quality_bench, "_step_worker": step_worker}[args.mode](args)


if __name__ == "__main__":
    main()
