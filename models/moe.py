"""Mixture-of-experts MLP sublayer (pattern symbol ``E``).

Forward: route -> permute (sort assignments by expert) -> ``dispatch`` -> SwiGLU experts
on local rows -> ``combine`` -> unpermute and weighted sum (+ shared experts).

Seams (all no-ops on one device):
- expert parallel: ``self.ep_comm`` (see ``models.moe_experts.LocalExpertComm``) and the
  local expert range ``self.local_experts``; expert weights are 3-D ``[E, ...]`` so dim 0
  can be sharded.
- aux losses: each forward sets ``self.aux_loss`` (of the whole micro-batch, also when
  sequence parallel splits its tokens over ranks: ``self.token_group_sum``). The runner
  sums every module's ``aux_loss`` into the micro-batch's loss (``parallel.runner.aux_losses``);
  under pipeline parallel, where the loss lives on the last stage only, a forward hook on
  each stage injects the stage's sum through the stage output's backward
  (``parallel.pipeline.attach_aux_losses``).
- aux-loss-free balancing (DeepSeek-V3): training forwards add selection counts to the
  ``tokens_per_expert`` buffer. After each optimizer step the trainer calls
  ``update_expert_biases(model, all_reduce)``, which pops every layer's counts
  (``MoE.pop_load``), sums them over data-parallel ranks with one ``all_reduce`` call on a
  stacked ``[layers, E]`` tensor, and moves ``expert_bias`` (``MoE.update_bias``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.fields import need
from models.layers import MLP
from models.moe_experts import LocalExpertComm, run_experts
from models.moe_upcycle import upcycle_dense_state  # noqa: F401  (public API)


def route(logits: torch.Tensor, *, score_fn: str, top_k: int, renormalize: bool,
          n_groups: int = 1, topk_groups: int = 1, expert_bias: torch.Tensor | None = None):
    """Router logits ``[T, E]`` -> ``(scores [T, E], expert ids [T, k], weights [T, k])``.

    ``expert_bias`` only affects which experts are chosen; the weights are the unbiased
    scores of the chosen experts (renormalised to sum to 1 if ``renormalize``).
    Group-limited routing (DeepSeek-V3): keep the ``topk_groups`` groups whose two best
    (biased) scores sum highest, then take the top-k inside them.
    """
    scores = logits.softmax(-1) if score_fn == "softmax" else logits.sigmoid()
    choice = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    if n_groups > 1:
        T, E = choice.shape
        per = E // n_groups
        group_score = choice.view(T, n_groups, per).topk(min(2, per), dim=-1).values.sum(-1)
        keep = group_score.topk(topk_groups, dim=-1).indices
        mask = torch.zeros(T, n_groups, dtype=torch.bool, device=choice.device).scatter(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(per, dim=1), float("-inf"))
    idx = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return scores, idx, weights


def assign_slots(idx: torch.Tensor, priority: torch.Tensor, n_experts: int,
                 capacity: int | None, policy: str = "probs"):
    """Sort the ``T*k`` assignments by expert, dropping those past ``capacity``.

    Returns ``(order, counts)``: flat assignment indices (``t * k + j``) grouped by expert,
    and kept rows per expert. ``policy`` decides who stays when an expert overflows:
    ``probs`` keeps the highest ``priority`` (router score), ``position`` the earliest tokens.
    """
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=n_experts)
    if capacity is None:
        return torch.argsort(flat, stable=True), counts
    if policy == "probs":
        pre = torch.argsort(priority.reshape(-1), descending=True, stable=True)
    else:
        pre = torch.arange(flat.numel(), device=flat.device)
    order = pre[torch.argsort(flat[pre], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return order[rank < capacity], counts.clamp(max=capacity)


def _in_backward() -> bool:
    # True while activation checkpointing recomputes the forward inside backward.
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts). ``forward(x, ctx) -> y``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.moe_cfg = m
        d, h = cfg.d_model, expert_width(cfg)
        self.n_experts, self.top_k, self.hidden = m.n_experts, m.top_k, h
        self.init_std, self.n_sublayers, self.depth_scaled = cfg.init_std, cfg.n_sublayers, cfg.depth_scaled_init
        self.router = nn.Linear(d, m.n_experts, bias=m.router_bias)
        # Experts this rank holds; an expert-parallel wrapper narrows it and shards dim 0.
        self.local_experts = range(0, m.n_experts)
        self.w_gate = nn.Parameter(torch.empty(m.n_experts, d, h))
        self.w_up = nn.Parameter(torch.empty(m.n_experts, d, h))
        self.w_down = nn.Parameter(torch.empty(m.n_experts, h, d))
        self.shared_expert = MLP(d, m.n_shared_experts * h) if m.n_shared_experts else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if m.n_shared_experts and m.shared_expert_gate else None
        self.register_buffer("expert_bias", torch.zeros(m.n_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(m.n_experts, dtype=torch.long), persistent=False)
        self.ep_comm = LocalExpertComm()
        # Sequence parallel seam: ``t -> t summed over the ranks routing the other tokens of
        # this micro-batch`` (None: this rank routes all of them); see ``_group_aux``.
        self.token_group_sum = None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    # ---- init -------------------------------------------------------------------
    def init_param(self, leaf: str, shape: tuple[int, ...], generator: torch.Generator):
        """Expert weights: normal(0, init_std), ``w_down`` depth-scaled. Drawn for all experts
        so a rank holding a slice of them gets the same values as one holding all."""
        if leaf not in ("w_gate", "w_up", "w_down"):
            return None
        std = self.init_std
        if leaf == "w_down" and self.depth_scaled:
            std = std / math.sqrt(max(self.n_sublayers, 1))
        full = torch.randn((self.n_experts, *shape[1:]), generator=generator) * std
        if shape[0] != self.n_experts:
            full = full[self.local_experts.start:self.local_experts.stop]
        return full

    def reset_buffers(self) -> None:
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    # ---- expert-parallel seams --------------------------------------------------
    def dispatch(self, tokens_sorted: torch.Tensor, counts_per_expert: torch.Tensor):
        """Send expert-sorted rows to the ranks holding their experts (identity locally)."""
        return self.ep_comm.dispatch(tokens_sorted, counts_per_expert)

    def combine(self, out: torch.Tensor, ctx) -> torch.Tensor:
        """Bring expert outputs back in the order ``dispatch`` received them."""
        return self.ep_comm.combine(out, ctx)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The local experts' ``(w_gate, w_up, w_down)`` as plain tensors."""
        from torch.distributed.tensor import DTensor  # expert parallel shards them over ranks

        ws = (self.w_gate, self.w_up, self.w_down)
        # isinstance, not hasattr: torch.compile traces the former for DTensor parameters
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in ws)

    def run_local_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return run_experts(x, counts, *self.expert_weights(), impl=self.moe_cfg.expert_impl)

    # ---- forward ----------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            b = self.router.bias.float() if self.router.bias is not None else None
            return F.linear(x.float(), self.router.weight.float(), b)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        m, E, k = self.moe_cfg, self.n_experts, self.top_k
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        T = xt.shape[0]
        logits = self.router_logits(xt)
        scores, idx, weights = route(logits, score_fn=m.score_fn, top_k=k, renormalize=m.renormalize,
                                     n_groups=m.n_groups, topk_groups=m.topk_groups,
                                     expert_bias=self.expert_bias)
        selected = torch.bincount(idx.reshape(-1), minlength=E)
        if self.training and not _in_backward():
            self.tokens_per_expert += selected
        # of this rank's tokens (under sequence parallel: per sequence shard)
        capacity = math.ceil(m.capacity_factor * T * k / E) if m.capacity_factor > 0 else None
        order, counts = assign_slots(idx, scores.gather(1, idx), E, capacity, m.drop_policy)

        x_sorted = xt.index_select(0, order // k)
        local_x, local_counts, handle = self.dispatch(x_sorted, counts)
        out = self.combine(self.run_local_experts(local_x, local_counts), handle)
        # Back to (token, choice) slots (dropped slots zero).
        if capacity is None:
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            slots = out.index_select(0, inverse)
        else:
            slots = out.new_zeros(T * k, out.shape[-1]).index_copy(0, order, out)
        self._set_aux(logits, scores, idx, counts, shape[0] if x.dim() == 3 else 1)
        # The weighted sum computed directly in the output's shape: the sublayer must not
        # return a view (FSDP2 drops its pre-backward hook on views modified in place).
        w = weights.to(slots.dtype).view(*shape[:-1], k, 1)
        y = (slots.view(*shape[:-1], k, slots.shape[-1]) * w).sum(-2)
        if self.shared_expert is not None:
            s = self.shared_expert(xt)
            if self.shared_gate is not None:
                s = s * torch.sigmoid(self.shared_gate(xt))
            y = y + s.view_as(y)
        return y

    def _set_aux(self, logits, scores, idx, kept, n_seqs: int) -> None:
        m, E, k = self.moe_cfg, self.n_experts, self.top_k
        # Switch loss: f_i = share of assignments to expert i (sums to 1), P_i = mean routing
        # probability (sigmoid scores normalised per token), over each of ``G`` token groups
        # (sequences, or the whole micro-batch), averaged over groups. Minimum (balanced) = 1.
        probs = scores if m.score_fn == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        lse2 = torch.logsumexp(logits, -1).pow(2)
        G = n_seqs if m.aux_loss_scope == "sequence" else 1
        T = probs.shape[0]
        group = torch.arange(G, device=idx.device).repeat_interleave(T // G)
        sel_g = torch.bincount((group.unsqueeze(1) * E + idx).reshape(-1), minlength=G * E).view(G, E).float()
        p_g = probs.view(G, T // G, E).sum(1)
        n_kept, n = kept.sum().float(), torch.full((1,), float(T // G), device=probs.device)
        if self.token_group_sum is None:
            f = sel_g / (n * k)
            lb = E * (f * p_g).sum(-1).mean() / n.squeeze()
            z, sel_all, n_all = lse2.mean(), sel_g, n
        else:
            lb, z, sel_all, n_kept, n_all = self._group_aux(p_g, lse2, sel_g, n_kept, n)
        self.aux_loss = m.aux_loss_coef * lb + m.z_loss_coef * z
        sel = sel_all.sum(0)
        self.stats = {
            "load_max_mean": (sel.max() / sel.mean().clamp_min(1e-9)).detach(),
            "dropped": (1.0 - n_kept / (n_all.squeeze() * G * k)).detach(),
            "aux_loss": lb.detach(),
            "z_loss": z.detach(),
        }

    def _group_aux(self, p_g, lse2, sel_g, n_kept, n):
        """Switch and z losses when this rank routed only part of each group's tokens
        (``token_group_sum`` sums over the ranks holding the other parts, e.g. sequence
        parallel). The value is the whole groups'; the gradient flows through this rank's
        tokens only, since each rank's backward contributes its own tokens' share."""
        G, E, k = p_g.shape[0], self.n_experts, self.top_k
        z_sum = lse2.sum()
        tot = self.token_group_sum(torch.cat([sel_g.reshape(-1), p_g.detach().reshape(-1),
                                              z_sum.detach().view(1), n_kept.view(1), n]))
        sel_all, p_all, z_all, kept_all, n_all = tot.split([G * E, G * E, 1, 1, 1])
        sel_all, p_all, n_all = sel_all.view(G, E), p_all.view(G, E), n_all.clamp_min(1.0)
        f = sel_all / (n_all * k)
        lb_mine = E * (f * p_g).sum(-1).mean() / n_all.squeeze()
        lb = lb_mine + (E * (f * p_all).sum(-1).mean() / n_all.squeeze() - lb_mine).detach()
        z_mine = z_sum / (n_all.squeeze() * G)
        z = z_mine + (z_all.squeeze() / (n_all.squeeze() * G) - z_mine).detach()
        return lb.reshape(()), z.reshape(()), sel_all, kept_all.reshape(()), n_all

    # ---- aux-loss-free balancing --------------------------------------------------
    def pop_load(self) -> torch.Tensor:
        """Selections per expert accumulated since the last call (this rank only), then reset.
        The trainer sums these over data-parallel ranks before ``update_bias``."""
        load = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return load

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor) -> None:
        """DeepSeek-V3: ``bias += rate * sign(mean_load - load)`` (no-op when rate is 0)."""
        rate = self.moe_cfg.bias_update_rate
        if rate <= 0:
            return
        load = global_load.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_((rate * torch.sign(load.mean() - load)).to(self.expert_bias.dtype))


# ---- model-level helpers (the trainer calls these; it needs no MoE internals) ---------

def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def update_expert_biases(model: nn.Module, all_reduce=None) -> None:
    """After an optimizer step: pop every layer's load, reduce across data-parallel ranks
    with ``all_reduce(t) -> t`` (one call, ``[layers, E]`` float tensor), update biases."""
    layers = moe_layers(model)
    if not layers:
        return
    loads = torch.stack([m.pop_load() for _, m in layers]).float()
    if all_reduce is not None:
        loads = all_reduce(loads)
    for (_, m), load in zip(layers, loads):
        m.update_bias(load)


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE sublayer, from its last forward: ``moe/<layer>/load_max_mean`` (max/mean
    selections per expert), ``dropped`` (fraction of assignments over capacity),
    ``aux_loss`` and ``z_loss`` (unscaled)."""
    out = {}
    for name, m in moe_layers(model):
        layer = name.removesuffix(".mixer").removeprefix("layers.")
        for key, v in m.stats.items():
            out[f"moe/{layer}/{key}"] = float(v)
    return out


# ---- sizes and FLOPs ----------------------------------------------------------------

def expert_width(cfg: ModelConfig) -> int:
    return cfg.moe.ffn_hidden or cfg.ffn_hidden_resolved


def _moe_params(cfg: ModelConfig, n_routed: int) -> int:
    m, d, h = cfg.moe, cfg.d_model, expert_width(cfg)
    router = d * m.n_experts + (m.n_experts if m.router_bias else 0)
    shared = 3 * d * h * m.n_shared_experts + (d if m.n_shared_experts and m.shared_expert_gate else 0)
    return router + n_routed * 3 * d * h + shared


def moe_active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses in one MoE sublayer: router, top_k experts, shared experts."""
    return _moe_params(cfg, cfg.moe.top_k)


def moe_total_params(cfg: ModelConfig) -> int:
    """All parameters of one MoE sublayer (without its input norm)."""
    return _moe_params(cfg, cfg.moe.n_experts)


def moe_inactive_params(cfg: ModelConfig) -> int:
    """Parameters of one MoE sublayer a token does not use (the experts it is not routed to)."""
    return moe_total_params(cfg) - moe_active_params(cfg)


def check_moe(cfg: ModelConfig) -> None:
    m = cfg.moe
    need(1 <= m.top_k <= m.n_experts, "moe.top_k", f"must be in 1..{m.n_experts}")
    need(m.n_experts % m.n_groups == 0, "moe.n_groups",
         f"{m.n_groups} groups do not divide {m.n_experts} experts")
    need(1 <= m.topk_groups <= m.n_groups, "moe.topk_groups", f"must be in 1..{m.n_groups}")
    need(m.top_k <= m.topk_groups * (m.n_experts // m.n_groups), "moe.top_k",
         f"{m.top_k} exceeds the {m.topk_groups * (m.n_experts // m.n_groups)} experts in topk_groups groups")


def moe_flops_per_token(cfg: ModelConfig, seq_len: int = 0) -> float:
    """Forward matmul FLOPs per token of one MoE sublayer (2 per active weight; dropless; the
    top-k weighted sum is elementwise, not counted). ``seq_len`` is unused."""
    m, d, h = cfg.moe, cfg.d_model, expert_width(cfg)
    router = d * m.n_experts
    shared = 3 * d * h * m.n_shared_experts + (d if m.n_shared_experts and m.shared_expert_gate else 0)
    return 2.0 * (router + m.top_k * 3 * d * h + shared)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """``(total, active per token)`` parameters of the whole model (embeddings included)."""
    from models.kinds import inactive_params
    from models.transformer import build_model

    total = build_model(cfg, init=False).num_params()
    return total, total - inactive_params(cfg)
