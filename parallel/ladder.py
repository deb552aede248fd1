"""Ladder residual under tensor parallelism: asynchronous sublayer-output reductions.

With ``model.residual=ladder`` sublayer k reads a stream that does not yet contain
sublayer k-1's output, so k-1's row-parallel reduction (all-reduce, or reduce-scatter
with sequence parallel) need not be waited until ``join`` adds it one sublayer later.
One step of ``parallelize`` owns the overlap: :func:`plan_ladder` decides which sublayers
overlap what (the tp plans read it through ``TPContext.async_output`` and
``input_boundary``), and :func:`apply_ladder` installs the input boundaries, the gradient
seam and the stage-output wait. A flagged row-parallel output projection's reduction
goes through :func:`parallel.tp.reduce_sublayer_output`, which calls :func:`async_reduce`,
which issues the collective through DTensor's functional collectives
(``redistribute(async_op=True)``) and returns an ``AsyncCollectiveTensor`` that waits
at first use. ``standard`` and ``parallel`` keep the synchronous path.

Every issued reduction is counted, and so is its wait (an ``AsyncCollectiveTensor``
subclass counts the moment it is first used), so a test or the trainer can check that
no collective is left pending at the end of a step (:func:`pending`).

Backward: the gradient of the output reduction (Partial -> Replicate) needs no
communication; the input-gradient reduction (all-reduce, or reduce-scatter with SP) of
sublayer k is deferred one sublayer, mirroring the forward. Sublayer k's input gradient
is only needed by sublayer k-2's output and the stream below, not by sublayer k-1 (whose
output joins the stream above k's input). So the boundary at sublayer k's input
(:class:`_InputBoundary`, a pre-hook that also runs the norm on the replicated stream so
the whole partial gradient is reduced once) issues the collective and returns no
gradient; the reduced gradient is added by two identity nodes (:class:`_AddDeferred`)
that the model's seam (``ForwardContext.grad_seam``, :class:`DeferredInputGrads`) places on
the stream and the pending output *before* sublayer k-1's forward. The autograd engine
runs ready nodes newest-first, so those older nodes run, and wait, only after sublayer
k-1's backward: the collective overlaps it. The first ladder sublayer of a stage (no
earlier identity nodes) reduces synchronously. Recomputation (activation checkpointing)
re-runs only the boundary's forward. Not under ``torch.compile`` (the compiler schedules
the collectives of a compiled sublayer itself): there the boundary stays synchronous.
``bench/bench_ladder.py`` measures the blocked (exposed) communication time per mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed._functional_collectives import AsyncCollectiveTensor

class _Counter:
    issued = 0  # forward output reductions
    waited = 0
    grad_issued = 0  # backward input-gradient reductions left pending by _InputBoundary
    grad_waited = 0


COUNTS = _Counter()


class _CountedACT(AsyncCollectiveTensor):
    """AsyncCollectiveTensor that records its (first) wait."""

    __slots__ = ()

    def trigger_wait(self):
        if not self.completed:
            COUNTS.waited += 1
        return super().trigger_wait()


@dataclass(frozen=True)
class LadderPlan:
    """Which sublayers (by name) of a model or pipeline stage overlap their tp reductions."""

    async_outputs: frozenset  # output reduction pending until ``join``
    input_boundaries: frozenset  # input-gradient reduction deferred one sublayer

    def sublayer_context(self, name: str, ctx):
        """``ctx`` (a ``TPContext``) with this sublayer's overlap flags."""
        return replace(ctx, async_output=name in self.async_outputs,
                       input_boundary=name in self.input_boundaries)


def plan_ladder(model: nn.Module, deferrable_kinds: set[str]) -> LadderPlan | None:
    """The overlap plan of ``model`` under tp (None unless ``model.residual == 'ladder'``,
    the one place parallel/ reads it). Input-gradient reductions are deferred for the
    sublayers of ``deferrable_kinds`` (whose tp plan reads a replicated input; none under
    torch.compile, which schedules a compiled sublayer's collectives itself)."""
    if model.cfg.residual != "ladder":
        return None
    subs = ladder_sublayers(model)
    deferred = {name for name, sub in subs if sub.kind in deferrable_kinds}
    return LadderPlan(frozenset(name for name, _ in subs), frozenset(deferred))


def apply_ladder(model: nn.Module, plan: LadderPlan, mesh, sequence_parallel: bool) -> None:
    """Install ``plan`` on a tp-sharded ``model``: input boundaries, the per-forward gradient
    seam, and (a stage before the last) the wait of the outputs it sends."""
    if model.output is None:  # a pipeline stage before the last: (stream, pending) leave it
        model.register_forward_hook(_wait_stage_outputs)
    for name in sorted(plan.input_boundaries, key=int):
        model.layers[name].register_forward_pre_hook(_boundary_hook(int(name), mesh, sequence_parallel))
    if plan.input_boundaries:
        model.context_hooks.append(_with_grad_seam)


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
    """Asynchronous collectives (forward output reductions and deferred input-gradient
    reductions) issued and not waited yet, since the last reset."""
    return COUNTS.issued - COUNTS.waited + COUNTS.grad_issued - COUNTS.grad_waited


def counts() -> dict:
    return {"issued": COUNTS.issued, "waited": COUNTS.waited,
            "grad_issued": COUNTS.grad_issued, "grad_waited": COUNTS.grad_waited}


