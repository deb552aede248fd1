"""Tensor (+ sequence) parallel plan for multi-head latent attention (``model.attention: mla``),
and the replicated per-head-dim norms of the standard attention's ``qk_norm``.

MLA by heads: ``wq`` / ``wq_b`` and ``wkv_b`` are column-parallel (rank r holds heads
``r*H/tp ..``, whose rows are contiguous: ``[nope | rope]`` and ``[k_nope | v]`` per head),
``wo`` row-parallel (reduced by ``reduce_sublayer_output``); the compressed projections
``wq_a``, ``wkv_a`` and their norms are replicated, every rank computing them in full.

The whole mixer then computes on local tensors, and every gradient inside it is this rank's
share of a sum over tp: the shared rope key ``k_rope`` and the latents feed only this rank's
heads. So the replicated parameters' gradients are marked ``Partial`` (summed by FSDP or
``finalize_grads``, as for replicated KV heads), and the mixer input is taken from the stream
with a ``Partial`` gradient, reduced once at the boundary (all-reduce, or reduce-scatter with
sequence parallel), as the standard attention's is. The sharded projections' gradients are
complete on their rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from models.config import ModelConfig, UserError
from parallel.tp import TPContext, _norms, sublayer_output

COLUMN = ("wq", "wq_b", "wkv_b")  # sharded by heads (dim 0)
REPLICATED = ("wq_a", "q_norm", "wkv_a", "kv_norm")


def mla_check(cfg: ModelConfig, tp: int) -> None:
    if cfg.n_heads % tp:
        raise UserError(f"parallel.tp: {tp} does not divide model.n_heads={cfg.n_heads}")


def local_views_in_forward(owner: nn.Module, targets: list[tuple[nn.Module, str, tuple | None]]) -> None:
    """During ``owner``'s forward, ``mod.name`` is the local tensor of each DTensor parameter in
    ``targets`` (``(mod, name, grad_placements)``: ``(Partial(),)`` marks the local gradient as
    this rank's share of a sum over tp); the registered parameters are untouched."""
    def pre(module, args):
        for mod, name, gp in targets:
            p = mod._parameters[name]
            mod.__dict__[name] = p.to_local(grad_placements=gp) if gp else p.to_local()

    def post(module, args, out):
        for mod, name, _ in targets:
            mod.__dict__.pop(name, None)
        return out

    owner.register_forward_pre_hook(pre)
    owner.register_forward_hook(post)


def _distribute(mod: nn.Module, mesh, placement) -> list[str]:
    names = []
    for name, p in list(mod.named_parameters(recurse=False)):
        mod.register_parameter(name, nn.Parameter(
            distribute_tensor(p, mesh, [placement], src_data_rank=None), p.requires_grad))
        names.append(name)
    return names


def replicate_partial_grads(mod: nn.Module, mesh) -> None:
    """Parameters of ``mod`` replicated over tp, applied to this rank's own heads only (so
    their local gradients are partial sums): the standard attention's q_norm / k_norm."""
    names = _distribute(mod, mesh, Replicate())
    local_views_in_forward(mod, [(mod, n, (Partial(),)) for n in names])


def _stream_input(ctx: TPContext):
    """Mixer input: the stream gathered to the full sequence, as a local tensor whose gradient
    is a partial sum (reduced into the stream's layout on the way back)."""
    mesh, layout = ctx.mesh, ctx.stream_layout

    def pre(module, args):
        x, rest = args[0], args[1:]
        # a ladder input boundary is already a Replicate DTensor that reduces the partial
        # gradient itself: no redistribute here (its backward would all-reduce at once)
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (layout,), run_check=False)
            if layout != Replicate():
                x = x.redistribute(placements=(Replicate(),))
        return (x.to_local(grad_placements=(Partial(),)), *rest)

    return pre


def mla_plan(sub: nn.Module, ctx: TPContext) -> None:
    parallelize_module(sub, ctx.mesh, {**_norms(sub, ctx),
                                       "mixer.wo": sublayer_output(ctx)})
    mixer = sub.mixer
    mixer.register_forward_pre_hook(_stream_input(ctx))
    targets = []
    for child, placement, grads in ((COLUMN, Shard(0), None), (REPLICATED, Replicate(), (Partial(),))):
        for cname in child:
            mod = getattr(mixer, cname, None)
            if mod is not None:
                targets += [(mod, n, grads) for n in _distribute(mod, ctx.mesh, placement)]
    local_views_in_forward(mixer, targets)
