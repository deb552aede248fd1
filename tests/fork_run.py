"""A torchrun stand-in for job workers (tests/torchrun_jobs.py ``run_jobs(..., fork=True)``):
import torch and the worker's modules once, then fork the ranks.

torchrun starts every rank as a fresh interpreter, and each pays the imports (~6 s of CPU
here: ~50 s for an 8-rank launch before any job runs). Forked ranks share them. The parent
is single-threaded when it forks (no torch op has run). Ranks meet over gloo through a
FileStore in the spec's folder (no port to pick), die with the parent (PR_SET_PDEATHSIG: a
timed-out launch leaves no rank behind), and the first rank to fail takes the others down,
as under torchrun.

Usage: ``python tests/fork_run.py NPROC WORKER SPEC OUT``; WORKER (a module in tests/)
defines ``main(spec, out)`` and may define ``preload()`` (imports to share).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rank(mod, rank: int, n: int, store: Path, spec: str, out: str, parent: int) -> None:
    """Child side: never returns (``os._exit``: the parent's exit handlers must not run)."""
    code = 1
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                          JOBS_INIT_METHOD=f"file://{store}?rank={rank}&world_size={n}")
        mod.main(spec, out)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(n: int, worker: str, spec: str, out: str) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch.distributed  # noqa: F401  (shared by the ranks)

    mod = importlib.import_module(Path(worker).stem)
    getattr(mod, "preload", lambda: None)()
    store = Path(out).parent / f"{Path(out).stem}.store"
    store.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pids, parent = [], os.getpid()
    for r in range(n):
        pid = os.fork()
        if pid == 0:
            _rank(mod, r, n, store, spec, out, parent)
        pids.append(pid)
    code = 0
    live = set(pids)
    while live:
        pid, status = os.wait()
        live.discard(pid)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 and code == 0:
            code = rc if rc > 0 else 128 - rc
            print(f"fork_run: rank {pids.index(pid)} exited with {rc}; stopping the others", file=sys.stderr)
            for p in live:
                os.kill(p, signal.SIGKILL)
    store.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), *sys.argv[2:5]))
