"""Surviving the cluster: preemption signals with a grace deadline, and a hang watchdog.

``PreemptionFlag``: SIGTERM or SIGUSR1 asks the loop to checkpoint at the next step
boundary and exit with ``EXIT_PREEMPTED``. The first signal also starts a deadline of
``train.preempt_grace_s``: if no step boundary is reached by then (a slow step, or a rank
stuck in a collective), the process exits with the same status without a checkpoint (saves
are atomic, so no partial one is left behind) rather than being killed mid-write later.

The deadline must start even when the main thread is blocked inside a C call (a collective),
where Python signal handlers cannot run; so the signal is also written to a wakeup pipe
(``signal.set_wakeup_fd``) that a helper thread reads.

``Watchdog``: ends the process when the loop makes no progress for ``timeout_s`` seconds
(after dumping every thread's stack), so a rank waiting on a peer that died or hung does
not hold the job forever; saves and evaluations, which may be legitimately long, are
exempt (their collectives have the process-group timeout).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from pretrain.errors import EXIT_HANG, EXIT_PREEMPTED

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _hard_exit(status: int, message: str) -> None:
    """Print ``message`` and end the process now (no cleanup that could block on peers)."""
    try:
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
    finally:
        os._exit(status)


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1; the loop checkpoints at the next step boundary."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum = 0
        self._old: dict = {}
        self._old_wakeup = None
        self._boundary = threading.Event()
        self._closed = threading.Event()
        self._deadline: threading.Timer | None = None
        self._lock = threading.RLock()  # a second signal may interrupt the handler
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (e.g. train() called from a test thread)
        for s in PREEMPT_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch_pipe, name="preempt-signals", daemon=True).start()

    def _handle(self, signum, frame):
        self._arm(signum)

    def _watch_pipe(self) -> None:
        r = self._pipe[0]
        try:
            while True:
                data = os.read(r, 64)
                if not data or self._closed.is_set():
                    return
                for b in data:
                    if b in PREEMPT_SIGNALS:
                        self._arm(b)
        finally:
            os.close(r)  # only this thread closes it, so a blocked read never sees a reused fd

    def _arm(self, signum: int) -> None:
        with self._lock:
            if self.signum:
                return
            self.signum = signum
            if self.grace_s > 0 and not self._boundary.is_set():
                self._deadline = threading.Timer(self.grace_s, self._expire)
                self._deadline.daemon = True
                self._deadline.start()

    def _expire(self) -> None:
        if not self._boundary.is_set():
            _hard_exit(EXIT_PREEMPTED, f"preemption: no step boundary within train.preempt_grace_s="
                                       f"{self.grace_s:g}s of {signal.Signals(self.signum).name}; "
                                       f"exiting without a checkpoint")

    def boundary_reached(self) -> None:
        """The loop is at a step boundary and will now save: the deadline no longer applies."""
        self._boundary.set()
        if self._deadline is not None:
            self._deadline.cancel()

    def restore(self) -> None:
        self._closed.set()
        if self._deadline is not None:
            self._deadline.cancel()
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._old:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
            w = self._pipe[1]
            try:
                os.write(w, b"\0")  # wakes the reader, which sees _closed and exits
            except OSError:
                pass
            os.close(w)
        self._old = {}


class Watchdog:
    """Ends the process (``EXIT_HANG``) when ``kick()`` is not called for ``timeout_s`` seconds.

    Not armed until the first ``kick()`` (the first step may compile for a long time).
    """

    def __init__(self, timeout_s: float, rank: int = 0):
        self.timeout_s = timeout_s
        self.rank = rank
        self._last: float | None = None
        self._paused = 0
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._run, name="watchdog", daemon=True).start()

    def kick(self) -> None:
        self._last = time.monotonic()

    @contextmanager
    def suspended(self):
        """No deadline inside this block (checkpoint saves, evaluations)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self._last = time.monotonic()

    def _run(self) -> None:
        period = min(max(self.timeout_s / 20, 0.05), 5.0)
        while not self._stop.wait(period):
            last = self._last
            if last is None or self._paused or time.monotonic() - last < self.timeout_s:
                continue
            print(f"watchdog: rank {self.rank} made no progress for {self.timeout_s:g}s "
                  f"(parallel.timeout_s): a peer died or a collective hangs; stacks:",
                  file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            _hard_exit(EXIT_HANG, f"watchdog: rank {self.rank} exiting")

    def stop(self) -> None:
        self._stop.set()
