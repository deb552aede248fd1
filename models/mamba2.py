"""Mamba-2 mixer (pattern symbol ``M``): in-projections, causal conv, SSD scan, gated norm.

Parameter layout (chosen for tensor parallelism and checkpoint mapping):
- One linear per in-projection part: ``z_proj``, ``x_proj``, ``dt_proj`` (split by heads
  under TP) and ``B_proj``, ``C_proj`` (split by groups). Each is plain column-parallel,
  which a single fused ``in_proj`` would not be (its shards would interleave five parts).
- One depthwise conv per conv input: ``conv_x``, ``conv_B``, ``conv_C`` (weight [C, 1, K]).
- ``dt_bias``, ``A_log``, ``D`` [heads]; ``norm.weight`` [d_inner] (gated RMSNorm,
  norm-before-gate False, groups of d_inner / n_groups channels); ``out_proj`` (row-parallel).
Shapes are read from the weights at run time, so a sharded mixer sees fewer local heads.

Hugging Face ``Mamba2``/``Bamba`` use one ``in_proj`` ordered [z, x, B, C, dt] and one
``conv1d`` over [x, B, C]; ``to_hf_mamba2`` / ``from_hf_mamba2`` convert by concatenation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.ssd import (causal_conv1d, causal_conv1d_step, segment_ids, ssd, ssd_flops, ssd_state_output,
                         ssd_step)
from models.config import ModelConfig, UserError
from models.fields import need

_IN_PARTS = ("z", "x", "B", "C", "dt")  # Hugging Face in_proj order
_CONV_PARTS = ("x", "B", "C")


class CausalConv1d(nn.Module):
    """Depthwise causal conv over [b, L, C] with document-boundary masking."""

    def __init__(self, channels: int, kernel: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def init_param(self, leaf: str, shape, generator):
        # torch's Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    def forward(self, x, seq_idx=None, state=None):
        """Returns silu(conv(x)); with ``state`` [b, C, K-1] also the updated state."""
        w = self.weight[:, 0]
        K = w.shape[-1]
        if state is None:
            return causal_conv1d(x, w, self.bias, seq_idx, activation="silu")
        # continue from the cached inputs, which belong to the first token's document
        ext = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)
        ext_idx = None
        if seq_idx is not None:
            ext_idx = torch.cat([seq_idx[:, :1].expand(-1, K - 1), seq_idx], dim=1)
        y = causal_conv1d(ext, w, self.bias, ext_idx, activation="silu")[:, K - 1:]
        new = ext[:, ext.shape[1] - (K - 1):]
        if ext_idx is not None and K > 1:
            # tokens of earlier documents must not feed the next step
            keep = ext_idx[:, -(K - 1):] == ext_idx[:, -1:]
            new = new * keep.unsqueeze(-1).to(new.dtype)
        return y, new.transpose(1, 2).contiguous()

    def step(self, x_t, state):
        return causal_conv1d_step(x_t, state, self.weight[:, 0], self.bias, activation="silu")


class GatedRMSNorm(nn.Module):
    """rms_norm(x * silu(z)) within groups of ``group_size`` channels (Mamba-2 ``norm``)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.group_size = group_size
        self.eps = eps

    def init_param(self, leaf: str, shape, generator):
        return torch.ones(shape)

    def forward(self, x, z):
        return kernels.gated_rms_norm(x, z, self.weight, self.eps, self.group_size)


