"""Parallel hybrid heads ``P-`` <-> ``FalconH1ForCausalLM``.

Falcon-H1 layers run attention and a Mamba-2 mixer on the same normalised input, each
with its own output projection, add both to the stream, then an MLP. Our ``P`` mixer has
one ``out_proj`` over the concatenation [attention | mamba], which is the same linear map
split by columns into ``o_proj`` and ``mamba.out_proj``. The µP multipliers are exported as
1.0; on import they are folded into the weights they scale (exact: each multiplies the
input or output of a linear map), which needs untied embeddings unless both embedding
multipliers are 1. The Mamba norm is gate-then-norm (``mamba_norm_before_gate: false``),
grouped by ``mamba_n_groups`` as ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import HybridHeadsConfig, ModelConfig
from pretrain.hf.arch_llama import attention_config, attention_from_config
from pretrain.hf.arch_mamba import mamba_from_config
from pretrain.hf.arch_io import base_issues, blocks, need
from pretrain.hf.pieces import Attention, MambaMixer, MappedArch, Piece, mlp, norm

WHERE = "FalconH1ForCausalLM"


class FalconH1(MappedArch):
    hf_class = WHERE
    ends = ("model.embed_tokens.weight", "model.final_layernorm.weight")
    model_types = ("falcon_h1",)

    def issues(self, mc, sd):
        b = blocks(mc)
        if b is None or set(b) != {"P-"}:
            return None
        out = base_issues(mc)
        if mc.qkv_bias:
            out.append("model.qkv_bias=true (Falcon-H1 attention has no bias)")
        if tuple(mc.mamba.dt_limit) != (0.0, float("inf")):
            out.append(f"model.mamba.dt_limit={tuple(mc.mamba.dt_limit)} (fixed to (0, inf) in Falcon-H1)")
        return out

    def export_config(self, mc):
        from models.hybrid import hybrid_kv_heads

        mm, hy = mc.mamba, mc.hybrid
        cfg = {"model_type": "falcon_h1", **attention_config(mc), "intermediate_size": mc.ffn_hidden_resolved,
               "num_hidden_layers": len(blocks(mc)), "num_attention_heads": hy.n_attn_heads,
               "num_key_value_heads": hybrid_kv_heads(mc), "mamba_d_ssm": hy.n_mamba_heads * mm.head_dim,
               "mamba_n_heads": hy.n_mamba_heads, "mamba_d_head": mm.head_dim, "mamba_n_groups": mm.n_groups,
               "mamba_d_state": mm.d_state, "mamba_d_conv": mm.d_conv, "mamba_expand": mm.expand,
               "mamba_chunk_size": mm.chunk_size, "mamba_conv_bias": mm.conv_bias, "mamba_proj_bias": False,
               "mamba_norm_before_gate": False, "mamba_rms_norm": True, "projectors_bias": False}
        return cfg

    def pieces(self, mc):
        split, out = mc.hybrid.n_attn_heads * mc.head_dim_resolved, []
        for i in range(len(blocks(mc))):
            a, f, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out += [(a, dst, norm("input_layernorm")), (f"{a}mixer.", dst, HybridHeads(split)),
                    (f, dst, norm("pre_ff_layernorm")), (f"{f}mixer.", f"{dst}feed_forward.", mlp())]
        return out

    def import_config(self, hf):
        from models.hybrid import hybrid_kv_heads

        need(hf.get("mamba_rms_norm", False), f"{WHERE}: mamba_rms_norm=false (no gated norm) has no equivalent here")
        need(not hf.get("mamba_norm_before_gate", True),
             f"{WHERE}: mamba_norm_before_gate=true (norm, then gate) has no equivalent here")
        need(not hf.get("projectors_bias", False) and not hf.get("mamba_proj_bias", False),
             f"{WHERE}: projection biases have no equivalent here")
        if hf.get("tie_word_embeddings"):
            need(hf.get("embedding_multiplier", 1.0) == 1.0 and hf.get("lm_head_multiplier", 1.0) == 1.0,
                 f"{WHERE}: embedding/lm_head multipliers with tied embeddings cannot be folded into one matrix")
        mm = mamba_from_config(hf, "mamba_", WHERE)
        n_m = hf["mamba_n_heads"]
        d_ssm = hf.get("mamba_d_ssm") or mm.expand * hf["hidden_size"]
        mm.head_dim = d_ssm // n_m if hf.get("mamba_d_head", "auto") == "auto" else hf["mamba_d_head"]
        kw = attention_from_config(hf, WHERE)
        hy = HybridHeadsConfig(n_attn_heads=kw["n_heads"], n_mamba_heads=n_m)
        mc = ModelConfig(pattern="P-", n_layers=hf["num_hidden_layers"], ffn_hidden=hf["intermediate_size"],
                         mamba=mm, hybrid=hy, **kw)
        need(hybrid_kv_heads(mc) == mc.n_kv_heads_resolved,
             f"{WHERE}: {mc.n_kv_heads_resolved} KV heads do not divide {kw['n_heads']} attention heads")
        return mc

    def import_weights(self, hf, mc, t):
        m = _multipliers(hf, mc)
        return super().import_weights(hf, mc, {k: v * m[_kind(k)] if _kind(k) in m else v for k, v in t.items()})


@dataclass(frozen=True)
class HybridHeads(Piece):
    """Our ``P`` mixer <-> Falcon-H1's ``self_attn`` and ``mamba``: our one ``out_proj`` over
    [attention | mamba] is their ``o_proj`` and ``mamba.out_proj`` side by side."""

    split: int  # attention columns of out_proj

    def to_hf(self, sd, ours, theirs):
        w = sd[f"{ours}out_proj.weight"]
        view = {**sd, f"{ours}wo.weight": w[:, :self.split], f"{ours}mamba.out_proj.weight": w[:, self.split:]}
        return {**Attention().to_hf(view, ours, f"{theirs}self_attn."),
                **MambaMixer().to_hf(view, f"{ours}mamba.", f"{theirs}mamba.")}

    def from_hf(self, t, theirs, ours, where):
        att = Attention().from_hf(t, f"{theirs}self_attn.", ours, where)
        mam = MambaMixer().from_hf(t, f"{theirs}mamba.", f"{ours}mamba.", where)
        out = {f"{ours}out_proj.weight": torch.cat([att.pop(f"{ours}wo.weight"),
                                                    mam.pop(f"{ours}mamba.out_proj.weight")], 1)}
        return {**out, **att, **mam}


def _kind(name: str) -> str:
    for suffix in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "in_proj.weight",
                   "mamba.out_proj.weight", "gate_proj.weight", "down_proj.weight", "embed_tokens.weight",
                   "lm_head.weight"):
        if name.endswith(suffix):
            return suffix
    return ""


def _multipliers(hf: dict, mc: ModelConfig) -> dict:
    """Per weight kind, the factor that folds Falcon-H1's µP multipliers into it."""
    g = lambda k, d: float(hf.get(k, d) if hf.get(k) is not None else d)  # noqa: E731
    attn_in = g("attention_in_multiplier", 1.0)
    gate_m, down_m = (hf.get("mlp_multipliers") or [1.0, 1.0])
    out = {"q_proj.weight": attn_in, "k_proj.weight": attn_in * g("key_multiplier", 1.0),
           "v_proj.weight": attn_in, "o_proj.weight": g("attention_out_multiplier", 1.0),
           "mamba.out_proj.weight": g("ssm_out_multiplier", 1.0),
           "gate_proj.weight": float(gate_m), "down_proj.weight": float(down_m),
           "embed_tokens.weight": g("embedding_multiplier", 1.0), "lm_head.weight": g("lm_head_multiplier", 1.0)}
    zxbcdt = [float(x) for x in (hf.get("ssm_multipliers") or [1.0] * 5)]
    if any(x != 1.0 for x in zxbcdt) or g("ssm_in_multiplier", 1.0) != 1.0:
        mm, n_m = mc.mamba, mc.hybrid.n_mamba_heads
        d_ssm, gn = n_m * mm.head_dim, mm.n_groups * mm.d_state
        rows = torch.cat([torch.full((n,), x) for n, x in zip((d_ssm, d_ssm, gn, gn, n_m), zxbcdt)])
        out["in_proj.weight"] = (rows * g("ssm_in_multiplier", 1.0)).unsqueeze(1)
    return {k: v for k, v in out.items() if not (isinstance(v, float) and v == 1.0)}
