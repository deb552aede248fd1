"""Dense ``*-`` stacks <-> ``LlamaForCausalLM``.

Conventions checked against transformers' modeling_llama: RoPE in the rotate-half layout
(as ``kernels.reference.apply_rotary``), so q/k weights map without permutation; KV head
``j`` serves query heads ``j*g .. j*g+g-1`` in both (``repeat_interleave`` here,
``repeat_kv`` there); ``attention_bias`` adds biases to q/k/v *and* o_proj, so our q/k/v
biases export with a zero o_proj bias.
"""

from __future__ import annotations

import torch

from models.config import ConfigError, ModelConfig
from models.rope_scaling import rope_scaling_from_hf, rope_scaling_to_hf
from pretrain.errors import UserError
from pretrain.hf.common import Arch, base_issues, blocks, need, rope_issues, take


# ---- pieces shared by every decoder-style mapping ---------------------------------------

def attn_to_hf(sd: dict, src: str, dst: str, qkv_bias: bool, o_bias: bool = False) -> dict:
    """Our ``wq/wk/wv/wo`` under ``src`` -> HF ``q_proj/k_proj/v_proj/o_proj`` under ``dst``."""
    out = {}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"]
        if qkv_bias and ours != "wo":
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
    if o_bias:
        w = sd[f"{src}wo.weight"]
        out[f"{dst}o_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def attn_from_hf(t: dict, src: str, dst: str, qkv_bias: bool, where: str) -> dict:
    out = {}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        out[f"{dst}{ours}.weight"] = take(t, f"{src}{theirs}.weight", where)
        if qkv_bias and ours != "wo":
            out[f"{dst}{ours}.bias"] = take(t, f"{src}{theirs}.bias", where)
    ob = t.get(f"{src}o_proj.bias")
    need(ob is None or not ob.any(), f"{where}: {src}o_proj.bias is non-zero; the attention output "
                                     "projection here has no bias")
    return out


def mlp_to_hf(sd: dict, src: str, dst: str, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    return {f"{dst}{h}.weight": sd[f"{src}{o}.weight"] for o, h in zip(("w_gate", "w_up", "w_down"), names)}


def mlp_from_hf(t: dict, src: str, dst: str, where: str, names=("gate_proj", "up_proj", "down_proj")) -> dict:
    return {f"{dst}{o}.weight": take(t, f"{src}{h}.weight", where)
            for o, h in zip(("w_gate", "w_up", "w_down"), names)}


def attention_config(mc: ModelConfig) -> dict:
    """The HF attention/RoPE/norm fields shared by Llama-family configs."""
    return {
        "vocab_size": mc.vocab_size, "hidden_size": mc.d_model,
        "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.kv_heads, "head_dim": mc.dim_head,
        "max_position_embeddings": mc.max_seq_len, "rope_theta": mc.rope_theta, "rope_scaling": rope_scaling_to_hf(mc.rope_scaling),
        "rms_norm_eps": mc.norm_eps, "tie_word_embeddings": mc.tie_embeddings, "hidden_act": "silu",
        "attention_dropout": 0.0,
    }


def attention_from_config(hf: dict, arch: str) -> dict:
    """ModelConfig keyword arguments from the HF attention/RoPE/norm fields."""
    rope_issues(hf, arch)
    need(hf.get("hidden_act", "silu") in ("silu", "swish"),
         f"{arch}: hidden_act {hf.get('hidden_act')!r} (only SwiGLU/silu MLPs exist here)")
    d, nh = hf["hidden_size"], hf["num_attention_heads"]
    hd = hf.get("head_dim") or d // nh
    try:
        scaling = rope_scaling_from_hf(hf.get("rope_scaling"))
    except ConfigError as e:
        raise UserError(f"{arch}: {e}") from None
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_heads=nh,
                n_kv_heads=hf.get("num_key_value_heads") or nh,
                head_dim=0 if hd * nh == d else hd,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def ends_to_hf(mc: ModelConfig, sd: dict, embed: str, final_norm: str) -> dict:
    out = {embed: sd["tok_embeddings.weight"], final_norm: sd["norm.weight"]}
    if not mc.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return out


def ends_from_hf(mc: ModelConfig, t: dict, embed: str, final_norm: str, where: str) -> dict:
    out = {"tok_embeddings.weight": take(t, embed, where), "norm.weight": take(t, final_norm, where)}
    out["output.weight"] = out["tok_embeddings.weight"] if mc.tie_embeddings else take(t, "lm_head.weight", where)
    return out


# ---- Llama -------------------------------------------------------------------------------

class Llama(Arch):
    hf_class = "LlamaForCausalLM"
    model_types = ("llama",)

    def issues(self, mc, sd):
        if blocks(mc) is None or set(blocks(mc)) != {"*-"}:
            return None
        return base_issues(mc)

    def export_config(self, mc):
        return {"model_type": "llama", **attention_config(mc), "intermediate_size": mc.ffn_dim,
                "num_hidden_layers": len(blocks(mc)), "attention_bias": mc.qkv_bias, "mlp_bias": False}

    def export_weights(self, mc, sd):
        out = ends_to_hf(mc, sd, "model.embed_tokens.weight", "model.norm.weight")
        for i in range(len(blocks(mc))):
            a, m, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out[f"{dst}input_layernorm.weight"] = sd[f"{a}norm.weight"]
            out.update(attn_to_hf(sd, f"{a}mixer.", f"{dst}self_attn.", mc.qkv_bias, o_bias=mc.qkv_bias))
            out[f"{dst}post_attention_layernorm.weight"] = sd[f"{m}norm.weight"]
            out.update(mlp_to_hf(sd, f"{m}mixer.", f"{dst}mlp."))
        return out

    def import_config(self, hf):
        need(not hf.get("mlp_bias", False), "LlamaForCausalLM: mlp_bias=true has no equivalent here")
        return ModelConfig(pattern="*-", n_layers=hf["num_hidden_layers"], ffn_hidden=hf["intermediate_size"],
                           qkv_bias=bool(hf.get("attention_bias", False)),
                           **attention_from_config(hf, "LlamaForCausalLM"))

    def import_weights(self, hf, mc, t):
        where = "LlamaForCausalLM"
        out = ends_from_hf(mc, t, "model.embed_tokens.weight", "model.norm.weight", where)
        for i in range(mc.n_layers):
            a, m, src = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out[f"{a}norm.weight"] = take(t, f"{src}input_layernorm.weight", where)
            out.update(attn_from_hf(t, f"{src}self_attn.", f"{a}mixer.", mc.qkv_bias, where))
            out[f"{m}norm.weight"] = take(t, f"{src}post_attention_layernorm.weight", where)
            out.update(mlp_from_hf(t, f"{src}mlp.", f"{m}mixer.", where))
        return out
