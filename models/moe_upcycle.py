"""Sparse upcycling: turn a dense checkpoint into an MoE one (every expert a copy of the MLP).

With no noise, renormalised top-k weights and no capacity dropping, the upcycled model
computes exactly the dense model's function at initialisation: each token's output is
``sum_j w_j * MLP(x) = MLP(x)``. Shared experts, if configured, start with a zero output
projection so they do not change that function either.
"""

from __future__ import annotations

import torch

from models.config import ModelConfig, UserError

_MLP = ("w_gate", "w_up", "w_down")


def upcycle_dense_state(dense_sd: dict, moe_cfg: ModelConfig, noise_std: float = 0.0,
                        seed: int = 0) -> dict:
    """Dense state dict (MLP sublayers ``layers.{i}.mixer.w_*.weight``) -> state dict of a
    model built from ``moe_cfg``, where every ``E`` sublayer sits where the dense one had ``-``.

    Each expert copies the dense MLP plus (optionally) independent Gaussian noise of std
    ``noise_std``; the router is drawn from normal(0, init_std) with ``seed``. All other
    entries are copied unchanged. Raises ``UserError`` when the shapes do not fit.
    """
    moe_cfg.validate()
    m, d = moe_cfg.moe, moe_cfg.d_model
    h = m.ffn_hidden or moe_cfg.ffn_hidden_resolved
    moe_idx = [i for i, k in enumerate(moe_cfg.sublayer_kinds) if k == "moe"]
    prefixes = tuple(f"layers.{i}.mixer." for i in moe_idx)
    out = {k: v for k, v in dense_sd.items() if not k.startswith(prefixes)}
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, like, std):
        return (torch.randn(shape, generator=gen) * std).to(dtype=like.dtype, device=like.device)

    for i, p in zip(moe_idx, prefixes):
        missing = [n for n in _MLP if p + n + ".weight" not in dense_sd]
        if missing:
            raise UserError(f"upcycle: the dense state has no MLP at sublayer {i} (no '{p}{missing[0]}.weight'); "
                              "the dense pattern needs '-' wherever the MoE pattern has 'E'")
        wg, wu, wd = (dense_sd[p + n + ".weight"] for n in _MLP)
        if tuple(wg.shape) != (h, d) or tuple(wd.shape) != (d, h):
            raise UserError(f"upcycle: sublayer {i} MLP is {tuple(wg.shape[::-1])} (d_model, hidden) but the MoE "
                              f"expects ({d}, {h}); set model.moe.ffn_hidden to the dense MLP width")
        for name, w in zip(_MLP, (wg, wu, wd)):
            # nn.Linear stores [out, in]; experts are stored [E, in, out].
            t = w.t().unsqueeze(0).repeat(m.n_experts, 1, 1)
            if noise_std > 0:
                t = t + normal(t.shape, t, noise_std)
            out[p + name] = t.contiguous()
        out[p + "router.weight"] = normal((m.n_experts, d), wg, moe_cfg.init_std)
        if m.router_bias:
            out[p + "router.bias"] = torch.zeros(m.n_experts, dtype=wg.dtype, device=wg.device)
        out[p + "expert_bias"] = torch.zeros(m.n_experts, device=wg.device)
        if m.n_shared_experts:
            hs = m.n_shared_experts * h
            out[p + "shared_expert.w_gate.weight"] = normal((hs, d), wg, moe_cfg.init_std)
            out[p + "shared_expert.w_up.weight"] = normal((hs, d), wg, moe_cfg.init_std)
            out[p + "shared_expert.w_down.weight"] = torch.zeros(d, hs, dtype=wg.dtype, device=wg.device)
            if m.shared_expert_gate:
                out[p + "shared_gate.weight"] = normal((1, d), wg, moe_cfg.init_std)
    return out
