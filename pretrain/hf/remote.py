"""Remote-code export: any model this project builds, as ``PretrainLMForCausalLM``.

The modeling file ``modeling_pretrain_lm.py`` (torch + transformers only) is copied next
to the weights and named in config.json's ``auto_map``; parameter names stay ours, and the
full ``ModelConfig`` travels in the config so ``pretrain import-hf`` can read it back.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from models.config import ModelConfig
from pretrain.config import from_dict
from pretrain.errors import UserError
from pretrain.hf.arch_io import Arch

MODELING_FILE = Path(__file__).with_name("modeling_pretrain_lm.py")
MODULE = MODELING_FILE.stem


def architecture(mc: ModelConfig) -> dict:
    """The resolved architecture the remote code builds (derived sizes spelled out)."""
    kinds = mc.sublayer_kinds
    a = {"sublayers": kinds, "vocab_size": mc.vocab_size, "d_model": mc.d_model, "n_heads": mc.n_heads,
         "n_kv_heads": mc.n_kv_heads_resolved, "head_dim": mc.head_dim_resolved, "ffn_dim": mc.ffn_hidden_resolved,
         "position": mc.position, "rope_theta": mc.rope_theta, "norm_eps": mc.norm_eps, "norm": mc.norm,
         "residual": mc.residual, "ladder_from": mc.ladder_from, "qkv_bias": mc.qkv_bias}
    if mc.rope_scaling.type != "none":
        from models.rope_scaling import rope_scaling_to_hf

        a["rope_scaling"] = rope_scaling_to_hf(mc.rope_scaling)
        a["max_seq_len"] = mc.max_seq_len
    present = set(kinds)
    for kind, sections in REMOTE_SECTIONS.items():
        if kind in present:
            for key, section in sections:
                a[key] = section(mc)
    return a


def _moe_section(mc: ModelConfig) -> dict:
    from models.moe import expert_width

    m = mc.moe
    return {"n_experts": m.n_experts, "top_k": m.top_k, "ffn_dim": expert_width(mc),
            "score_fn": m.score_fn, "renormalize": m.renormalize, "n_groups": m.n_groups,
            "topk_groups": m.topk_groups, "n_shared_experts": m.n_shared_experts,
            "shared_expert_gate": m.shared_expert_gate, "router_bias": m.router_bias,
            "capacity_factor": m.capacity_factor, "drop_policy": m.drop_policy}


def _mamba_section(mc: ModelConfig) -> dict:
    mm = mc.mamba
    return {"d_state": mm.d_state, "head_dim": mm.head_dim, "n_groups": mm.n_groups,
            "d_conv": mm.d_conv, "n_heads": mm.expand * mc.d_model // mm.head_dim,
            "dt_limit": list(mm.dt_limit), "conv_bias": mm.conv_bias}


def _hybrid_section(mc: ModelConfig) -> dict:
    from models.hybrid import hybrid_kv_heads

    return {"n_attn_heads": mc.hybrid.n_attn_heads, "n_kv_heads": hybrid_kv_heads(mc),
            "n_mamba_heads": mc.hybrid.n_mamba_heads}


# kind -> the (key, builder) sections of ``architecture`` its mixer in the modeling file reads
# (a new kind adds its entry here and its mixer to ``modeling_pretrain_lm.MIXERS``)
REMOTE_SECTIONS: dict[str, tuple[tuple[str, Callable[[ModelConfig], dict]], ...]] = {
    "attention": (),
    "mlp": (),
    "moe": (("moe", _moe_section),),
    "mamba": (("mamba", _mamba_section),),
    "hybrid": (("mamba", _mamba_section), ("hybrid", _hybrid_section)),
}


class Remote(Arch):
    hf_class = "PretrainLMForCausalLM"
    model_types = ("pretrain_lm",)

    def issues(self, mc, sd):
        return []

    def export_config(self, mc):
        return {"model_type": "pretrain_lm",
                "auto_map": {"AutoConfig": f"{MODULE}.PretrainLMConfig",
                             "AutoModelForCausalLM": f"{MODULE}.PretrainLMForCausalLM"},
                "pretrain_model": architecture(mc),
                "pretrain_model_config": dataclasses.asdict(mc),
                "vocab_size": mc.vocab_size, "hidden_size": mc.d_model,
                "num_hidden_layers": mc.n_sublayers, "max_position_embeddings": mc.max_seq_len,
                "tie_word_embeddings": mc.tie_embeddings}

    def export_weights(self, mc, sd):
        return {k: v for k, v in sd.items() if not (mc.tie_embeddings and k == "output.weight")}

    def write_code(self, out: Path) -> None:
        shutil.copyfile(MODELING_FILE, out / MODELING_FILE.name)

    def import_config(self, hf):
        data = hf.get("pretrain_model_config")
        if not isinstance(data, dict):
            raise UserError("pretrain_lm config.json has no pretrain_model_config; re-export it")
        mc = from_dict(ModelConfig, data, "model")
        mc.validate()
        return mc

    def import_weights(self, hf, mc, t):
        out = dict(t)
        if mc.tie_embeddings:
            out["output.weight"] = out["tok_embeddings.weight"]
        return out

