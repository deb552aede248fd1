"""``pretrain launch local --nproc N CONFIG [overrides]``: torchrun on this machine.

torchrun runs standalone (its own c10d rendezvous on a free port) with N workers; each
worker reads the world layout (RANK, WORLD_SIZE, ...) from torchrun and training picks
gloo on CPU, NCCL on GPU. Per-rank logs go to ``<run_dir>/logs/local-<time>/`` (and to
this terminal). SIGTERM/SIGUSR1 sent to this launcher reach the workers through torchrun,
which waits for them to checkpoint; the launcher then exits with training's status
(3 after a preemption signal).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from launch.jobs import (STATUS_FILE_ENV, TrainJob, describe_status, env_with, final_status,
                           shell_join, torchrun_cmd)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def default_nproc() -> int:
    try:
        import torch

        return torch.cuda.device_count() or 1
    except ImportError:
        return 1


def command(job: TrainJob, nproc: int, log_dir: str | None) -> list[str]:
    rdzv = ["--standalone"]
    return [*torchrun_cmd(nnodes="1", nproc_per_node=nproc, rdzv=rdzv,
                          shutdown_timeout=job.preempt_grace_s + 60, log_dir=log_dir),
            "-m", "pretrain", *job.train_args()]


def run(job: TrainJob, nproc: int, dry_run: bool = False, env: dict[str, str] | None = None) -> int:
    log_dir = job.run_dir / "logs" / time.strftime("local-%Y%m%d-%H%M%S")
    cmd = command(job, nproc, str(log_dir))
    if dry_run:
        print(shell_join(cmd))
        return 0
    with tempfile.TemporaryDirectory(prefix="pretrain-launch-") as tmp:
        status_file = Path(tmp) / "status"
        proc = subprocess.Popen(cmd, env=env_with({STATUS_FILE_ENV: str(status_file), **(env or {})}),
                                cwd=job.workdir)

        def forward(signum, frame):
            if proc.poll() is None:
                proc.send_signal(signum)

        main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, forward) for s in FORWARDED} if main else {}
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group)
                    continue
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        status = final_status(code if code >= 0 else 128 - code, status_file)
    print(f"launch: {describe_status(status)}; per-rank logs in {log_dir}", file=sys.stderr)
    return status
