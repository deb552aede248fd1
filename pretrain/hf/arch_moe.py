"""MoE stacks <-> ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM``.

Both HF classes route with a softmax over all experts' logits, take the top-k and (Mixtral
always, Qwen2-MoE with ``norm_topk_prob``) renormalise, dropless. Expert ``e``'s SwiGLU is
``w2(silu(w1 x) * w3 x)`` (Mixtral) / ``down(silu(gate x) * up x)`` (Qwen2-MoE) with
``[out, in]`` Linear weights; ours are ``[E, in, out]`` matrices used as ``x @ w``, hence the
transposes. Qwen2-MoE always has a sigmoid-gated shared expert: an ungated one exports with
a zero gate (sigmoid = 1/2) and a doubled down projection, which is exact.
DeepSeek-V3-style routing (sigmoid scores, score-correction bias, group-limited top-k) has no
faithful target: transformers' DeepseekV3 uses multi-head latent attention, which plain
GQA attention weights cannot be expressed in; such models go to remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import MoEConfig, ModelConfig
from pretrain.hf.arch_llama import attention_config, attention_from_config
from pretrain.hf.arch_io import base_issues, blocks, need, take
from pretrain.hf.pieces import ROUTER, Attention, ExpertBias, Experts, MappedArch, Piece, mlp, norm


def routing_issues(mc: ModelConfig, sd: dict, renormalize_required: bool) -> list[str]:
    m, out = mc.moe, []
    if m.score_fn != "softmax":
        out.append(f"model.moe.score_fn={m.score_fn} (sigmoid router scores)")
    if renormalize_required and not m.renormalize:
        out.append("model.moe.renormalize=false (top-k weights not renormalised)")
    if m.n_groups > 1 and m.topk_groups < m.n_groups:
        out.append("model.moe.n_groups/topk_groups (group-limited routing)")
    if m.router_bias:
        out.append("model.moe.router_bias=true (router bias)")
    if m.capacity_factor > 0:
        out.append(f"model.moe.capacity_factor={m.capacity_factor} (token dropping)")
    biased = [k for k, v in sd.items() if k.endswith("mixer.expert_bias") and v.any()]
    if biased:
        out.append("non-zero expert_bias (aux-loss-free balancing bias)")
    return out


def _moe_width(mc: ModelConfig) -> int:
    from models.moe import expert_width

    return expert_width(mc)


class Mixtral(MappedArch):
    hf_class = "MixtralForCausalLM"
    model_types = ("mixtral",)
    names = ("w1", "w3", "w2")

    def issues(self, mc, sd):
        if blocks(mc) is None or set(blocks(mc)) != {"*E"}:
            return None
        out = base_issues(mc) + routing_issues(mc, sd, renormalize_required=True)
        if mc.moe.n_shared_experts:
            out.append("model.moe.n_shared_experts>0 (shared experts)")
        if mc.qkv_bias:
            out.append("model.qkv_bias=true (Mixtral attention has no bias)")
        return out

    def export_config(self, mc):
        return {"model_type": "mixtral", **attention_config(mc), "intermediate_size": _moe_width(mc),
                "num_hidden_layers": len(blocks(mc)), "num_local_experts": mc.moe.n_experts,
                "num_experts_per_tok": mc.moe.top_k, "sliding_window": None, "router_jitter_noise": 0.0,
                "router_aux_loss_coef": mc.moe.aux_loss_coef}

    def pieces(self, mc):
        out, n = [], mc.moe.n_experts
        for i in range(len(blocks(mc))):
            a, m, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            moe = f"{dst}block_sparse_moe."
            out += [(a, dst, norm("input_layernorm")), (f"{a}mixer.", f"{dst}self_attn.", Attention()),
                    (m, dst, norm("post_attention_layernorm")), (f"{m}mixer.", f"{moe}gate.", ROUTER),
                    (f"{m}mixer.", f"{moe}experts.", Experts(n, self.names)), (f"{m}mixer.", moe, ExpertBias(n))]
        return out

    def import_config(self, hf):
        sw = hf.get("sliding_window")
        need(sw is None or sw >= hf.get("max_position_embeddings", 0),
             f"MixtralForCausalLM: sliding_window={sw} (sliding-window attention) has no equivalent here")
        h = hf["intermediate_size"]
        moe = MoEConfig(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], ffn_hidden=h,
                        score_fn="softmax", renormalize=True,
                        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))
        return ModelConfig(pattern="*E", n_layers=hf["num_hidden_layers"], ffn_hidden=h, moe=moe,
                           **attention_from_config(hf, "MixtralForCausalLM"))


class Qwen2Moe(MappedArch):
    """Attention + (MoE | dense MLP) layers, shared experts, optional top-k renormalisation."""

    hf_class = "Qwen2MoeForCausalLM"
    model_types = ("qwen2_moe",)
    names = ("gate_proj", "up_proj", "down_proj")

    def issues(self, mc, sd):
        b = blocks(mc)
        if b is None or not set(b) <= {"*E", "*-"} or "*E" not in b:
            return None
        return base_issues(mc) + routing_issues(mc, sd, renormalize_required=False)

    def export_config(self, mc):
        m, h = mc.moe, _moe_width(mc)
        b = blocks(mc)
        return {"model_type": "qwen2_moe", **attention_config(mc), "intermediate_size": mc.ffn_hidden_resolved,
                "num_hidden_layers": len(b), "num_experts": m.n_experts, "num_experts_per_tok": m.top_k,
                "moe_intermediate_size": h, "shared_expert_intermediate_size": m.n_shared_experts * h,
                "norm_topk_prob": m.renormalize, "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i, blk in enumerate(b) if blk == "*-"],
                "qkv_bias": mc.qkv_bias, "use_sliding_window": False, "sliding_window": None,
                "router_aux_loss_coef": m.aux_loss_coef}

    def pieces(self, mc):
        out, m = [], mc.moe
        for i, blk in enumerate(blocks(mc)):
            a, f, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out += [(a, dst, norm("input_layernorm")), (f"{a}mixer.", f"{dst}self_attn.", Attention(mc.qkv_bias)),
                    (f, dst, norm("post_attention_layernorm"))]
            if blk == "*-":
                out.append((f"{f}mixer.", f"{dst}mlp.", mlp()))
                continue
            out += [(f"{f}mixer.", f"{dst}mlp.gate.", ROUTER),
                    (f"{f}mixer.", f"{dst}mlp.experts.", Experts(m.n_experts, self.names)),
                    (f"{f}mixer.", f"{dst}mlp.", ExpertBias(m.n_experts)),
                    (f"{f}mixer.", f"{dst}mlp.", SharedExpert(m.n_shared_experts > 0, m.shared_expert_gate))]
        return out

    def import_config(self, hf):
        where = "Qwen2MoeForCausalLM"
        need(not hf.get("use_sliding_window", False), f"{where}: use_sliding_window=true has no equivalent here")
        n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
        dense = set(hf.get("mlp_only_layers") or [])
        E, h = hf["num_experts"], hf["moe_intermediate_size"]
        kinds = ["*E" if i not in dense and E > 0 and (i + 1) % step == 0 else "*-" for i in range(n)]
        shared = hf.get("shared_expert_intermediate_size", 0)
        need(shared % h == 0, f"{where}: shared_expert_intermediate_size={shared} is not a multiple of "
                              f"moe_intermediate_size={h} (shared experts here are n x expert width)")
        moe = MoEConfig(n_experts=E, top_k=hf["num_experts_per_tok"], ffn_hidden=h, score_fn="softmax",
                        renormalize=bool(hf.get("norm_topk_prob", False)), n_shared_experts=shared // h,
                        shared_expert_gate=shared > 0,
                        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
        pattern = "".join(kinds)
        same = len(set(kinds)) == 1
        return ModelConfig(pattern=kinds[0] if same else pattern, n_layers=n if same else 1,
                           ffn_hidden=hf["intermediate_size"], qkv_bias=bool(hf.get("qkv_bias", True)), moe=moe,
                           **attention_from_config(hf, where))


@dataclass(frozen=True)
class SharedExpert(Piece):
    """Qwen2-MoE's shared expert and its sigmoid gate. An ungated one exports with a zero gate
    (sigmoid = 1/2) and a doubled down projection; no shared expert, as a zero-width one
    (it contributes exactly zero). Imports are always gated."""

    present: bool
    gated: bool

    def to_hf(self, sd, ours, theirs):
        ref = sd[f"{ours}router.weight"]
        d = ref.shape[1]
        if not self.present:
            return {f"{theirs}shared_expert.gate_proj.weight": ref.new_zeros(0, d),
                    f"{theirs}shared_expert.up_proj.weight": ref.new_zeros(0, d),
                    f"{theirs}shared_expert.down_proj.weight": ref.new_zeros(d, 0),
                    f"{theirs}shared_expert_gate.weight": ref.new_zeros(1, d)}
        out = mlp().to_hf(sd, f"{ours}shared_expert.", f"{theirs}shared_expert.")
        if self.gated:
            out[f"{theirs}shared_expert_gate.weight"] = sd[f"{ours}shared_gate.weight"]
        else:
            out[f"{theirs}shared_expert_gate.weight"] = torch.zeros(1, d, dtype=ref.dtype)
            key = f"{theirs}shared_expert.down_proj.weight"
            out[key] = out[key] * 2
        return out

    def from_hf(self, t, theirs, ours, where):
        if not self.present:
            return {}
        out = mlp().from_hf(t, f"{theirs}shared_expert.", f"{ours}shared_expert.", where)
        out[f"{ours}shared_gate.weight"] = take(t, f"{theirs}shared_expert_gate.weight", where)
        return out