@dataclass
class Mamba2Cache:
    """Generation state of one mixer: last K-1 conv inputs per conv, and the SSM state."""

    conv: dict[str, torch.Tensor]  # part -> [b, C, K-1]
    ssm: torch.Tensor  # [b, H, P, N], fp32


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer. ``n_heads`` overrides expand*d_model/head_dim; without
    ``out_proj`` the mixer returns the gated-normed SSD output (for the hybrid-heads mixer)."""

    # Megatron and mamba_ssm exclude these from weight decay.
    no_weight_decay = ("A_log", "dt_bias", "D")

    def __init__(self, cfg: ModelConfig, n_heads: int | None = None, out_proj: bool = True):
        super().__init__()
        mc = cfg.mamba
        H = n_heads if n_heads is not None else mc.expand * cfg.d_model // mc.head_dim
        if H < 1 or H % mc.n_groups:
            raise UserError(f"model.mamba.n_groups: {mc.n_groups} groups do not divide {H} Mamba heads")
        self.mamba_cfg = mc
        self.head_dim, self.d_state, self.n_groups = mc.head_dim, mc.d_state, mc.n_groups
        d_inner, gn = H * mc.head_dim, mc.n_groups * mc.d_state
        D = cfg.d_model
        self.z_proj = nn.Linear(D, d_inner, bias=False)
        self.x_proj = nn.Linear(D, d_inner, bias=False)
        self.B_proj = nn.Linear(D, gn, bias=False)
        self.C_proj = nn.Linear(D, gn, bias=False)
        self.dt_proj = nn.Linear(D, H, bias=False)
        self.conv_x = CausalConv1d(d_inner, mc.d_conv, mc.conv_bias)
        self.conv_B = CausalConv1d(gn, mc.d_conv, mc.conv_bias)
        self.conv_C = CausalConv1d(gn, mc.d_conv, mc.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = GatedRMSNorm(d_inner, d_inner // mc.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(d_inner, D, bias=False) if out_proj else None

    # ---- initialisation (Mamba-2) ------------------------------------------------------
    def init_param(self, leaf: str, shape, generator):
        mc = self.mamba_cfg
        if leaf == "dt_bias":
            lo, hi = math.log(mc.dt_min), math.log(mc.dt_max)
            dt = torch.exp(torch.rand(shape, generator=generator, dtype=torch.float64) * (hi - lo) + lo)
            dt = dt.clamp(min=mc.dt_init_floor)
            return (dt + torch.log(-torch.expm1(-dt))).float()  # inverse softplus
        if leaf == "A_log":
            lo, hi = mc.A_init_range
            return torch.log(torch.rand(shape, generator=generator) * (hi - lo) + lo)
        if leaf == "D":
            return torch.ones(shape)
        return None

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx=None, cache: Mamba2Cache | None = None) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. With ``cache``, continue from it and leave the final
        states in it (prefill)."""
        doc_ids = ctx.doc_ids if ctx is not None and self.mamba_cfg.doc_reset else None
        shard = ctx.recurrent_shard if ctx is not None else None
        return self._out(self.mix(x, doc_ids, cache, shard))

    def _out(self, y):
        return self.out_proj(y) if self.out_proj is not None else y

    def _project(self, u):
        return {p: getattr(self, f"{p}_proj")(u) for p in _IN_PARTS}

    def _dt_A(self, dt):
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.mamba_cfg.dt_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(lo, hi)
        return dt, -torch.exp(self.A_log.float())

    def mix(self, u: torch.Tensor, doc_ids: torch.Tensor | None = None,
            cache: Mamba2Cache | None = None, shard=None) -> torch.Tensor:
        """Everything before ``out_proj``: [B, S, D] -> gated-normed SSD output [B, S, d_inner].
        ``shard`` (``ForwardContext.recurrent_shard``): ``u`` holds pieces of longer sequences."""
        if shard is not None:
            if cache is not None:
                raise ValueError("a recurrent shard (context parallel) cannot prefill a cache")
            return self._mix_sharded(u, doc_ids, shard)
        b, L, _ = u.shape
        seq_idx = segment_ids(doc_ids) if doc_ids is not None else None
        p = self._project(u)
        for part in _CONV_PARTS:
            conv = getattr(self, f"conv_{part}")
            if cache is None:
                p[part] = conv(p[part], seq_idx)
            else:
                p[part], cache.conv[part] = conv(p[part], seq_idx, cache.conv[part])
        P, N = self.head_dim, self.d_state
        H, G = p["x"].shape[-1] // P, p["B"].shape[-1] // N
        dt, A = self._dt_A(p["dt"])
        out = ssd(p["x"].view(b, L, H, P), dt, A, p["B"].view(b, L, G, N), p["C"].view(b, L, G, N),
                  self.mamba_cfg.chunk_size, D=self.D, seq_idx=seq_idx,
                  initial_state=cache.ssm if cache is not None else None,
                  return_final_state=cache is not None)
        if cache is not None:
            out, cache.ssm = out
        return self.norm(out.reshape(b, L, H * P).to(p["z"].dtype), p["z"])

    def _mix_sharded(self, u: torch.Tensor, doc_ids, shard) -> torch.Tensor:
        """``mix`` on a context-parallel shard: each piece runs from a zero state with its
        conv halo, then gets the contribution of the state entering it (exact)."""
        p = self._project(u)
        widths = [p[part].shape[-1] for part in _CONV_PARTS]
        K = self.conv_x.weight.shape[-1]
        conv_in = torch.cat([p[part] for part in _CONV_PARTS], -1)
        pieces = shard.split(conv_in)
        halos = shard.halo(pieces, K - 1, doc_ids is not None)
        ids = shard.split(doc_ids) if doc_ids is not None else [None] * len(pieces)
        dt_all, A = self._dt_A(p["dt"])
        dts = shard.split(dt_all)
        P, N = self.head_dim, self.d_state
        runs = []
        for piece, halo, pid, dt in zip(pieces, halos, ids, dts):
            seq_idx = segment_ids(pid) if pid is not None else None
            parts = {}
            for part, xp, hp in zip(_CONV_PARTS, piece.split(widths, -1), halo.split(widths, -1)):
                parts[part] = getattr(self, f"conv_{part}")(xp, seq_idx, hp.transpose(1, 2))[0]
            b, L = piece.shape[:2]
            H, G = parts["x"].shape[-1] // P, parts["B"].shape[-1] // N
            C = parts["C"].view(b, L, G, N)
            y, final = ssd(parts["x"].view(b, L, H, P), dt, A, parts["B"].view(b, L, G, N), C,
                           self.mamba_cfg.chunk_size, D=self.D, seq_idx=seq_idx, return_final_state=True)
            runs.append((y, final, (dt * A).sum(1), C, dt, seq_idx))
        states = shard.entering_states([r[1] for r in runs], [r[2] for r in runs], doc_ids is not None)
        ys = [(y + ssd_state_output(C, dt, A, S, seq_idx).to(y.dtype)).flatten(2)
              for (y, _, _, C, dt, seq_idx), S in zip(runs, states)]
        return self.norm(shard.cat(ys).to(p["z"].dtype), p["z"])

    # ---- generation ----------------------------------------------------------------------
    def allocate_cache(self, batch: int, device=None, dtype=None) -> Mamba2Cache:
        """Zero state for ``batch`` sequences (conv states in ``dtype``, SSM state in fp32)."""
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.x_proj.weight.dtype
        K = self.conv_x.weight.shape[-1]
        conv = {part: torch.zeros(batch, getattr(self, f"conv_{part}").weight.shape[0], K - 1,
                                  device=device, dtype=dtype) for part in _CONV_PARTS}
        H = self.A_log.shape[0]
        sdt = torch.float64 if self.A_log.dtype == torch.float64 else torch.float32
        ssm = torch.zeros(batch, H, self.head_dim, self.d_state, device=device, dtype=sdt)
        return Mamba2Cache(conv=conv, ssm=ssm)

    def mix_step(self, u_t: torch.Tensor, cache: Mamba2Cache) -> torch.Tensor:
        """One token [B, D] -> [B, d_inner] before ``out_proj``; updates ``cache`` in place."""
        b = u_t.shape[0]
        p = self._project(u_t)
        for part in _CONV_PARTS:
            p[part], cache.conv[part] = getattr(self, f"conv_{part}").step(p[part], cache.conv[part])
        P, N = self.head_dim, self.d_state
        H, G = p["x"].shape[-1] // P, p["B"].shape[-1] // N
        dt, A = self._dt_A(p["dt"])
        y, cache.ssm = ssd_step(cache.ssm, p["x"].view(b, H, P), dt, A, p["B"].view(b, G, N),
                                p["C"].view(b, G, N), self.D)
        return self.norm(y.reshape(b, H * P).to(p["z"].dtype), p["z"])

    def step(self, x_t: torch.Tensor, cache: Mamba2Cache) -> torch.Tensor:
        """Decode one token: x_t [B, D] or [B, 1, D] -> same rank output."""
        squeeze = x_t.dim() == 3
        y = self._out(self.mix_step(x_t[:, 0] if squeeze else x_t, cache))
        return y.unsqueeze(1) if squeeze else y


