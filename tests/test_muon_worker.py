"""Worker for tests/test_muon.py (run under torchrun; holds no tests itself): each job is a
whole ``pretrain train`` run, all on one process group."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_job(job: dict) -> dict:
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
