"""Gated DeltaNet mixer (pattern symbol ``G``): the linear-attention layer of Qwen3-Next.

Per token: q, k, v projections, each through a short causal depthwise conv + SiLU; q and k
L2-normalised (q scaled by 1/sqrt(head_k_dim) in the kernel); per value head a decay
``g = -exp(A_log) * softplus(a + dt_bias)`` and a write strength ``beta = sigmoid(b)``; the
gated delta rule (kernels/gdn.py) with value head ``h`` reading q/k head ``h // (n_v/n_k)``;
then ``rms_norm(o) * weight * silu(z)`` per value head and ``out_proj``.

Parameter layout (one linear per part, so each is plain column-parallel under TP):
``q_proj``, ``k_proj`` [n_heads*head_k_dim, d]; ``v_proj``, ``z_proj`` [n_v*head_v_dim, d];
``a_proj``, ``b_proj`` [n_v, d]; ``conv_q``/``conv_k``/``conv_v`` (weight [C, 1, K], no bias);
``dt_bias``, ``A_log`` [n_v]; ``norm.weight`` [head_v_dim] (shared by the heads); ``out_proj``.

Hugging Face ``Qwen3NextGatedDeltaNet`` fuses per q/k head ``g`` the rows
[q_g, k_g, v_(g*r..g*r+r-1), z_(same)] into ``in_proj_qkvz`` and [b_(...), a_(...)] into
``in_proj_ba`` (r = n_v/n_k), and concatenates [q, k, v] channels into ``conv1d``;
:func:`to_hf_gdn` / :func:`from_hf_gdn` convert. Everything else has the same name and math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gdn import gated_delta_rule, gated_delta_rule_flops, gated_delta_rule_step, l2norm
from kernels.ssd import segment_ids
from models.config import GDNConfig, ModelConfig, UserError
from models.mamba2 import CausalConv1d, run_convs, sharded_convs, step_convs, zero_conv_states

_CONV_PARTS = ("q", "k", "v")


def check_gdn_config(gc: GDNConfig) -> None:
    """Rules across ``model.gdn`` fields."""
    if gc.n_v_heads and gc.n_v_heads % gc.n_heads:
        raise UserError(f"model.gdn.n_v_heads: {gc.n_v_heads} is not a multiple of n_heads={gc.n_heads}")
    if gc.dt_min > gc.dt_max:
        raise UserError(f"model.gdn.dt_min: {gc.dt_min} exceeds gdn.dt_max={gc.dt_max}")
    lo, hi = gc.A_init_range
    if lo > hi:
        raise UserError(f"model.gdn.A_init_range: low end {lo} exceeds high end {hi}")


def gdn_heads(gc: GDNConfig) -> tuple[int, int]:
    """(q/k heads, value heads)."""
    return gc.n_heads, gc.n_v_heads or gc.n_heads


class HeadGatedRMSNorm(nn.Module):
    """``rms_norm(x) * weight * silu(z)`` over each head's last dim (norm before gate; the
    statistics in fp32, as Qwen3-Next's ``Qwen3NextRMSNormGated``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def init_param(self, leaf: str, shape, generator):
        return torch.ones(shape)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if x.dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        return (y * F.silu(z.to(xf.dtype))).to(dtype)


@dataclass
class GDNCache:
    """Generation state of one mixer: last K-1 conv inputs per conv, and the delta-rule state."""

    conv: dict[str, torch.Tensor]  # part -> [b, C, K-1]
    state: torch.Tensor  # [b, n_v, head_k_dim, head_v_dim], fp32


