"""Worker for tests/test_ladder.py (run under torchrun; holds no tests itself).

``python -m torch.distributed.run --nproc_per_node N tests/test_ladder_worker.py SPEC OUT``
trains each job of SPEC with the shared infra of tests/test_parallel_worker.py and also
records, after every step, how many asynchronous sublayer-output and input-gradient
reductions were issued and how many are still pending (parallel/ladder.py's counters),
and the backward event trace of the first step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


import test_parallel_worker as W  # noqa: E402


def run_counted(layout: dict, steps: int, model_kw: dict | None = None, **kw) -> dict:
    """Per-step loss and grad norm, plus per-step issued/pending async reductions."""
    from parallel import ladder

    runner, opt, world = W.build(layout, model_kw, **kw)
    losses, norms, issued, grad_issued, pending, trace = [], [], [], [], [], None
    ladder.TRACE = []
    for step in range(steps):
        ladder.reset_counts()
        loss = runner.forward_backward(W.rank_batches(step, world))
        losses.append(runner.reduce_loss(loss))
        issued.append(ladder.counts()["issued"])
        grad_issued.append(ladder.counts()["grad_issued"])
        pending.append(ladder.pending())
        if trace is None:
            trace = list(ladder.TRACE)
        norms.append(float(runner.clip_grad_norm_(0.5)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    ladder.TRACE = None
    return {"loss": losses, "grad_norm": norms, "issued": issued, "grad_issued": grad_issued,
            "pending": pending, "trace": trace}


def _with_per_rank(gathered: list[dict]) -> dict:
    return {**gathered[0], "per_rank_pending": [r["pending"] for r in gathered],
            "per_rank_trace": [r["trace"] for r in gathered]}


def main(spec_path: str, out_path: str) -> None:
    from torchrun_jobs import serve_jobs

    serve_jobs(lambda job: run_counted(job["layout"], job["steps"], job.get("model"), **job.get("kw", {})),
               spec_path, out_path, combine=_with_per_rank)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
