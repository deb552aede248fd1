"""Chunked LM head + cross-entropy: the ``[tokens, vocab]`` logits never exist at once.

The forward walks over chunks of tokens; for each it computes the chunk's logits,
its loss and (when gradients are wanted) the gradient of the loss wrt those logits,
which it immediately turns into the chunk's gradient wrt hidden and its contribution
to the gradient wrt the weight. Only those two gradients are kept for backward, which
merely scales them by the incoming gradient. Peak memory is one chunk of logits plus
the gradients, instead of several copies of the full logits.

The per-chunk step is pluggable (``chunk_fn``): ``torch_chunk`` here is the reference,
``kernels.triton_ops.cross_entropy.triton_chunk`` the fused kernel; both honour a
vocab-sharded weight by combining max / sum-exp / target logit across a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

def auto_chunk_size(n_tokens: int, vocab: int, dim: int) -> int:
    """Tokens per chunk: one chunk's logits about the size of the hidden states
    (at least 64M elements' worth, so the matmuls stay large), as a power of two."""
    budget = max(n_tokens * dim, 1 << 26)
    c = max(budget // max(vocab, 1), 16)
    c = 1 << (c.bit_length() - 1)
    return max(1, min(c, n_tokens))


def torch_chunk(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, ignore_index: int,
                z_loss: float, row_scale: torch.Tensor, group, need_grad: bool):
    """Reference chunk step. logits: [n, V_local] (consumed: overwritten in place);
    returns per-row loss [n] (0 on ignored rows) and ``d(sum(row_scale * loss))/d logits``."""
    x = logits.float()
    V = x.shape[1]
    valid = labels != ignore_index
    local = labels - vocab_start
    hit = valid & (local >= 0) & (local < V)
    idx = local.clamp(0, V - 1).unsqueeze(1)
    tgt = torch.where(hit, x.gather(1, idx).squeeze(1), 0.0)
    m = x.amax(dim=-1)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # exp(x - m) in place: the chunk's only [n, V] buffer is the logits themselves
    e = x.sub_(m.unsqueeze(1)).exp_()
    s = e.sum(-1)
    if group is not None:
        st = torch.stack([s, tgt])
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=group)
        s, tgt = st[0], st[1]
    lse = m + s.log()
    loss = lse - tgt
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if not need_grad:
        return loss, None
    coef = row_scale * (1.0 + 2.0 * z_loss * lse) if z_loss else row_scale
    # softmax * coef - row_scale * onehot
    g = e.mul_((coef / s).unsqueeze(1))
    g.scatter_add_(1, idx, -(row_scale * hit).unsqueeze(1))
    return loss, g.to(logits.dtype)


def _vocab_start(v_local: int, group, device) -> int:
    # Prefix sum of shard sizes, so uneven shards (e.g. DTensor Shard(0)) work too.
    # On the weight's device: NCCL only moves CUDA tensors.
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([v_local], dtype=torch.int64, device=device), group=group)
    return int(sum(int(s) for s in sizes[:dist.get_rank(group)]))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, z_loss, chunk_size, reduction,
                group, reduce_hidden_grad, chunk_fn, grad_enabled):
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            cdt = torch.get_autocast_dtype(dev)
        else:
            cdt = torch.promote_types(hidden.dtype, weight.dtype)
        D = hidden.shape[-1]
        h = hidden.reshape(-1, D).to(cdt)
        y = labels.reshape(-1)
        N, V = h.shape[0], weight.shape[0]
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        vocab_start = _vocab_start(V, group, weight.device) if group is not None else 0

        valid = y != ignore_index
        denom = valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=h.device)
        row_scale = valid.float() / denom
        c = chunk_size if chunk_size > 0 else auto_chunk_size(N, V, D)

        with torch.autocast(dev, enabled=False):
            w = weight.to(cdt)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            gh = torch.empty_like(h) if need_h else None
            gw = torch.zeros(V, D, dtype=torch.float32, device=h.device) if need_w else None
            for s in range(0, N, c):
                hc = h[s:s + c]
                logits = hc @ w.t()
                loss, g = chunk_fn(logits, y[s:s + c], vocab_start, ignore_index, z_loss,
                                   row_scale[s:s + c], group, need_grad)
                total += loss.sum()
                del logits, loss
                if need_h:
                    torch.mm(g, w, out=gh[s:s + c])
                if need_w:
                    if g.dtype == torch.float32:
                        gw.addmm_(g.t(), hc)
                    else:
                        gw += g.t() @ hc
                del g
            if need_h and group is not None and reduce_hidden_grad:
                dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        ctx.save_for_backward(gh if need_h else None, gw if need_w else None)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        hshape, hdtype, wdtype = ctx.shapes
        dh = _scaled(gh, grad_out, hdtype).view(hshape) if gh is not None else None
        dw = _scaled(gw, grad_out, wdtype) if gw is not None else None
        return dh, dw, None, None, None, None, None, None, None, None, None


def _scaled(g: torch.Tensor, grad_out: torch.Tensor, dtype) -> torch.Tensor:
    # Never in place on the saved gradient (backward may run again with retain_graph);
    # one new buffer either way.
    return g.to(dtype).mul_(grad_out) if g.dtype != dtype else g * grad_out


def chunked_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, z_loss=0.0,
                                 chunk_size=0, reduction="mean", process_group=None,
                                 reduce_hidden_grad=True, chunk_fn=None):
    """See ``kernels.reference.linear_cross_entropy``; ``chunk_fn`` picks the chunk step."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction '{reduction}' not in mean|sum")
    if hidden.shape[-1] != weight.shape[-1] or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: shapes hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}, labels {tuple(labels.shape)} do not match")
    return _LinearCrossEntropy.apply(hidden, weight, labels, int(ignore_index), float(z_loss),
                                     int(chunk_size), reduction, process_group, reduce_hidden_grad,
                                     chunk_fn or torch_chunk, torch.is_grad_enabled())