class GatedDeltaNetMixer(nn.Module):
    """Gated DeltaNet; sizes are read from the weights at run time (a TP shard sees fewer heads)."""

    no_weight_decay = ("A_log", "dt_bias")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        gc = self.gdn_cfg = cfg.gdn
        check_gdn_config(gc)
        Hk, Hv = gdn_heads(gc)
        self.head_k_dim, self.head_v_dim = gc.head_k_dim, gc.head_v_dim
        D, dk, dv = cfg.d_model, Hk * gc.head_k_dim, Hv * gc.head_v_dim
        self.q_proj = nn.Linear(D, dk, bias=False)
        self.k_proj = nn.Linear(D, dk, bias=False)
        self.v_proj = nn.Linear(D, dv, bias=False)
        self.z_proj = nn.Linear(D, dv, bias=False)
        self.a_proj = nn.Linear(D, Hv, bias=False)
        self.b_proj = nn.Linear(D, Hv, bias=False)
        self.conv_q = CausalConv1d(dk, gc.conv_size, bias=False)
        self.conv_k = CausalConv1d(dk, gc.conv_size, bias=False)
        self.conv_v = CausalConv1d(dv, gc.conv_size, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(Hv))
        self.A_log = nn.Parameter(torch.empty(Hv))
        self.norm = HeadGatedRMSNorm(gc.head_v_dim, gc.norm_eps)
        self.out_proj = nn.Linear(dv, D, bias=False)

    def init_param(self, leaf: str, shape, generator):
        gc = self.gdn_cfg
        if leaf == "dt_bias":  # as Mamba-2 / fla: dt log-uniform, stored as softplus^-1(dt)
            lo, hi = math.log(gc.dt_min), math.log(gc.dt_max)
            dt = torch.exp(torch.rand(shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo)
            return (dt + torch.log(-torch.expm1(-dt))).float()
        if leaf == "A_log":
            lo, hi = gc.A_init_range
            return torch.log(torch.rand(shape, generator=generator) * (hi - lo) + lo)
        return None

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx=None, cache: GDNCache | None = None) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. With ``cache``, continue from it and leave the final
        states in it (prefill)."""
        doc_ids = ctx.doc_ids if ctx is not None and self.gdn_cfg.doc_reset else None
        shard = ctx.recurrent_shard if ctx is not None else None
        if shard is not None:
            if cache is not None:
                raise ValueError("a recurrent shard (context parallel) cannot prefill a cache")
            return self.out_proj(self._mix_sharded(x, doc_ids, shard))
        seq_idx = segment_ids(doc_ids) if doc_ids is not None else None
        p = self.project(x)
        run_convs(self, p, _CONV_PARTS, seq_idx, cache)
        q, k, v, g, beta = self.kernel_inputs(p)
        o = gated_delta_rule(q, k, v, g, beta, self.gdn_cfg.chunk_size, seq_idx=seq_idx,
                             initial_state=cache.state if cache is not None else None,
                             return_final_state=cache is not None)
        if cache is not None:
            o, cache.state = o
        return self.out_proj(self.gate(o, p["z"]))

    def _mix_sharded(self, u: torch.Tensor, doc_ids, shard) -> torch.Tensor:
        """Everything before ``out_proj`` on a context-parallel shard (exact). Each piece runs
        once from a zero state with an identity block appended to its state (zero values for
        it), which yields both its final state F and its transition M (X -> M X); after the
        shard's state exchange the piece is rerun from its entering state."""
        p = self.project(u)
        gates = list(zip(shard.split(p["a"]), shard.split(p["b"])))
        runs, finals, moves = [], [], []
        for (parts, seq_idx), (a, b) in zip(sharded_convs(self, p, _CONV_PARTS, doc_ids, shard), gates):
            q, k, v, g, beta = self.kernel_inputs({"a": a, "b": b, **parts})
            B, L, H, dk = k.shape
            eye = torch.eye(dk, dtype=torch.float64 if v.dtype == torch.float64 else torch.float32,
                            device=v.device)
            init = torch.cat([eye.new_zeros(B, H, dk, v.shape[-1]), eye.expand(B, H, dk, dk)], -1)
            _, fin = gated_delta_rule(q, k, torch.cat([v, v.new_zeros(B, L, H, dk)], -1), g, beta,
                                      self.gdn_cfg.chunk_size, initial_state=init, seq_idx=seq_idx,
                                      return_final_state=True)
            # the shard composes states as S @ M: hand it transposed [V, K] states
            finals.append(fin[..., :v.shape[-1]].transpose(-1, -2))
            moves.append(fin[..., v.shape[-1]:].transpose(-1, -2))
            runs.append((q, k, v, g, beta, seq_idx))
        states = shard.entering_states(finals, transitions=moves, doc_reset=doc_ids is not None)
        outs = [gated_delta_rule(*r[:5], self.gdn_cfg.chunk_size, initial_state=S.transpose(-1, -2),
                                 seq_idx=r[5]) for r, S in zip(runs, states)]
        return self.gate(shard.cat(outs), p["z"])

    def project(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        return {part: getattr(self, f"{part}_proj")(u) for part in ("q", "k", "v", "z", "a", "b")}

    def kernel_inputs(self, p: dict[str, torch.Tensor]):
        """Post-conv projections -> (q, k, v, g, beta) in the kernel's [.., heads, dim] layout,
        q and k normalised and repeated to the value heads."""
        cd = torch.float64 if p["v"].dtype == torch.float64 else torch.float32
        q = l2norm(p["q"].unflatten(-1, (-1, self.head_k_dim)).to(cd))
        k = l2norm(p["k"].unflatten(-1, (-1, self.head_k_dim)).to(cd))
        v = p["v"].unflatten(-1, (-1, self.head_v_dim))
        r = v.shape[-2] // q.shape[-2]
        if r > 1:
            q, k = q.repeat_interleave(r, dim=-2), k.repeat_interleave(r, dim=-2)
        beta = torch.sigmoid(p["b"])
        g = -torch.exp(self.A_log.to(cd)) * F.softplus(p["a"].to(cd) + self.dt_bias.to(cd))
        return q.to(v.dtype), k.to(v.dtype), v, g, beta

    def gate(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gated per-head norm: o [.., H, dv], z [.., H*dv] -> [.., H*dv]."""
        return self.norm(o, z.unflatten(-1, (-1, self.head_v_dim))).flatten(-2)

    # ---- generation ----------------------------------------------------------------------
    def allocate_cache(self, batch: int, device=None, dtype=None) -> GDNCache:
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.v_proj.weight.dtype
        conv = zero_conv_states(self, _CONV_PARTS, batch, device, dtype)
        sdt = torch.float64 if self.A_log.dtype == torch.float64 else torch.float32
        state = torch.zeros(batch, self.A_log.shape[0], self.head_k_dim, self.head_v_dim, device=device, dtype=sdt)
        return GDNCache(conv=conv, state=state)

    def step(self, x_t: torch.Tensor, cache: GDNCache) -> torch.Tensor:
        """Decode one token: x_t [B, D] or [B, 1, D] -> same rank output; updates ``cache``."""
        squeeze = x_t.dim() == 3
        p = self.project(x_t[:, 0] if squeeze else x_t)
        step_convs(self, p, _CONV_PARTS, cache)
        q, k, v, g, beta = self.kernel_inputs(p)
        o, cache.state = gated_delta_rule_step(cache.state, q, k, v, g, beta)
        y = self.out_proj(self.gate(o, p["z"]))
        return y.unsqueeze(1) if squeeze else y


# ---- FLOPs -------------------------------------------------------------------------------

def gdn_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul/conv FLOPs per token of one ``G`` mixer on a ``seq_len`` sequence, as
    FlopCounterMode counts the reference with ``kernels.gdn.flop_mapping`` (which adds the
    triangular solve); chunk padding included."""
    gc = cfg.gdn
    Hk, Hv = gdn_heads(gc)
    dk, dv = Hk * gc.head_k_dim, Hv * gc.head_v_dim
    f = 2 * cfg.d_model * (2 * dk + 2 * dv + 2 * Hv) + 2 * dv * cfg.d_model
    f += 2 * gc.conv_size * (2 * dk + dv)
    f += gated_delta_rule_flops(1, seq_len, Hv, gc.head_k_dim, gc.head_v_dim, gc.chunk_size) / seq_len
    return float(f)


# ---- Hugging Face layout (Qwen3-Next) -------------------------------------------------------

def _sizes(hf: dict[str, torch.Tensor], n_k_heads: int):
    Hv, dv = hf["A_log"].shape[0], hf["norm.weight"].shape[0]
    dk = (hf["in_proj_qkvz.weight"].shape[0] - 2 * Hv * dv) // (2 * n_k_heads)
    return Hv, dv, dk, Hv // n_k_heads


def to_hf_gdn(sd: dict[str, torch.Tensor], n_k_heads: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A mixer's state dict (keys after ``prefix``) -> ``Qwen3NextGatedDeltaNet`` names."""
    g = lambda k: sd[prefix + k]  # noqa: E731
    Hk = n_k_heads
    per = lambda name: g(f"{name}.weight").unflatten(0, (Hk, -1))  # noqa: E731  rows per q/k head
    qkvz = torch.cat([per("q_proj"), per("k_proj"), per("v_proj"), per("z_proj")], 1).flatten(0, 1)
    ba = torch.cat([per("b_proj"), per("a_proj")], 1).flatten(0, 1)
    conv = torch.cat([g(f"conv_{p}.weight") for p in _CONV_PARTS], 0)
    return {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": ba, "conv1d.weight": conv,
            "dt_bias": g("dt_bias"), "A_log": g("A_log"), "norm.weight": g("norm.weight"),
            "out_proj.weight": g("out_proj.weight")}


def from_hf_gdn(hf: dict[str, torch.Tensor], n_k_heads: int) -> dict[str, torch.Tensor]:
    """``Qwen3NextGatedDeltaNet`` tensors -> this mixer's state dict."""
    Hv, dv, dk, r = _sizes(hf, n_k_heads)
    qkvz = hf["in_proj_qkvz.weight"].unflatten(0, (n_k_heads, -1))
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], 1)
    b, a = hf["in_proj_ba.weight"].unflatten(0, (n_k_heads, -1)).split([r, r], 1)
    out = {f"{n}_proj.weight": t.flatten(0, 1) for n, t in zip("qkvzba", (q, k, v, z, b, a))}
    cq, ck, cv = hf["conv1d.weight"].split([n_k_heads * dk, n_k_heads * dk, Hv * dv], 0)
    out.update({"conv_q.weight": cq, "conv_k.weight": ck, "conv_v.weight": cv})
    for key in ("dt_bias", "A_log", "norm.weight", "out_proj.weight"):
        out[key] = hf[key]
    return {key: t.clone() for key, t in out.items()}


# ---- planner (pretrain/planner/model_stats.py) ------------------------------------------------

def gdn_linears(cfg: ModelConfig) -> list[tuple[str, int, int, str]]:
    """(name, d_in, d_out, tp split) of each linear, as parallel/tp_gdn.py splits them."""
    gc, d = cfg.gdn, cfg.d_model
    Hk, Hv = gdn_heads(gc)
    dk, dv = Hk * gc.head_k_dim, Hv * gc.head_v_dim
    return [("q_proj", d, dk, "col"), ("k_proj", d, dk, "col"), ("v_proj", d, dv, "col"),
            ("z_proj", d, dv, "col"), ("a_proj", d, Hv, "col"), ("b_proj", d, Hv, "col"),
            ("out_proj", dv, d, "row")]


def gdn_tp_dim(leaf: str) -> int | None:
    """The dim parallel/tp_gdn.py shards parameter ``leaf`` (owner name) on, None: replicated."""
    return None if leaf == "norm" else 1 if leaf == "out_proj" else 0


def gdn_elementwise_elems(cfg: ModelConfig) -> float:
    """Elements per token the mixer's element-wise kernels move, forward + backward (conv,
    SiLU, L2 norms, gates, gated norm), like Mamba-2's 12 x d_inner."""
    gc = cfg.gdn
    Hk, Hv = gdn_heads(gc)
    return 6.0 * (2 * Hk * gc.head_k_dim + 2 * Hv * gc.head_v_dim)


def gdn_widest(cfg: ModelConfig) -> float:
    """Elements per token of the widest intermediate (whole, divide by tp for a rank)."""
    gc = cfg.gdn
    Hk, Hv = gdn_heads(gc)
    return float(max(Hv * gc.head_v_dim, Hv * (gc.chunk_size + gc.head_k_dim), cfg.d_model))


def gdn_saved_bytes(cfg: ModelConfig, act_bytes: int) -> float:
    """Bytes per token a fused mixer keeps for backward (whole; divide by tp): projections,
    conv outputs, kernel output and gated norm in ``act_bytes``, one fp32 state per chunk."""
    gc = cfg.gdn
    Hk, Hv = gdn_heads(gc)
    dk, dv = Hk * gc.head_k_dim, Hv * gc.head_v_dim
    return float((2 * (2 * dk + dv) + 3 * dv + 2 * Hv) * act_bytes
                 + Hv * gc.head_k_dim * gc.head_v_dim * 4 / gc.chunk_size)


def gdn_reference_bytes(cfg: ModelConfig) -> float:
    """What kernels/gdn.py's torch chunked form keeps on top, per token: fp32 chunk matrices
    (decay, k k^T, A, q k^T: 4 x C per head) and per-head vectors (solve result, W, U, scaled
    q and k: ~3 x (K + V))."""
    gc = cfg.gdn
    Hv = gdn_heads(gc)[1]
    return float(4 * Hv * (4 * gc.chunk_size + 3 * (gc.head_k_dim + gc.head_v_dim)))
