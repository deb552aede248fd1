"""One live run per run directory: an OS lock on ``<run_dir>/run.lock``, held by rank 0.

The lock is a POSIX record lock (``fcntl.lockf``, i.e. ``fcntl(F_SETLK)``) on the whole
file, not ``flock(2)``:

- POSIX locks are what network filesystems implement (NFSv3 through the NLM lock manager,
  NFSv4 in the protocol, Lustre mounted with ``-o flock``, GPFS); Linux only emulates
  ``flock`` on NFS with them, and other clients keep ``flock`` local to one machine.
- A POSIX lock belongs to the process: it is not inherited by ``fork()``ed children (data
  loader workers), so it ends exactly when the holder dies, ``kill -9`` included. An
  ``flock`` would live on in an orphaned child and leave a stale lock.

The price of POSIX semantics: closing *any* descriptor of the file releases the process's
lock, and a second lock from the same process always succeeds. So the holder never opens
the file again (its details are written through the locking descriptor), and this module
keeps a registry of the locks this process holds and answers for them without touching
the file.

The file is never deleted (deleting it would let a second run lock a new file while the
first still holds the old one). It holds the holder's details as JSON: host, pid, SLURM
job, torchrun run id, start time. A filesystem that refuses POSIX locks (``ENOLCK``: NFS
without a reachable lock manager; ``ENOSYS``: Lustre mounted ``noflock``) gets a warning
and no protection; one whose locks are node-local (NFS mounted ``nolock``, Lustre
``-o localflock``, BeeGFS without global file locks) cannot be detected from here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pretrain.errors import UserError

LOCK_NAME = "run.lock"
POLL_S = 0.5
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}
_HELD: dict[tuple[int, int], "RunLock"] = {}  # (st_dev, st_ino) -> a lock this process holds


class RunDirLocked(UserError):
    """Another live run holds the run directory. In a multi-process run only rank 0 says why."""

    rank0_reports = True


class RunLock:
    """A held lock; ``release()`` (or process exit, however abrupt) frees it."""

    def __init__(self, path: Path, fd: int | None, key: tuple[int, int] | None):
        self.path, self.fd, self.key = path, fd, key

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(self.key, None)
            os.close(self.fd)  # closing the descriptor drops the POSIX lock
            self.fd = None


def holder_info() -> dict:
    """Who this process is, for the lock file and for the refused run's message."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def describe(info: dict | None) -> str:
    """``host h, pid p, SLURM job j, started t`` (what is known)."""
    if not info:
        return "holder unknown"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"SLURM job {info['slurm_job_id']}")
    if info.get("torchelastic_run_id") not in (None, "", "none"):
        parts.append(f"torchrun run {info['torchelastic_run_id']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    return ", ".join(parts)


def _key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def read_holder(run_dir: Path) -> dict | None:
    """The details recorded by the (last) holder, or None. Never opens a file this process locks."""
    path = Path(run_dir) / LOCK_NAME
    key = _key(path)
    if key in _HELD:
        return holder_info() | {"started": None}
    for _ in range(5):  # the holder may be between truncating and writing
        try:
            text = path.read_text()
            return json.loads(text) if text.strip() else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    return None


def _flock_struct(l_type: int) -> tuple[str, bytes]:
    """``struct flock`` asking about a write lock on the whole file."""
    if sys.platform == "darwin":  # off_t l_start, l_len; pid_t l_pid; short l_type, l_whence
        fmt = "qqihh"
        return fmt, struct.pack(fmt, 0, 0, 0, l_type, os.SEEK_SET)
    fmt = "hhqqi4x"  # Linux: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
    return fmt, struct.pack(fmt, l_type, os.SEEK_SET, 0, 0, 0)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock. Takes no lock and creates
    nothing (F_GETLK), so a probing launcher can never make a starting run fail."""
    path = Path(run_dir) / LOCK_NAME
    key = _key(path)
    if key is None:
        return False
    if key in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if sys.platform.startswith("linux") or sys.platform == "darwin":
            fmt, arg = _flock_struct(fcntl.F_WRLCK)
            res = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, arg))
            l_type = res[3] if sys.platform == "darwin" else res[0]
            return l_type != fcntl.F_UNLCK
        return False
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        os.close(fd)


def try_acquire(run_dir: Path) -> RunLock | None:
    """Lock ``run_dir`` now (creating it and the lock file first), or None if a live run holds it.

    A refused attempt creates nothing: a directory that does not exist cannot be locked.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    if _key(path) in _HELD:
        return None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"logging.run_dir: cannot create {path}: {e.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        if e.errno in _UNSUPPORTED:
            print(f"warning: cannot lock {path} ({e.strerror}): this filesystem has no POSIX "
                  f"locks, so a second run on {run_dir} would not be detected", file=sys.stderr)
            return RunLock(path, None, None)
        raise UserError(f"logging.run_dir: cannot lock {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if _key(path) != (st.st_dev, st.st_ino):  # the file was replaced between open and lock
        os.close(fd)
        return try_acquire(run_dir)
    info = json.dumps(holder_info()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info + b"\n", 0)
    os.fsync(fd)
    lock = RunLock(path, fd, (st.st_dev, st.st_ino))
    _HELD[lock.key] = lock
    return lock


def refusal(run_dir: Path, waited_s: float = 0.0) -> RunDirLocked:
    """The one-line error for a run directory another live run holds."""
    waited = f" (waited {waited_s:g}s, checkpoint.lock_wait_s)" if waited_s > 0 else ""
    return RunDirLocked(f"run directory {run_dir} is in use by another run ("
                        f"{describe(read_holder(run_dir))}){waited}; wait for it to end, or "
                        f"choose another --logging.run_dir")


def _announce(run_dir: Path, wait_s: float) -> None:
    print(f"run directory {run_dir} is in use ({describe(read_holder(run_dir))}); waiting up to "
          f"{wait_s:g}s for that run to exit", file=sys.stderr, flush=True)


def wait_until_free(run_dir: Path, wait_s: float = 0.0) -> None:
    """For launchers, before they write anything: return once no live run holds ``run_dir``
    (polling up to ``wait_s`` seconds), else raise the refusal. Takes no lock."""
    deadline = time.monotonic() + wait_s
    announced = False
    while is_locked(run_dir):
        if time.monotonic() >= deadline:
            raise refusal(run_dir, wait_s)
        if not announced:
            _announce(run_dir, wait_s)
            announced = True
        time.sleep(POLL_S)


# rank 0's outcome of one attempt, agreed by all ranks with a MAX all-reduce
_GOT, _WAIT, _REFUSED, _FAILED = 1, 2, 3, 4


@contextmanager
def hold_run_dir(run_dir: Path, wait_s: float, world):
    """Hold ``run_dir``'s lock on rank 0 for the body; every rank learns a refusal.

    Runs right after the process group starts and before anything is written. Rank 0 tries
    the lock every ``POLL_S`` seconds for up to ``wait_s``; after each try all ranks agree on
    its outcome (one small all-reduce, so no collective waits long enough to time out), and
    on a refusal every rank raises: rank 0 the message naming the holder, the others a
    ``RunDirLocked`` that the trainer exits 2 on without printing a second line.
    """
    import torch

    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait_s
    lock, error, announced = None, None, False
    while True:
        state = 0
        if world.is_main:
            try:
                lock = try_acquire(run_dir)
                state = _GOT if lock else _WAIT if time.monotonic() < deadline else _REFUSED
            except Exception as e:  # every rank must hear of it, or the peers hang below
                error, state = e, _FAILED
        if world.distributed:
            t = torch.tensor([float(state)], device=world.device)
            world.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            state = int(t.item())
        if state == _GOT:
            break
        if state == _WAIT:
            if world.is_main and not announced:
                _announce(run_dir, wait_s)
            announced = True
            time.sleep(POLL_S)
            continue
        if not world.is_main:
            raise RunDirLocked(f"run directory {run_dir}: rank 0 could not lock it (see its error)")
        if error is not None:
            raise error
        raise refusal(run_dir, wait_s)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
