"""RoPE frequency scaling for context extension (``model.rope_scaling``).

Semantics are those of Hugging Face ``rope_scaling`` dicts (transformers'
``ROPE_INIT_FUNCTIONS``), so an exported checkpoint gives the same logits there:

* ``linear``: every inverse frequency divided by ``factor`` (position interpolation);
* ``llama3``: wavelengths longer than ``original_max_seq_len / low_freq_factor`` divided by
  ``factor``, shorter than ``original_max_seq_len / high_freq_factor`` kept, a smooth blend
  in between;
* ``yarn``: per-dimension blend of interpolation and extrapolation with a linear ramp between
  the dimensions making ``beta_fast`` and ``beta_slow`` rotations over the original length,
  and cos/sin multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``).

A plain ``rope_theta`` change needs no scaling type.
"""

from __future__ import annotations

import math

import torch

from models.config import RopeScalingConfig, UserError

TYPES = ("none", "linear", "llama3", "yarn")


def check_rope_scaling(sc: RopeScalingConfig, max_seq_len: int) -> None:
    """Raise UserError naming the bad ``model.rope_scaling`` key."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise UserError(f"model.rope_scaling.{key}: {msg}")

    need(sc.type in TYPES, "type", f"'{sc.type}' not in {'|'.join(TYPES)}")
    if sc.type == "none":
        return
    need(sc.factor >= 1.0, "factor", f"must be >= 1 (new length / original length), got {sc.factor}")
    need(sc.original_max_seq_len >= 0, "original_max_seq_len", "must be >= 0")
    if sc.type == "llama3":
        need(sc.original_max_seq_len > 0, "original_max_seq_len", "llama3 needs the pretraining length")
        need(0 < sc.low_freq_factor < sc.high_freq_factor, "low_freq_factor",
             f"need 0 < low_freq_factor ({sc.low_freq_factor}) < high_freq_factor ({sc.high_freq_factor})")
    if sc.type == "yarn":
        need(sc.beta_fast > sc.beta_slow > 0, "beta_fast",
             f"need beta_fast ({sc.beta_fast}) > beta_slow ({sc.beta_slow}) > 0")
        need(sc.attention_factor >= 0, "attention_factor", "must be >= 0 (0: 0.1 ln(factor) + 1)")


def rope_inv_freq(head_dim: int, theta: float, sc: RopeScalingConfig | None = None, device=None,
                  max_seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32, multiplier of cos/sin)."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    base = theta ** exps
    inv = 1.0 / base
    kind = sc.type if sc is not None else "none"
    if kind == "none":
        return inv, 1.0
    if kind == "linear":
        return inv / sc.factor, 1.0
    if kind == "llama3":
        return _llama3(inv, sc), 1.0
    if kind == "yarn":
        return _yarn(base, head_dim, theta, sc, sc.original_max_seq_len or max_seq_len)
    raise UserError(f"model.rope_scaling.type: '{kind}' not in {'|'.join(TYPES)}")


def _llama3(inv: torch.Tensor, sc: RopeScalingConfig) -> torch.Tensor:
    old = sc.original_max_seq_len
    long_wave, short_wave = old / sc.low_freq_factor, old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > long_wave, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= short_wave) & (wavelen <= long_wave)
    return torch.where(medium, blended, scaled)


def _yarn(base: torch.Tensor, dim: int, theta: float, sc: RopeScalingConfig,
          original: int) -> tuple[torch.Tensor, float]:
    def dim_of(rotations: float) -> float:  # the dimension turning ``rotations`` times over ``original``
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(sc.beta_fast), dim_of(sc.beta_slow)
    if sc.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1).to(base.device)
    extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    inv = (1.0 / (sc.factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    att = sc.attention_factor or (0.1 * math.log(sc.factor) + 1.0 if sc.factor > 1 else 1.0)
    return inv, float(att)


def rope_scaling_to_hf(sc: RopeScalingConfig) -> dict | None:
    """The HF ``rope_scaling`` dict (None for plain RoPE)."""
    if sc.type == "none":
        return None
    out = {"rope_type": sc.type, "factor": float(sc.factor)}
    if sc.original_max_seq_len:
        out["original_max_position_embeddings"] = int(sc.original_max_seq_len)
    if sc.type == "llama3":
        out.update(low_freq_factor=float(sc.low_freq_factor), high_freq_factor=float(sc.high_freq_factor))
    if sc.type == "yarn":
        out.update(beta_fast=float(sc.beta_fast), beta_slow=float(sc.beta_slow), truncate=bool(sc.truncate))
        if sc.attention_factor:
            out["attention_factor"] = float(sc.attention_factor)
    return out


def rope_scaling_from_hf(d: dict | None) -> RopeScalingConfig:
    """An HF ``rope_scaling`` dict -> config (UserError for what has no equivalent)."""
    if not d or (d.get("rope_type") or d.get("type")) in (None, "default"):
        return RopeScalingConfig()
    kind = d.get("rope_type") or d.get("type")
    if kind not in TYPES or d.get("mscale") or d.get("mscale_all_dim"):
        raise UserError(f"rope_scaling {kind!r} (with {sorted(d)}) has no equivalent here "
                          f"(supported: linear, llama3, yarn without mscale)")
    sc = RopeScalingConfig(type=kind, factor=float(d["factor"]),
                           original_max_seq_len=int(d.get("original_max_position_embeddings") or 0))
    if kind == "llama3":
        sc.low_freq_factor, sc.high_freq_factor = float(d["low_freq_factor"]), float(d["high_freq_factor"])
    if kind == "yarn":
        sc.beta_fast, sc.beta_slow = float(d.get("beta_fast") or 32), float(d.get("beta_slow") or 1)
        sc.attention_factor = float(d.get("attention_factor") or 0.0)
        sc.truncate = bool(d.get("truncate", True))
    return sc