def reset_counts() -> None:
    COUNTS.issued = COUNTS.waited = COUNTS.grad_issued = COUNTS.grad_waited = 0
    if TRACE is not None:
        TRACE.clear()


# When a list, backward events are appended to it: ("issue", k) when sublayer k's input
# gradient reduction is issued, ("wait", k) when it is waited, ("sync", k) when it is
# reduced at once. Tests use it to check what overlaps what.
TRACE: list | None = None


def _trace(event: str, idx: int) -> None:
    if TRACE is not None:
        TRACE.append((event, idx))


# ---- backward: deferred input-gradient reductions ---------------------------------------

class _Slot:
    """Sublayer k's input-gradient reduction: issued by its boundary, added by the identity
    nodes placed on the stream and pending output before sublayer k-1."""

    __slots__ = ("idx", "expected", "reduced", "waited")

    def __init__(self, idx: int):
        self.idx, self.expected, self.reduced, self.waited = idx, False, None, False

    def take(self):
        if self.reduced is None:
            if self.expected:
                raise RuntimeError(f"ladder: sublayer {self.idx}'s input gradient was never issued")
            return None
        if not self.waited:
            self.reduced = funcol.wait_tensor(self.reduced)
            self.waited = True
            COUNTS.grad_waited += 1
            _trace("wait", self.idx)
        return self.reduced


class DeferredInputGrads:
    """Per-forward ``ForwardContext.grad_seam``: before ladder sublayer k, put identity nodes on the
    stream and the pending output that will add sublayer k+1's reduced input gradient."""

    def __init__(self):
        self.slots: dict[int, _Slot] = {}

    def before_sublayer(self, idx: int, stream: torch.Tensor, pending):
        if not torch.is_grad_enabled():
            return stream, pending
        slot = self.slots.setdefault(idx + 1, _Slot(idx + 1))
        stream = _AddDeferred.apply(stream, slot)
        if pending is not None:
            pending = _AddDeferred.apply(pending, slot)
        return stream, pending

    def claim(self, idx: int) -> _Slot | None:
        """The slot sublayer ``idx`` issues into; None: reduce synchronously (no nodes wait)."""
        slot = self.slots.get(idx)
        if slot is not None:
            slot.expected = True
        return slot


class _AddDeferred(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot):
        ctx.slot = slot
        out = x.view_as(x)  # a view: an AsyncCollectiveTensor input is not waited here
        if isinstance(x, _CountedACT) and not x.completed:
            out.__class__ = _CountedACT  # the view carries the count; x itself is never used
        return out

    @staticmethod
    def backward(ctx, grad):
        reduced = ctx.slot.take()
        return (grad if reduced is None else grad + reduced), None


# renamed in newer torch; the old name warns there
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


class _InputBoundary(torch.autograd.Function):
    """Stream (local; a sequence shard with SP) -> Replicate DTensor of the full stream.

    Backward: the partial gradient is summed over tp (all-reduce, reduce-scatter with SP),
    left pending in ``slot`` (returning no gradient) or, without a slot, waited at once."""

    @staticmethod
    def forward(ctx, x, mesh, sequence_parallel, slot, idx):
        ctx.mesh, ctx.sp, ctx.slot, ctx.idx = mesh, sequence_parallel, slot, idx
        layout = (Shard(1),) if sequence_parallel else (Replicate(),)
        d = DTensor.from_local(x, mesh, layout, run_check=False)
        return d.redistribute(placements=(Replicate(),)) if sequence_parallel else d

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, DTensor):
            partial = grad.placements[0].is_partial()
            grad = grad.to_local()
        else:
            partial = True
        if not partial:  # already summed (replicated): SP keeps this rank's shard
            if ctx.sp:
                grad = grad.chunk(ctx.mesh.size(), dim=1)[ctx.mesh.get_local_rank()].contiguous()
            return grad, None, None, None, None
        if ctx.sp:
            reduced = _reduce_scatter(grad.contiguous(), "sum", scatter_dim=1, group=ctx.mesh)
        else:
            reduced = funcol.all_reduce(grad.contiguous(), "sum", group=ctx.mesh)
        if ctx.slot is None:
            _trace("sync", ctx.idx)
            return funcol.wait_tensor(reduced), None, None, None, None
        ctx.slot.reduced = reduced
        COUNTS.grad_issued += 1
        _trace("issue", ctx.idx)
        return None, None, None, None, None


def _boundary_hook(idx: int, mesh, sequence_parallel: bool):
    def hook(module, args):
        x, ctx = args[0], args[1]
        seam = getattr(ctx, "grad_seam", None)
        # recomputation (activation checkpointing) runs inside backward: only the values
        recompute = torch._C._current_graph_task_id() != -1
        slot = seam.claim(idx) if seam is not None and not recompute and torch.is_grad_enabled() else None
        return (_InputBoundary.apply(x, mesh, sequence_parallel, slot, idx), *args[1:])
    return hook


def ladder_sublayers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, sublayer) of a ladder model's sublayers whose output may stay pending: from
    ``ladder_from``, without Peri-LN (its output norm would wait at once anyway)."""
    subs = ((name, getattr(sub, "_checkpoint_wrapped_module", sub)) for name, sub in model.layers.items())
    return [(name, sub) for name, sub in subs
            if int(name) >= model.cfg.ladder_from and getattr(sub, "out_norm", None) is None]


def _with_grad_seam(ctx, seq_len, doc_ids):
    ctx.grad_seam = DeferredInputGrads()  # a fresh seam for every forward
    return ctx
