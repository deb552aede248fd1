"""Worker for the context-parallel tests (ranks forked by tests/fork_run.py, or under torchrun;
holds no tests itself).

Jobs: ``attn`` compares ring / all-to-all attention (forward and every input gradient)
with single-process attention on the whole sequence; ``train`` runs a layout for a few
steps on real text and reports per-step losses, every parameter's gradient after step 1
(full tensors, by name) and the final weights (see tests/test_context_parallel.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _attn_inputs(B, S, H, Hkv, D, docs: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (H, Hkv, Hkv))
    w = torch.randn(B, S, H, D, generator=g)
    doc = None
    if docs:  # boundaries at random places, some documents spanning several chunks
        starts = (torch.rand(B, S, generator=g) < 6.0 / S).long()
        doc = starts.cumsum(1)
    return q, k, v, w, doc


def attn_job(job: dict) -> dict:
    """Max |difference| of outputs and q/k/v gradients vs ``kernels.reference.attention``."""
    import torch.distributed as dist

    from kernels.reference import attention as reference
    from kernels.reference import doc_segments
    from parallel import ring_attention as ra
    from parallel.context_parallel import chunk_positions, unsplit

    ra.TILE = job.get("tile", ra.TILE)
    os.environ[ra.BLOCK_ENV] = job.get("blocks", "auto")  # torch (reference) or fused block kernels
    n, r = dist.get_world_size(), dist.get_rank()
    B, S, H, Hkv, D = job["shape"]
    q, k, v, w, doc = _attn_inputs(B, S, H, Hkv, D, job["docs"])
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference(*full, doc)
    (ref * w).sum().backward()
    pos = chunk_positions(S, n, r)
    local = [t.index_select(1, pos).clone().requires_grad_() for t in (q, k, v)]
    group = ra.CPGroup(dist.group.WORLD)
    if job["mode"] == "ring":
        out = ra.ring_attention(*local, doc_segments(doc) if doc is not None else None, group)
    else:
        out = ra.alltoall_attention(*local, doc, group)
    (out * w.index_select(1, pos)).sum().backward()

    def gathered(t):
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous())
        return unsplit(parts, 1)

    diffs = {"out": (gathered(out.detach()) - ref.detach()).abs().max().item()}
    for name, a, b in zip("qkv", local, full):
        diffs["d" + name] = (gathered(a.grad) - b.grad).abs().max().item()
    diffs["scale"] = max(ref.abs().max().item(), *(t.grad.abs().max().item() for t in full))
    return diffs


def run_job(job: dict) -> dict:
    if job["kind"] == "attn":
        return attn_job(job)
    from cp_parity import resume_job, train_job

    return resume_job(job) if job["kind"] == "resume" else train_job(job)


def preload() -> None:
    """What the jobs import (tests/fork_run.py imports it once before forking the ranks)."""
    import cp_parity  # noqa: F401
    import kernels.reference  # noqa: F401
    import parallel.context_parallel  # noqa: F401
    import parallel.ring_attention  # noqa: F401
    import pretrain.checkpoint  # noqa: F401
    import pretrain.optim  # noqa: F401
    from models.transformer import build_model  # noqa: F401


def main(spec: str, out: str) -> None:
    from torchrun_jobs import serve_jobs

    serve_jobs(run_job, spec, out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
