"""Fault injection for tests of crash safety: ``PRETRAIN_FAULT=<point>:<step>``.

Points: ``kill_after_step`` (SIGKILL once step N is logged), ``kill_in_save`` (SIGKILL
after the shards of step N are written, before the checkpoint is complete),
``raise_at_step`` (an exception on this rank at step N; with ``PRETRAIN_FAULT_RANK``
only on that rank), ``nan_at_step`` (the loss of step N becomes NaN), ``hang_at_step``
(step N sleeps ``PRETRAIN_FAULT_HANG_S`` seconds, default 3600: a hung rank).
"""

from __future__ import annotations

import os
import signal


def fault_at(point: str, step: int) -> bool:
    spec = os.environ.get("PRETRAIN_FAULT", "")
    if not spec:
        return False
    rank = os.environ.get("PRETRAIN_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return False
    for item in spec.split(","):
        name, _, at = item.partition(":")
        if name == point and at.isdigit() and int(at) == step:
            return True
    return False


def maybe_kill(point: str, step: int) -> None:
    if fault_at(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hang(point: str, step: int) -> None:
    if fault_at(point, step):
        import time

        time.sleep(float(os.environ.get("PRETRAIN_FAULT_HANG_S", "3600")))
