"""Worker of the parity harness (tests/parity.py); run under torchrun, holds no tests.

``python tests/fork_run.py N parity_worker.py SPEC OUT`` (or under torchrun) runs
every job of SPEC on one process group (tests/torchrun_jobs.py) and rank 0 writes, per job,
its parity numbers against the job's cached one-process reference (``job["ref"]``), or
``{"refused": message}`` when the trainer's layout check refused the job (a UserError), or the error.
torch's FSDP warning about modules returning views is an error here.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import parity  # noqa: E402

REDUCE_OPS = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")


class ReduceDtypes:
    """Records the dtypes of the tensors given to data-parallel gradient reductions while
    ``active`` (the first step's backward)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.active, self.seen = dist, False, set()
        self.saved = {n: getattr(dist, n) for n in REDUCE_OPS if hasattr(dist, n)}
        for n, fn in self.saved.items():
            setattr(dist, n, self._wrap(fn))

    def _wrap(self, fn):
        def inner(*a, **k):
            if self.active:
                self.seen.update(str(t.dtype) for t in (*a, *k.values()) if isinstance(t, torch.Tensor))
            return fn(*a, **k)
        return inner

    def restore(self):
        for n, fn in self.saved.items():
            setattr(self.dist, n, fn)


def run_parity(job: dict) -> dict:
    import torch.distributed as dist

    from pretrain.errors import UserError

    probe = ReduceDtypes() if job.get("probe_reduce") else None
    if probe is not None:
        probe.active = True

    def on_step(runner, step):
        if probe is not None and step == 0:
            probe.active = False
            for part in runner.parts:  # the gradients FSDP hands to the optimizer
                for p in part.parameters():
                    if p.grad is not None:
                        probe.seen.add(f"grad:{p.grad.dtype}")

    try:
        got = parity.train(job, on_step=on_step)
    except UserError as e:
        return {"refused": str(e)}
    finally:
        if probe is not None:
            probe.restore()
    out = {"loss_curve": got["loss"]}
    if probe is not None:
        out["reduce_dtypes"] = sorted(probe.seen)
    if dist.get_rank() == 0:
        want = torch.load(job["ref"])["ref"]
        out.update(parity.compare(got, want))
    return out


def preload() -> None:
    """What the jobs import (tests/fork_run.py imports it once before forking the ranks)."""
    import parallel  # noqa: F401
    import pretrain.layout_check  # noqa: F401
    import pretrain.optim  # noqa: F401
    from models.transformer import build_model  # noqa: F401


def main(spec_path: str, out_path: str) -> None:
    from torchrun_jobs import serve_jobs

    warnings.filterwarnings("error", message=".*returned a view tensor.*")
    serve_jobs(run_parity, spec_path, out_path,
               combine=lambda rs: {**rs[0], "reduce_dtypes": sorted({d for r in rs for d in r.get("reduce_dtypes", [])})})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
