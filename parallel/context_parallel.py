"""Context parallelism (``parallel.cp``): every sequence split over the cp ranks.

Split: the ``S`` positions are cut into ``2N`` chunks; cp rank ``r`` holds chunks ``r``
and ``2N-1-r`` (in that order), so causal attention work is the same on every rank.
Inputs, labels and document ids are split alike (:func:`split_batch`); RoPE uses the
global positions of the local tokens and document ids stay global, so documents cross
chunk boundaries freely.

The model reaches CP through one seam: :func:`install_cp` adds a hook to the model's
``context_hooks`` so that every forward's ``ForwardContext`` gets its CP fields from
:func:`set_cp_context` (the one place that sets them): the RoPE tables of this rank's
positions and ``ForwardContext.attention`` (ring or all-to-all attention over the cp group).

Loss: each rank's token loss is scaled by ``cp * n_local / n_global`` (n: non-ignored
labels of the micro-batch, summed over cp), so that FSDP's gradient *mean* over the
flattened ``dp_shard x cp`` mesh yields exactly the one-process gradient of the mean over
all tokens, and the runner's loss mean over ranks is exactly the global loss. MoE
auxiliary losses keep their value (of the whole batch, ``token_group_sum`` over cp) and
scale their gradient by ``cp`` instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from models.config import UserError
from models.kinds import present

CP_MODES = ("ring", "alltoall")
# Mamba-2 (M) and P mixers pass recurrent state between cp ranks (parallel/cp_recurrent.py):
# :func:`set_cp_context` gives them their shard of each sequence.
RECURRENT_CP_READY = True


# ---- layout rules -----------------------------------------------------------------------

def check_cp_layout(pcfg) -> None:
    """Rules that need only the parallel config (UserError naming the key)."""
    if pcfg.cp_mode not in CP_MODES:
        raise UserError(f"parallel.cp_mode: '{pcfg.cp_mode}' is not one of {', '.join(CP_MODES)}")
    if pcfg.cp > 1 and pcfg.dp_engine == "deepspeed":
        raise UserError("parallel.cp: context parallel does not compose with dp_engine=deepspeed; "
                          "use dp_engine=fsdp or cp=1")


def check_cp_seq(seq_len: int, cp: int) -> None:
    if cp > 1 and seq_len % (2 * cp):
        raise UserError(f"data.seq_len: {seq_len} must be divisible by 2*parallel.cp = {2 * cp} "
                          f"(each cp rank holds two equal chunks)")


def attention_heads(cfg) -> list[tuple[str, int, int]]:
    """(what, query heads, KV heads) of every attention kind in the model."""
    return [k.attention_heads(cfg) for k in present(cfg) if k.attention_heads is not None]


def check_cp_model(cfg, pcfg, tp: int = 1) -> None:
    """Rules that need the model: recurrent mixers need their own cp support (state passing,
    not part of this module), and all-to-all attention splits each tp rank's heads over cp."""
    if pcfg.cp <= 1:
        return
    rec = [k.name for k in present(cfg) if k.recurrent]
    if rec and not RECURRENT_CP_READY:
        raise UserError(f"parallel.cp: context parallel does not support the {'/'.join(rec)} "
                          f"sublayers of model.pattern yet; use cp=1")
    if pcfg.cp_mode != "alltoall":
        return
    for key, heads, _ in attention_heads(cfg):
        local = heads // tp if heads % tp == 0 else heads
        if local % pcfg.cp:
            raise UserError(f"parallel.cp_mode: alltoall needs the attention heads per tp rank "
                              f"({key}={heads} / tp={tp} = {local}) divisible by parallel.cp={pcfg.cp}; "
                              f"use cp_mode=ring")


# ---- mesh -------------------------------------------------------------------------------

def flatten_cp_dims(world) -> None:
    """Flattened mesh dims for cp > 1: ``dp_shard_cp`` (FSDP shards and reduces over it) and
    ``cp_tp`` (MoE routing statistics under sequence parallel)."""
    if world.cp_size == 1 or world.mesh is None:
        return
    world.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    if world.tp_size > 1:
        world.mesh["cp", "tp"]._flatten("cp_tp")


def _slice(mesh, *dims):
    # torch warns that slicing flattened dims from the root mesh will change; it is the
    # documented way to get the (dp_replicate, dp_shard_cp) HSDP mesh on torch 2.14
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh[dims if len(dims) > 1 else dims[0]]


def fsdp_mesh(world):
    """The data-parallel mesh FSDP uses: ``dp_shard`` (x ``cp``), with ``dp_replicate`` as HSDP."""
    shard = "dp_shard_cp" if world.cp_size > 1 else "dp_shard"
    return _slice(world.mesh, "dp_replicate", shard) if world.dp_replicate > 1 else _slice(world.mesh, shard)


# ---- the split --------------------------------------------------------------------------

def chunk_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions of rank ``rank``'s tokens: chunks ``rank`` and ``2cp-1-rank`` of ``2cp``."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in (rank, 2 * cp - 1 - rank)])


