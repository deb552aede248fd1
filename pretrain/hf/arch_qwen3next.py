"""Gated DeltaNet / gated-attention hybrids with MLP or MoE layers <-> ``Qwen3NextForCausalLM``.

A Qwen3-Next decoder layer is one mixer (``linear_attention``: Gated DeltaNet, or
``full_attention``) then one MLP or MoE, so our stack must be pairs ``G-``, ``GE``, ``*-``,
``*E``: ``layer_types`` say which mixer, ``mlp_only_layers`` which layers are dense
(``decoder_sparse_step`` 1). Differences in layout, each exact:
- every ``Qwen3NextRMSNorm`` (layer norms, final norm, q/k norms) computes ``x * (1 + w)``:
  HF weights are ours minus one (the GDN's gated output norm is a plain ``x * w``);
- the GDN projections are packed per q/k head (``models.gdn.to_hf_gdn``);
- attention always has q/k RMSNorm and a sigmoid output gate (``q_proj`` rows [q_h | gate_h]
  per head, as ours with ``attn_output_gate``). An ungated model exports zero gate rows
  (sigmoid = 1/2) and a doubled ``o_proj``; all-zero gates import back as ungated;
- an MoE always has a sigmoid-gated shared expert (``arch_moe.SharedExpert``: none exports as
  zero width, ungated as gate 0 with a doubled down projection); softmax top-k routing.
Qwen3-Next's multi-token-prediction head is not in the transformers class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import GDNConfig, MoEConfig, ModelConfig
from pretrain.hf.arch_llama import attention_config, attention_from_config
from pretrain.hf.arch_moe import SharedExpert, routing_issues
from pretrain.hf.arch_io import base_issues, blocks, need, stack, strip_prefix, take
from pretrain.hf.pieces import ROUTER, ExpertBias, Experts, MappedArch, Piece, mlp

WHERE = "Qwen3NextForCausalLM"
MIXER = {"G": "linear_attention", "*": "full_attention"}
GDN_KEYS = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "dt_bias", "A_log", "norm.weight",
            "out_proj.weight")


@dataclass(frozen=True)
class CentredNorm(Piece):
    """An RMSNorm weight ``ours`` <-> Qwen3-Next's zero-centred ``theirs`` (= ours - 1)."""

    ours: str
    theirs: str

    def to_hf(self, sd, ours, theirs):
        return {theirs + self.theirs: sd[ours + self.ours] - 1}

    def from_hf(self, t, theirs, ours, where):
        return {ours + self.ours: take(t, theirs + self.theirs, where) + 1}


@dataclass(frozen=True)
class GatedAttention(Piece):
    """Our attention (q/k norm, optional output gate) <-> ``Qwen3NextAttention``."""

    n_heads: int
    gated: bool

    def to_hf(self, sd, ours, theirs):
        wq, wo = sd[f"{ours}wq.weight"], sd[f"{ours}wo.weight"]
        if not self.gated:  # zero gate rows after each head's q rows: sigmoid(0) = 1/2
            q = wq.unflatten(0, (self.n_heads, -1))
            wq, wo = torch.cat([q, torch.zeros_like(q)], 1).flatten(0, 1), wo * 2
        out = {f"{theirs}q_proj.weight": wq, f"{theirs}k_proj.weight": sd[f"{ours}wk.weight"],
               f"{theirs}v_proj.weight": sd[f"{ours}wv.weight"], f"{theirs}o_proj.weight": wo}
        for n in ("q_norm", "k_norm"):
            out.update(CentredNorm(f"{n}.weight", f"{n}.weight").to_hf(sd, ours, theirs))
        return out

    def from_hf(self, t, theirs, ours, where):
        wq, wo = take(t, f"{theirs}q_proj.weight", where), take(t, f"{theirs}o_proj.weight", where)
        for n in ("q", "k", "v", "o"):
            need(f"{theirs}{n}_proj.bias" not in t, f"{where}: {theirs}{n}_proj.bias (attention_bias=true) "
                                                    "has no equivalent here")
        if not self.gated:
            q, g = wq.unflatten(0, (self.n_heads, 2, -1)).unbind(1)
            need(not g.any(), f"{where}: {theirs}q_proj has non-zero gate rows in a model imported as ungated")
            wq, wo = q.flatten(0, 1), wo / 2
        out = {f"{ours}wq.weight": wq, f"{ours}wk.weight": take(t, f"{theirs}k_proj.weight", where),
               f"{ours}wv.weight": take(t, f"{theirs}v_proj.weight", where), f"{ours}wo.weight": wo}
        for n in ("q_norm", "k_norm"):
            out.update(CentredNorm(f"{n}.weight", f"{n}.weight").from_hf(t, theirs, ours, where))
        return out


