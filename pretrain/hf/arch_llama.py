"""Dense ``*-`` stacks <-> ``LlamaForCausalLM``.

Conventions checked against transformers' modeling_llama: RoPE in the rotate-half layout
(as ``kernels.reference.apply_rotary``), so q/k weights map without permutation; KV head
``j`` serves query heads ``j*g .. j*g+g-1`` in both (``repeat_interleave`` here,
``repeat_kv`` there); ``attention_bias`` adds biases to q/k/v *and* o_proj, so our q/k/v
biases export with a zero o_proj bias.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.rope_scaling import rope_scaling_from_hf, rope_scaling_to_hf
from pretrain.errors import UserError
from pretrain.hf.arch_io import base_issues, blocks, need, rope_issues
from pretrain.hf.pieces import Attention, MappedArch, mlp, norm


# ---- config fields shared by every decoder-style mapping ---------------------------------

def attention_config(mc: ModelConfig) -> dict:
    """The HF attention/RoPE/norm fields shared by Llama-family configs."""
    return {
        "vocab_size": mc.vocab_size, "hidden_size": mc.d_model,
        "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.n_kv_heads_resolved, "head_dim": mc.head_dim_resolved,
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
    except UserError as e:
        raise UserError(f"{arch}: {e}") from None
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_heads=nh,
                n_kv_heads=hf.get("num_key_value_heads") or nh,
                head_dim=0 if hd * nh == d else hd,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


# ---- Llama -------------------------------------------------------------------------------

class Llama(MappedArch):
    hf_class = "LlamaForCausalLM"
    model_types = ("llama",)

    def issues(self, mc, sd):
        if blocks(mc) is None or set(blocks(mc)) != {"*-"}:
            return None
        return base_issues(mc)

    def export_config(self, mc):
        return {"model_type": "llama", **attention_config(mc), "intermediate_size": mc.ffn_hidden_resolved,
                "num_hidden_layers": len(blocks(mc)), "attention_bias": mc.qkv_bias, "mlp_bias": False}

    def pieces(self, mc):
        out = []
        for i in range(len(blocks(mc))):
            a, m, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            out += [(a, dst, norm("input_layernorm")),
                    (f"{a}mixer.", f"{dst}self_attn.", Attention(mc.qkv_bias, o_bias=mc.qkv_bias)),
                    (m, dst, norm("post_attention_layernorm")), (f"{m}mixer.", f"{dst}mlp.", mlp())]
        return out

    def import_config(self, hf):
        need(not hf.get("mlp_bias", False), "LlamaForCausalLM: mlp_bias=true has no equivalent here")
        return ModelConfig(pattern="*-", n_layers=hf["num_hidden_layers"], ffn_hidden=hf["intermediate_size"],
                           qkv_bias=bool(hf.get("attention_bias", False)),
                           **attention_from_config(hf, "LlamaForCausalLM"))