def split_batch(batch: dict, cp: int, rank: int) -> dict:
    """This cp rank's share of every [B, S] tensor of ``batch`` (inputs, labels, doc ids)."""
    seq = batch["input_ids"].shape[-1]
    check_cp_seq(seq, cp)
    pos = chunk_positions(seq, cp, rank, batch["input_ids"].device)
    return {k: (v.index_select(-1, pos) if isinstance(v, torch.Tensor) and v.dim() >= 2
                and v.shape[-1] == seq else v) for k, v in batch.items()}


def unsplit(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of the split: the cp ranks' local tensors (rank order) -> natural order along ``dim``."""
    cp = len(parts)
    seq = parts[0].shape[dim] * cp
    pos = torch.cat([chunk_positions(seq, cp, r, parts[0].device) for r in range(cp)])
    out = torch.empty_like(torch.cat(parts, dim))
    return out.index_copy_(dim, pos, torch.cat(parts, dim))


@dataclass
class CPPlan:
    """This rank's context-parallel coordinates and mode (built by :func:`make_cp_plan`)."""

    size: int
    rank: int
    group: object  # the cp ProcessGroup
    mode: str = "ring"
    aux_group: object | None = None  # where MoE routing statistics are summed

    def split(self, batch: dict) -> dict:
        return split_batch(batch, self.size, self.rank)

    def loss_scale(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """``cp * n_local / n_global`` for a local mean token loss (see the module docstring)."""
        n = (labels != ignore_index).sum().float().reshape(1)
        total = funcol.wait_tensor(funcol.all_reduce(n.clone(), "sum", self.group))
        return (self.size * n / total.clamp(min=1.0)).reshape(())

    def scale_aux(self, aux):
        """The value of ``aux`` with ``cp`` times its gradient."""
        if not isinstance(aux, torch.Tensor):
            return aux
        return aux + (self.size - 1) * (aux - aux.detach())


def make_cp_plan(world, mode: str, sequence_parallel: bool = False) -> CPPlan | None:
    """The CPPlan of this rank (None without context parallelism)."""
    if world.cp_size == 1:
        return None
    aux = _slice(world.mesh, "cp_tp") if sequence_parallel and world.tp_size > 1 else world.mesh["cp"]
    return CPPlan(world.cp_size, world.cp_rank, world.mesh.get_group("cp"), mode, aux.get_group())


# ---- the seam ---------------------------------------------------------------------------

def gather_doc_ids(doc_ids: torch.Tensor, plan: CPPlan) -> torch.Tensor:
    """[B, S/cp] local document ids -> [B, S] global ones in natural order."""
    parts = doc_ids.new_empty((plan.size * doc_ids.shape[0], *doc_ids.shape[1:]))
    dist.all_gather_into_tensor(parts, doc_ids.contiguous(), group=plan.group)
    return unsplit(list(parts.chunk(plan.size, 0)), dim=1)


def set_cp_context(ctx, plan: CPPlan, doc_ids: torch.Tensor | None, seq_len: int, recurrent: bool = False):
    """Set every per-forward context-parallel field of ``ctx`` (a ``models.layers.ForwardContext``
    built for the global sequence length ``seq_len``): RoPE tables at this rank's global
    positions, ``ctx.attention``, the ring or all-to-all attention with the global document
    runs, and (``recurrent``: the model has Mamba-2 / ``P`` sublayers) ``ctx.recurrent_shard``,
    this rank's pieces of each sequence with their state and conv-halo exchanges."""
    from kernels.reference import doc_segments
    from parallel.ring_attention import CPGroup, alltoall_attention, ring_attention

    if recurrent:
        from parallel.cp_recurrent import zigzag_shard

        ctx.recurrent_shard = zigzag_shard(plan.group, seq_len, doc_ids)

    if ctx.rope is not None:
        seq_len = ctx.rope[0].shape[0]
        pos = chunk_positions(seq_len, plan.size, plan.rank, ctx.rope[0].device)
        ctx.rope = tuple(t.index_select(0, pos) for t in ctx.rope)
    glob = gather_doc_ids(doc_ids, plan) if doc_ids is not None else None
    seg = doc_segments(glob) if glob is not None and plan.mode == "ring" else None
    group = CPGroup(plan.group)

    def attention(q, k, v, local_doc_ids=None):
        """``kernels.attention`` for this rank's tokens (``local_doc_ids`` None: no doc mask)."""
        masked = local_doc_ids is not None and glob is not None
        if plan.mode == "alltoall":
            return alltoall_attention(q, k, v, glob if masked else None, group)
        return ring_attention(q, k, v, seg if masked else None, group)

    ctx.attention = attention
    return ctx


def install_cp(model: nn.Module, plan: CPPlan) -> None:
    """Give every forward of ``model`` (a whole model or a pipeline stage) its CP context,
    and route MoE routing statistics over the cp (x tp) group. Call after tensor parallelism (its context wrapper runs inside)."""
    orig = model.make_context
    recurrent = any(k.recurrent for k in present(model.cfg))

    def make_context(seq_len, device, doc_ids):
        n = seq_len * plan.size
        return set_cp_context(orig(n, device, doc_ids), plan, doc_ids, n, recurrent)

    model.make_context = make_context
    from parallel.tp_moe import _tp_sum

    for m in model.modules():
        if hasattr(m, "token_group_sum"):  # MoE: aux losses over the whole sequence
            m.token_group_sum = partial(_tp_sum, plan.aux_group)