@dataclass(frozen=True)
class GDNMixer(Piece):
    """Our Gated DeltaNet <-> ``Qwen3NextGatedDeltaNet`` (packed projections, one conv)."""

    n_k_heads: int

    def to_hf(self, sd, ours, theirs):
        from models.gdn import to_hf_gdn

        return {theirs + k: v for k, v in to_hf_gdn(sd, self.n_k_heads, ours).items()}

    def from_hf(self, t, theirs, ours, where):
        from models.gdn import from_hf_gdn

        part = strip_prefix(t, theirs)
        for k in GDN_KEYS:
            take(part, k, f"{where} ({theirs})")
        need("conv1d.bias" not in part, f"{where}: {theirs}conv1d.bias has no equivalent here")
        return {ours + k: v for k, v in from_hf_gdn(part, self.n_k_heads).items()}


def _layers(mc: ModelConfig) -> list[str] | None:
    b = blocks(mc)
    return b if b is not None and all(x[0] in MIXER and x[1] in "-E" for x in b) else None


class Qwen3Next(MappedArch):
    hf_class = WHERE
    model_types = ("qwen3_next",)

    def issues(self, mc, sd):
        b = _layers(mc)
        if b is None or not ("G" in stack(mc) or mc.qk_norm or mc.attn_output_gate):
            return None  # plain attention stacks go to Llama / Mixtral / Qwen2-MoE first
        attn, moe = any(x[0] == "*" for x in b), any(x[1] == "E" for x in b)
        out = base_issues(mc, attention=attn)
        if not attn or "G" not in stack(mc):  # (its generation cache indexes both kinds of layer)
            out.append("a stack without both G and * mixers (transformers' Qwen3-Next needs both)")
        if attn and mc.attention != "mha":
            out.append(f"model.attention={mc.attention} (Qwen3-Next attention is multi-head / GQA)")
        elif attn and not mc.qk_norm:
            out.append("model.qk_norm=false (Qwen3-Next attention always normalises q and k)")
        if attn and mc.qkv_bias:
            out.append("model.qkv_bias=true (attention biases)")
        if "G" in stack(mc) and mc.gdn.norm_eps != mc.norm_eps:
            out.append(f"model.gdn.norm_eps={mc.gdn.norm_eps} differs from model.norm_eps={mc.norm_eps} "
                       "(Qwen3-Next has one rms_norm_eps)")
        if moe:
            out += routing_issues(mc, sd, renormalize_required=False)
        if mc.mtp_depth:
            out.append(f"model.mtp_depth={mc.mtp_depth} (multi-token prediction modules)")
        return out

    def export_config(self, mc):
        from models.gdn import gdn_heads
        from models.moe import expert_width

        b, m, g = _layers(mc), mc.moe, mc.gdn
        hk, hv = gdn_heads(g)
        moe = any(x[1] == "E" for x in b)
        h = expert_width(mc)
        return {"model_type": "qwen3_next", **attention_config(mc), "intermediate_size": mc.ffn_hidden_resolved,
                "num_hidden_layers": len(b), "layer_types": [MIXER[x[0]] for x in b],
                "partial_rotary_factor": mc.partial_rotary_factor, "attention_bias": False,
                "linear_conv_kernel_dim": g.conv_size, "linear_key_head_dim": g.head_k_dim,
                "linear_value_head_dim": g.head_v_dim, "linear_num_key_heads": hk, "linear_num_value_heads": hv,
                "decoder_sparse_step": 1, "mlp_only_layers": [i for i, x in enumerate(b) if x[1] == "-"],
                "num_experts": m.n_experts if moe else 0, "num_experts_per_tok": m.top_k,
                "moe_intermediate_size": h, "shared_expert_intermediate_size": m.n_shared_experts * h,
                "norm_topk_prob": m.renormalize, "router_aux_loss_coef": m.aux_loss_coef}

    def pieces(self, mc):
        out, m = [], mc.moe
        hk = mc.gdn.n_heads
        for i, blk in enumerate(_layers(mc)):
            a, f, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            mixer = (f"{a}mixer.", f"{dst}linear_attn.", GDNMixer(hk)) if blk[0] == "G" else \
                (f"{a}mixer.", f"{dst}self_attn.", GatedAttention(mc.n_heads, mc.attn_output_gate))
            out += [(a, dst, CentredNorm("norm.weight", "input_layernorm.weight")), mixer,
                    (f, dst, CentredNorm("norm.weight", "post_attention_layernorm.weight"))]
            if blk[1] == "-":
                out.append((f"{f}mixer.", f"{dst}mlp.", mlp()))
                continue
            out += [(f"{f}mixer.", f"{dst}mlp.gate.", ROUTER),
                    (f"{f}mixer.", f"{dst}mlp.experts.", Experts(m.n_experts, ("gate_proj", "up_proj", "down_proj"))),
                    (f"{f}mixer.", f"{dst}mlp.", ExpertBias(m.n_experts)),
                    (f"{f}mixer.", f"{dst}mlp.", SharedExpert(m.n_shared_experts > 0, m.shared_expert_gate))]
        return out

    def export_weights(self, mc, sd):
        out = super().export_weights(mc, sd)
        out[self.ends[1]] = sd["norm.weight"] - 1  # the final norm is zero-centred too
        return out

    def import_weights(self, hf, mc, t):
        if mc.attn_output_gate and _all_gates_zero(hf, t):
            mc.attn_output_gate = False  # an ungated export (zero gate rows) comes back ungated
        out = super().import_weights(hf, mc, t)
        out["norm.weight"] = out["norm.weight"] + 1
        return out

    def import_config(self, hf):
        need(not hf.get("attention_bias", False), f"{WHERE}: attention_bias=true has no equivalent here")
        n = hf["num_hidden_layers"]
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        E = hf.get("num_experts", 0)
        types = hf.get("layer_types") or ["linear_attention" if (i + 1) % hf.get("full_attention_interval", 4)
                                          else "full_attention" for i in range(n)]
        need(len(types) == n and set(types) == set(MIXER.values()), f"{WHERE}: layer_types {sorted(set(types))} "
             f"(expected {n} of linear_attention and full_attention, both present)")
        mixer = {v: k for k, v in MIXER.items()}
        kinds = [mixer[t] + ("E" if i not in dense and E > 0 and (i + 1) % step == 0 else "-")
                 for i, t in enumerate(types)]
        h, shared = hf.get("moe_intermediate_size", 512), hf.get("shared_expert_intermediate_size", 0)
        need(shared % h == 0, f"{WHERE}: shared_expert_intermediate_size={shared} is not a multiple of "
                              f"moe_intermediate_size={h} (shared experts here are n x expert width)")
        moe = MoEConfig() if E == 0 else MoEConfig(
            n_experts=E, top_k=hf.get("num_experts_per_tok", 10), ffn_hidden=h, score_fn="softmax",
            renormalize=bool(hf.get("norm_topk_prob", True)), n_shared_experts=shared // h,
            shared_expert_gate=shared > 0, aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
        eps = float(hf.get("rms_norm_eps", 1e-6))
        gdn = GDNConfig(n_heads=hf["linear_num_key_heads"], n_v_heads=hf["linear_num_value_heads"],
                        head_k_dim=hf["linear_key_head_dim"], head_v_dim=hf["linear_value_head_dim"],
                        conv_size=hf.get("linear_conv_kernel_dim", 4), norm_eps=eps)
        unit = _period(kinds)
        attn = attention_from_config({**hf, "partial_rotary_factor": 1.0}, WHERE)
        return ModelConfig(pattern="".join(unit), n_layers=n // len(unit), ffn_hidden=hf["intermediate_size"],
                           qk_norm=True, attn_output_gate=True,
                           partial_rotary_factor=float(hf.get("partial_rotary_factor", 0.25)),
                           gdn=gdn, moe=moe, **attn)


def _period(kinds: list[str]) -> list[str]:
    """The shortest unit the layer list repeats (the pattern, with n_layers repeats)."""
    n = len(kinds)
    return next(kinds[:p] for p in range(1, n + 1) if n % p == 0 and kinds[:p] * (n // p) == kinds)


def _all_gates_zero(hf: dict, t: dict) -> bool:
    """True when every attention layer's output-gate rows of ``q_proj`` are exactly zero."""
    found = False
    for i, kind in enumerate(hf.get("layer_types") or []):
        w = t.get(f"model.layers.{i}.self_attn.q_proj.weight")
        if kind != "full_attention" or w is None:
            continue
        found = True
        if w.unflatten(0, (hf["num_attention_heads"], 2, -1))[:, 1].any():
            return False
    return found
