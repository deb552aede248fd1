"""Context parallelism on this machine (gloo, CPU; not CI).

    .venv/bin/python bench/bench_cp.py [--seqs 8192 16384 32768] [--cps 1 2 4] [--steps 2]

Per layout (cp = 1, 2, 4 at each sequence length; ring and all-to-all) it reports, per rank:

- activation memory: bytes of the tensors autograd saves for backward during one forward
  (distinct storages, counted by ``saved_tensors_hooks``), the maximum over ranks, and its
  ratio to the ideal ``cp=1 / cp`` (goal: <= 1.15);
- attention work: score-matrix elements the rank's ring blocks compute (from the ring's own
  block schedule), max/min over ranks (goal: <= 1.05);
- exposed communication: wall time spent waiting in the ring's transfers / all-to-alls
  during a training step, as a share of the step time (median of ``--steps`` after one
  warm-up).

The model: ``--d-model`` wide, one attention + one MLP sublayer, documents of ~2k tokens
(masking off by default: one process would save an S x S mask that cp never builds, which
flatters the ratio). With more processes than cores the times mostly show oversubscription.
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


def _batch(seq: int, vocab: int = 512, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (1, seq + 1), generator=g)
    x[0, torch.arange(2048, seq, 2048)] = 0  # EOS every 2k tokens: documents cross chunks
    inputs = x[:, :-1].contiguous()
    eos = (inputs == 0).long()
    return {"input_ids": inputs, "labels": x[:, 1:].contiguous(), "doc_ids": eos.cumsum(1) - eos}


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves while ``fn()`` runs."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def attention_work(seq: int, cp: int) -> list[float]:
    """Score elements each cp rank computes, from the ring's block schedule."""
    from parallel import ring_attention as ra

    c = seq // (2 * cp)
    work = []
    for r in range(cp):
        group = type("G", (), {"rank": r, "size": cp})()
        w = 0.0
        for j in range(cp):
            for _, _, kind, _, _ in ra._blocks(group, (r - j) % cp, c):
                w += c * c / (2 if kind == "causal" else 1)
        work.append(w)
    return work


def worker(spec: dict) -> dict:
    """One layout on this process group (or one process): memory, step time, exposed comm."""
    import torch
    import torch.distributed as dist

    from models.config import ModelConfig
    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from parallel import ring_attention as ra

    torch.set_num_threads(1)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    pcfg = ParallelConfig(cp=spec["cp"], dp_shard=1, cp_mode=spec["mode"])
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    cfg = ModelConfig(vocab_size=512, d_model=spec["d_model"], n_layers=1, pattern="*-", n_heads=4,
                      n_kv_heads=2, max_seq_len=spec["seq"], doc_mask=spec["doc_mask"])
    runner = parallelize(build_model(cfg, init=False), pcfg, world, seed=0)
    batch = _batch(spec["seq"])
    comm = {"t": 0.0}
    orig_wait, orig_s2h, orig_h2s = ra._wait, ra._seq_to_heads, ra._heads_to_seq

    def timed(fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                comm["t"] += time.perf_counter() - t
        return inner

    ra._wait, ra._seq_to_heads, ra._heads_to_seq = timed(orig_wait), timed(orig_s2h), timed(orig_h2s)
    mb = runner._to_device(batch)
    act, loss = saved_bytes(lambda: runner._micro_loss(mb))
    if spec["steps"] == 0:  # memory only
        ra._wait, ra._seq_to_heads, ra._heads_to_seq = orig_wait, orig_s2h, orig_h2s
        return {"act_bytes": act, "step_s": float("nan"), "exposed_share": float("nan")}
    loss.backward()
    times, shares = [], []
    for _ in range(spec["steps"] + 1):
        comm["t"] = 0.0
        t = time.perf_counter()
        runner.forward_backward([batch])
        dt = time.perf_counter() - t
        times.append(dt)
        shares.append(comm["t"] / dt)
    ra._wait, ra._seq_to_heads, ra._heads_to_seq = orig_wait, orig_s2h, orig_h2s
    return {"act_bytes": act, "step_s": statistics.median(times[1:]),
            "exposed_share": statistics.median(shares[1:])}


def _torchrun_worker(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_path).read_text())
    res = worker(spec)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def run(spec: dict) -> list[dict]:
    if spec["cp"] == 1:
        return [worker(spec)]
    with tempfile.TemporaryDirectory() as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(spec["cp"]), __file__, "--worker", str(sp), str(op)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return json.loads(op.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["ring", "alltoall"])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (0: memory only)")
    ap.add_argument("--doc-mask", action="store_true",
                    help="document masking (one process then builds and saves an S x S mask)")
    a = ap.parse_args()
    print(f"{'seq':>6} {'cp':>3} {'mode':>8} {'act MiB/rank':>12} {'vs ideal':>8} {'work max/min':>12} "
          f"{'step s':>7} {'exposed comm':>12}")
    for seq in a.seqs:
        base = None
        for cp in a.cps:
            for mode in (a.modes if cp > 1 else ["ring"]):
                res = run({"seq": seq, "cp": cp, "mode": mode, "d_model": a.d_model, "steps": a.steps,
                           "doc_mask": a.doc_mask})
                act = max(r["act_bytes"] for r in res)
                base = act if cp == 1 else base
                work = attention_work(seq, cp)
                ratio = act / (base / cp) if base else float("nan")
                print(f"{seq:>6} {cp:>3} {mode:>8} {act / 2**20:>12.1f} {ratio:>8.3f} "
                      f"{max(work) / min(work):>12.3f} {max(r['step_s'] for r in res):>7.2f} "
                      f"{max(r['exposed_share'] for r in res):>11.1%}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _torchrun_worker(sys.argv[2], sys.argv[3])
    else:
        main()