# ---- config rules and FLOPs (the ``M`` record in models/kinds.py) -------------------------

def check_ssm_params(cfg: ModelConfig) -> None:
    """Rules every Mamba-2 mixer (``M``, and the SSM heads of ``P``) needs."""
    mc = cfg.mamba
    need(mc.dt_min <= mc.dt_max, "mamba.dt_min", f"{mc.dt_min} exceeds mamba.dt_max={mc.dt_max}")
    for name in ("dt_limit", "A_init_range"):
        lo, hi = getattr(mc, name)
        need(lo <= hi, f"mamba.{name}", f"low end {lo} exceeds high end {hi}")


def check_mamba(cfg: ModelConfig) -> None:
    check_ssm_params(cfg)
    mc = cfg.mamba
    d_inner = mc.expand * cfg.d_model
    need(d_inner % mc.head_dim == 0, "mamba.head_dim",
         f"{mc.head_dim} does not divide expand*d_model={d_inner}")
    n_heads = d_inner // mc.head_dim
    need(n_heads % mc.n_groups == 0, "mamba.n_groups",
         f"{mc.n_groups} groups do not divide {n_heads} Mamba heads")


def mamba_flops_per_token(cfg: ModelConfig, seq_len: int, n_heads: int | None = None,
                          out_proj: bool = True) -> float:
    """Forward matmul/conv FLOPs per token of one ``M`` mixer on a ``seq_len`` sequence,
    counted as FlopCounterMode counts the reference (chunk padding included)."""
    mc = cfg.mamba
    H = n_heads if n_heads is not None else mc.expand * cfg.d_model // mc.head_dim
    d_inner, gn = H * mc.head_dim, mc.n_groups * mc.d_state
    f = 2 * cfg.d_model * (2 * d_inner + 2 * gn + H)
    if out_proj:
        f += 2 * d_inner * cfg.d_model
    f += 2 * mc.d_conv * (d_inner + 2 * gn)
    f += ssd_flops(1, seq_len, H, mc.head_dim, mc.n_groups, mc.d_state, mc.chunk_size) / seq_len
    return float(f)


