"""Naming the slow rank: per-rank step time and time spent inside collectives.

Every ``logging.log_every`` steps each rank contributes two floats (its step time and the time
its training thread spent inside ``torch.distributed`` collectives, summed over the window)
to one small all-gather. A rank's *compute* time is the difference: a straggler computes
long and waits little, while its peers wait for it inside their collectives, so their step
times look alike and only compute time tells them apart. Rank 0 records the slowest rank,
its compute time and its ratio to the median in ``metrics.jsonl``, and past
``parallel.straggler_ratio`` prints a warning naming the rank and its host.

Collective time is measured by timing the ``torch.distributed`` calls made from the
training thread (FSDP's all-gathers and reduce-scatters, the trainer's all-reduces,
blocking send/recv). Calls issued with ``async_op=True`` (and pipeline parallel's batched
point-to-point transfers) count only until they return, and
DTensor's functional collectives (tensor parallel) are not timed: under those, waiting shows
up as compute time of every rank alike, which moves the median, not the ranking.
"""

from __future__ import annotations

import functools
import socket
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist

# (not isend/irecv: P2POp checks its op by identity against torch's own functions)
TIMED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
         "reduce_scatter_single", "reduce_scatter",
         "broadcast", "all_to_all", "all_to_all_single", "barrier", "send", "recv", "gather", "scatter", "reduce")


class CollectiveTimer:
    """Sums the time the current thread spends in ``torch.distributed`` collectives."""

    def __init__(self):
        self.total = 0.0
        self._thread = threading.get_ident()
        self._saved: dict[str, object] = {}
        self._depth = 0  # nested calls (all_gather -> all_gather_into_tensor) count once

    def install(self) -> None:
        for name in TIMED:
            fn = getattr(dist, name, None)
            if fn is not None and name not in self._saved:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(fn))

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.get_ident() != self._thread or self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
                self._depth -= 1

        return timed


class StragglerMonitor:
    """Gathers (step time, collective time) of every rank each ``every`` steps."""

    def __init__(self, world, ratio: float, every: int):
        self.world, self.ratio, self.every = world, ratio, max(every, 1)
        self.timer = CollectiveTimer() if world.distributed else None
        self.hosts: list[str] = [socket.gethostname()]
        self._step_s = 0.0  # summed over the window
        self._wait_s = 0.0
        self._n = 0  # steps in the window
        self._mark = 0.0
        if self.timer is not None:
            hosts: list = [None] * world.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            self.hosts = hosts
            self.timer.install()

    def begin_step(self) -> None:
        """Call where the step's timing starts (saves and evaluations between steps don't count)."""
        if self.timer is not None:
            self._mark = self.timer.total

    def step(self, step: int, step_s: float) -> dict:
        """Call once per step on every rank; returns the metrics to record at log steps."""
        self._step_s += step_s
        if self.timer is None:
            return {}
        self._wait_s += self.timer.total - self._mark
        self._n += 1
        if step % self.every:
            return {}
        local = torch.tensor([self._step_s, self._wait_s], dtype=torch.float64)
        out = torch.empty(self.world.world_size * 2, dtype=torch.float64)
        dist.all_gather_into_tensor(out, local)
        n, self._n = self._n, 0
        self._step_s = self._wait_s = 0.0
        steps, waits = out[0::2].tolist(), out[1::2].tolist()
        compute = [max(s - w, 0.0) for s, w in zip(steps, waits)]
        slow = max(range(len(compute)), key=compute.__getitem__)
        median = statistics.median(compute)
        ratio = compute[slow] / median if median > 0 else 1.0
        rec = {"straggler_rank": slow, "straggler_ratio": ratio, "compute_time_max_s": compute[slow] / n,
               "compute_time_median_s": median / n, "collective_wait_s": waits[self.world.rank] / n}
        if ratio > self.ratio and self.world.is_main:
            print(f"warning: straggler: rank {slow} on {self.hosts[slow]} computed {compute[slow] / n:.3f} s per "
                  f"step over steps {step - n + 1}-{step}, {ratio:.2f}x the median {median / n:.3f} s "
                  f"(parallel.straggler_ratio={self.ratio:g})", file=sys.stderr, flush=True)
        return rec

    def close(self) -> None:
        if self.timer is not None:
            self.timer.uninstall()
