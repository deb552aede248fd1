"""Worker for tests/test_parallel_hybrid.py: the jobs of tests/test_parallel_worker.py on
Mamba-2 / hybrid models (holds no tests itself).

``python -m torch.distributed.run --nproc_per_node N tests/test_parallel_hybrid_worker.py SPEC OUT``
Job ``model`` dicts may hold nested ``mamba`` / ``hybrid`` dicts; every job kind
(``layout``, ``resume``, ``init``) builds the job's ``model``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import test_parallel_worker  # noqa: E402

# "M-*-" x 1: Mamba (4 heads of 32, 2 groups, 2 chunks per sequence), MLP, attention, MLP
HYBRID = dict(pattern="M-*-", n_layers=1, mamba=dict(d_state=16, head_dim=32, n_groups=2, chunk_size=16))
# "P-" x 2: 4 attention heads (2 KV) + 4 Mamba heads of 16 (2 groups) side by side
HEADS = dict(pattern="P-", mamba=dict(d_state=16, head_dim=16, n_groups=2, chunk_size=16),
             hybrid=dict(n_attn_heads=4, n_mamba_heads=4))


_MODEL: dict = {}
_build = test_parallel_worker.build


def _build_default_model(layout: dict, model_kw: dict | None = None, **kw):
    return _build(layout, model_kw if model_kw is not None else _MODEL, **kw)


test_parallel_worker.build = _build_default_model  # so test_parallel_worker.run_resume / test_parallel_worker.run_init_check build _MODEL


def with_model(model: dict, fn, *args, **kw):
    """Run a ``test_parallel_worker`` job function with ``model`` as the default model."""
    global _MODEL
    saved, _MODEL = _MODEL, model
    try:
        return fn(*args, **kw)
    finally:
        _MODEL = saved


def run_job(job: dict) -> dict:
    """One job of ``test_parallel_worker.main``'s kinds, built on the job's ``model``."""
    kind, model = job.get("kind", "layout"), job.get("model", {})
    if kind == "layout":
        return test_parallel_worker.run_layout(job["layout"], job.get("steps", 10), model, **job.get("kw", {}))
    if kind == "resume":
        return with_model(model, test_parallel_worker.run_resume, job.get("save"), job.get("load"), job["dir"],
                          job["save_at"], job["steps"])
    if kind == "init":
        return with_model(model, test_parallel_worker.run_init_check, job["layout"])
    raise ValueError(kind)


def main(spec_path: str, out_path: str) -> None:
    """Run every job of SPEC on one process group; rank 0 writes the results (or errors)."""
    from torchrun_jobs import serve_jobs

    serve_jobs(run_job, spec_path, out_path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
