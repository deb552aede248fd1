"""Ladder residual under tensor parallelism: asynchronous sublayer-output reductions.

With ``model.residual=ladder`` sublayer k reads a stream that does not yet contain
sublayer k-1's output, so k-1's row-parallel reduction (all-reduce, or reduce-scatter
with sequence parallel) need not be waited until ``join`` adds it one sublayer later.
:func:`mark_ladder_async` flags the output projections of the ladder sublayers; the
tp seam :func:`parallel.tp.reduce_sublayer_output` then calls :func:`async_reduce`,
which issues the collective through DTensor's functional collectives
(``redistribute(async_op=True)``) and returns an ``AsyncCollectiveTensor`` that waits
at first use. ``standard`` and ``parallel`` keep the synchronous path.

Every issued reduction is counted, and so is its wait (an ``AsyncCollectiveTensor``
subclass counts the moment it is first used), so a test or the trainer can check that
no collective is left pending at the end of a step (:func:`pending`).

Backward: the gradient of the output reduction (Partial -> Replicate) needs no
communication; the input-gradient all-reduce (reduce-scatter with SP) at the
column-parallel input (DTensor's ``from_local`` in the mixer-input plan) stays
synchronous. What the autograd engine allows: sublayer k+1's input gradient flows into
the input buffer of the join that produced the stream it read; the residual-path gradient
from the later join already sits there (the CPU engine runs ready nodes in decreasing
creation order, and that join was created after sublayer k+1), so the buffer's ``add``
consumes an async gradient the moment it is returned, before sublayer k's backward can
start. Deferring the wait past sublayer k's backward would need the reduced gradient
routed into nodes that run later (the producer of sublayer k-1's output and the join
before it), i.e. extra identity nodes at forward time with a shared handle, which does
not compose simply with recomputation (checkpointed sublayers create their nodes during
backward) or pipeline stage boundaries; it is not done here.
``bench/bench_ladder.py`` measures the blocked (exposed) communication time per mode.
"""

from __future__ import annotations

import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor

# set on a row-parallel output projection whose reduction may stay pending
ASYNC_ATTR = "ladder_async_reduce"


class _Counter:
    issued = 0
    waited = 0


COUNTS = _Counter()


class _CountedACT(AsyncCollectiveTensor):
    """AsyncCollectiveTensor that records its (first) wait."""

    __slots__ = ()

    def trigger_wait(self):
        if not self.completed:
            COUNTS.waited += 1
        return super().trigger_wait()


def mark_ladder_async(model: torch.nn.Module) -> int:
    """Flag the row-parallel output reductions of ``model``'s ladder sublayers as
    asynchronous; returns how many were flagged (0 unless ``residual == 'ladder'``)."""
    cfg = model.cfg
    if cfg.residual != "ladder":
        return 0
    if model.output is None:  # a pipeline stage before the last: (stream, pending) leave it
        model.register_forward_hook(_wait_stage_outputs)
    n = 0
    for name, sub in model.layers.items():
        sub = getattr(sub, "_checkpoint_wrapped_module", sub)
        # Peri-LN normalises the output inside the sublayer: it would wait at once anyway
        if int(name) < cfg.ladder_from or getattr(sub, "out_norm", None) is not None:
            continue
        for m in sub.modules():
            if getattr(m, "tp_sublayer_output", False):
                setattr(m, ASYNC_ATTR, True)
                n += 1
    return n


def _wait_stage_outputs(module, args, out):
    # The pending output crosses the stage boundary by point-to-point send, which needs
    # its values: wait here (through an autograd-tracked copy, so the graph is kept).
    if isinstance(out, tuple):
        return tuple(t.clone() if isinstance(t, AsyncCollectiveTensor) else t for t in out)
    return out


def async_reduce(out, layout, use_local_output: bool = True):
    """Issue the reduction of a Partial DTensor into ``layout`` without waiting for it."""
    r = out.redistribute(placements=(layout,), async_op=True)
    if not use_local_output:
        return r
    local = r.to_local()
    if torch.compiler.is_compiling():
        return local  # traced: the compiler places the wait_tensor itself
    if isinstance(local, AsyncCollectiveTensor) and not local.completed:
        local.__class__ = _CountedACT
        COUNTS.issued += 1
    return local


def pending() -> int:
    """Collectives issued by :func:`async_reduce` and not waited yet (since the last reset)."""
    return COUNTS.issued - COUNTS.waited


def counts() -> dict:
    return {"issued": COUNTS.issued, "waited": COUNTS.waited}


def reset_counts() -> None:
    COUNTS.issued = COUNTS.waited = 0
