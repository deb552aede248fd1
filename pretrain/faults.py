"""Fault injection for tests of crash safety: ``PRETRAIN_FAULT=<point>:<step>``.

The training loop has one hook, :func:`step_faults`, around each step's forward/backward;
checkpoint writes have their own (``kill_in_save``, ``PRETRAIN_FAULT_SLOW_SAVE_S``).

Points: ``kill_after_step`` (SIGKILL as step N+1 begins: after step N is logged and any
checkpoint of step N is written), ``kill_in_save`` (SIGKILL after the shards of step N
are written, before the checkpoint is complete), ``raise_at_step`` (an exception on this
rank at step N; with ``PRETRAIN_FAULT_RANK`` only on that rank), ``nan_at_step`` (the loss
of step N becomes NaN), ``hang_at_step`` (step N sleeps ``PRETRAIN_FAULT_HANG_S`` seconds,
default 3600: a hung rank).

Slowness (no step number): ``PRETRAIN_FAULT_SLOW_SAVE_S`` makes every background checkpoint
write take that many seconds longer (a wide window for crash tests);
``PRETRAIN_FAULT_SLOW_STEP_S`` makes every step of this rank (``PRETRAIN_FAULT_RANK``, if
set) sleep that long before its forward (a straggler).
"""

from __future__ import annotations

import os
import signal
from typing import Callable


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


def _this_rank() -> bool:
    rank = os.environ.get("PRETRAIN_FAULT_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def slow_save_s() -> float:
    return float(os.environ.get("PRETRAIN_FAULT_SLOW_SAVE_S", "0") or 0)


def maybe_slow_step() -> None:
    delay = float(os.environ.get("PRETRAIN_FAULT_SLOW_STEP_S", "0") or 0)
    if delay > 0 and _this_rank():
        import time

        time.sleep(delay)


def step_faults(step: int, forward_backward: Callable):
    """Run ``forward_backward()`` for step ``step`` (1-based) with the faults asked for at
    that step; returns its loss. Without ``PRETRAIN_FAULT*`` variables: just the call."""
    maybe_kill("kill_after_step", step - 1)
    if fault_at("raise_at_step", step):
        raise RuntimeError(f"injected fault at step {step}")
    maybe_hang("hang_at_step", step)
    maybe_slow_step()
    loss = forward_backward()
    if fault_at("nan_at_step", step):
        loss = loss * float("nan")
    return loss