# ---- Hugging Face layout -------------------------------------------------------------------

def to_hf_mamba2(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A mixer's state dict (keys after ``prefix``) -> HF ``Mamba2Mixer`` names."""
    g = lambda k: sd[prefix + k]  # noqa: E731
    out = {
        "in_proj.weight": torch.cat([g(f"{p}_proj.weight") for p in _IN_PARTS], 0),
        "conv1d.weight": torch.cat([g(f"conv_{p}.weight") for p in _CONV_PARTS], 0),
        "dt_bias": g("dt_bias"), "A_log": g("A_log"), "D": g("D"),
        "norm.weight": g("norm.weight"), "out_proj.weight": g("out_proj.weight"),
    }
    if prefix + "conv_x.bias" in sd:
        out["conv1d.bias"] = torch.cat([g(f"conv_{p}.bias") for p in _CONV_PARTS], 0)
    return out


def from_hf_mamba2(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Mamba2Mixer`` tensors -> this mixer's state dict (sizes read from the tensors)."""
    H, d_inner = hf["A_log"].shape[0], hf["norm.weight"].shape[0]
    gn = (hf["in_proj.weight"].shape[0] - 2 * d_inner - H) // 2
    sizes = {"z": d_inner, "x": d_inner, "B": gn, "C": gn, "dt": H}
    out = dict(zip((f"{p}_proj.weight" for p in _IN_PARTS),
                   hf["in_proj.weight"].split([sizes[p] for p in _IN_PARTS], 0)))
    conv_sizes = [sizes[p] for p in _CONV_PARTS]
    out.update(zip((f"conv_{p}.weight" for p in _CONV_PARTS), hf["conv1d.weight"].split(conv_sizes, 0)))
    if "conv1d.bias" in hf:
        out.update(zip((f"conv_{p}.bias" for p in _CONV_PARTS), hf["conv1d.bias"].split(conv_sizes, 0)))
    for k in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
        out[k] = hf[k]
    return {k: v.clone() for k, v in out.items()}
