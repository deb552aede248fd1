"""Worker for tests/test_muon.py (run under torchrun; holds no tests itself): each job is a
whole ``pretrain train`` run, all on one process group."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def exchange_check() -> dict:
    """Sharded orthogonalisation vs Newton-Schulz of the whole matrix, on 1-D and 2-D meshes:
    max difference, and (as a control) how far per-shard orthogonalisation would be."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from parallel.muon import Muon, newton_schulz

    ws = dist.get_world_size()
    meshes = {"1d": init_device_mesh("cpu", (ws,), mesh_dim_names=("a",))}
    if ws == 4:
        meshes["2d"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    layouts = {"1d": [[Shard(0)], [Shard(1)], [Replicate()]],
               "2d": [[Shard(0), Shard(1)], [Shard(1), Shard(0)], [Replicate(), Shard(0)], [Shard(0), Shard(0)]]}
    g = torch.Generator().manual_seed(7)
    worst, control = 0.0, float("inf")
    for key, mesh in meshes.items():
        fulls = [torch.randn(37, 90, generator=g), torch.randn(64, 48, generator=g), torch.randn(3, 24, 40, generator=g)]
        for placements in layouts[key]:
            params = [torch.nn.Parameter(distribute_tensor(f.clone(), mesh, placements)) for f in fulls]
            opt = Muon([{"params": params, "muon": True}], lr=0.1, bucket_numel=3000)  # several buckets
            opt._plan(params)
            out = opt._orthogonalise(params, {p: p.to_local() for p in params}, 5)
            for p, f in zip(params, fulls):
                want = distribute_tensor(newton_schulz(f), mesh, placements).to_local()
                worst = max(worst, float((out[p] - want).abs().max()) if want.numel() else 0.0)
                if p.ndim == 2 and any(pl.is_shard() for pl in placements) and p.to_local().numel():
                    local = p.to_local()
                    control = min(control, float((newton_schulz(local) - want).abs().max()))
    return {"max_diff": worst, "per_shard_diff": control}


def run_job(job: dict) -> dict:
    if job.get("kind") == "exchange":
        return exchange_check()
    import parallel
    from pretrain.config import load_config
    from pretrain.train import train

    parallel.shutdown_world = lambda world: None  # the job server owns the process group
    train(load_config(job["config"], job["overrides"]))
    return {}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torchrun_jobs import serve_jobs

    serve_jobs(run_job, sys.argv[1], sys.argv[2])
