"""The tensor-parallel plan of every sublayer kind, keyed by its ``models/kinds.py`` name,
and the two functions that walk a model with it: :func:`check_tp` and :func:`apply_tp`.

A new kind adds its :class:`~parallel.tp.TPPlan` here (``tests/test_kinds.py`` fails for a
kind without one); the styles and per-kind plans live in ``parallel/tp*.py``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from models.config import ModelConfig, UserError
from models.kinds import ATTENTION, GDN, HYBRID, MAMBA, MLP_KIND, MOE
from parallel import tp, tp_gdn, tp_hybrid, tp_mamba, tp_mla, tp_moe
from parallel.ladder import LadderPlan
from parallel.tp import ReplicateOverTP, RowwiseSublayerOutput, TPContext

def _attention_plan(sub: nn.Module, ctx: TPContext) -> None:
    if ctx.cfg.attention == "mla":  # multi-head latent attention
        return tp_mla.mla_plan(sub, ctx)
    tp.mha_plan(sub, ctx)
    if sub.mixer.q_norm is not None:  # qk_norm: per head-dim weights, replicated
        tp_mla.replicate_partial_grads(sub.mixer.q_norm, ctx.mesh)
        tp_mla.replicate_partial_grads(sub.mixer.k_norm, ctx.mesh)


def _attention_check(cfg: ModelConfig, tp_size: int) -> None:
    (tp_mla.mla_check if cfg.attention == "mla" else tp.mha_check)(cfg, tp_size)


ATTENTION_PLAN = tp.TPPlan(_attention_plan, _attention_check)

TP_PLANS: dict[str, tp.TPPlan] = {
    ATTENTION.name: ATTENTION_PLAN,
    MLP_KIND.name: tp.MLP_PLAN,
    MAMBA.name: tp_mamba.PLAN,
    MOE.name: tp_moe.PLAN,
    HYBRID.name: tp_hybrid.PLAN,
    GDN.name: tp_gdn.PLAN,
}


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Reject a model that cannot be split ``tp`` ways (UserError naming the key)."""
    if tp == 1:
        return
    if cfg.vocab_size % tp:
        raise UserError(f"parallel.tp: {tp} does not divide model.vocab_size={cfg.vocab_size}")
    if cfg.tie_embeddings:
        raise UserError("model.tie_embeddings: not supported with parallel.tp > 1")
    for kind in dict.fromkeys(cfg.sublayer_kinds):
        if kind not in TP_PLANS:
            raise UserError(f"parallel.tp: sublayer kind '{kind}' has no tensor-parallel plan; "
                              f"use parallel.tp=1")
        if TP_PLANS[kind].check is not None:
            TP_PLANS[kind].check(cfg, tp)


def apply_tp(model: nn.Module, ctx: TPContext, fused_head: bool = False,
             ladder: LadderPlan | None = None) -> None:
    """Shard ``model`` (a whole model or one pipeline stage of it) over the tp mesh; with a
    ``ladder`` plan, each sublayer's plan gets its overlap flags from it."""
    sp = ctx.sequence_parallel
    if model.tok_embeddings is not None:
        # vocab-parallel embedding: rows sharded, partial sums reduced into the stream layout
        parallelize_module(model.tok_embeddings, ctx.mesh,
                           RowwiseSublayerOutput(input_layouts=Replicate(), output_layouts=ctx.stream_layout))
    for name, sub in model.layers.items():
        TP_PLANS[sub.kind].apply(sub, ladder.sublayer_context(name, ctx) if ladder is not None else ctx)
    if model.norm is not None:
        style = SequenceParallel(use_local_output=not fused_head) if sp else ReplicateOverTP()
        parallelize_module(model.norm, ctx.mesh, style)
    if model.output is not None:
        if fused_head:  # the fused loss head uses its local vocab shard (see parallel/head.py)
            parallelize_module(model.output, ctx.mesh, _VocabShardOnly())
        else:  # logits stay a vocab-sharded DTensor for the loss-parallel cross-entropy
            parallelize_module(model.output, ctx.mesh, ColwiseParallel(
                input_layouts=ctx.stream_layout, output_layouts=Shard(-1), use_local_output=False))
    for module in getattr(model, "mtp", None) or ():  # multi-token prediction (models/mtp.py):
        for name in ("enorm", "hnorm", "proj", "norm"):  # norms and 2d -> d projection replicated
            parallelize_module(getattr(module, name), ctx.mesh, ReplicateOverTP())
        for sub in module.layers.values():  # the block's sublayers by their kind's plan
            TP_PLANS[sub.kind].apply(sub, ctx)
    if sp:  # mixers see the full sequence after the all-gather: RoPE tables for all of it
        model.stream_shards *= ctx.size
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"tensor-parallel plan left parameters unsharded: {plain[:5]}")


class _VocabShardOnly(ParallelStyle):
    """Shard the LM head's rows over tp without touching its inputs or outputs."""

    def _apply(self, module, device_mesh):
        def part(name, mod, mesh):
            mod.register_parameter("weight", nn.Parameter(
                distribute_tensor(mod.weight, mesh, [Shard(0)], src_data_rank=None)))
        return distribute_module(module, device_mesh, part)
