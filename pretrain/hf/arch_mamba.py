"""Mamba-2 stacks <-> ``Mamba2ForCausalLM`` (pattern ``M``) and ``BambaForCausalLM``
(layers of one Mamba-2 or attention mixer followed by an MLP: ``M-`` / ``*-``).

transformers fuses the mixer's projections into ``in_proj`` ordered [z, x, B, C, dt] and
its convolutions into one ``conv1d`` over [x, B, C]; ``models.mamba2.to_hf_mamba2`` /
``from_hf_mamba2`` do that concatenation. Both HF classes normalise the gated output over
all of d_inner at once (no groups), so only ``mamba.n_groups == 1`` maps exactly. Bamba fixes
``time_step_limit`` to (0, inf), has no attention bias, and rotates half of each head by
default (``partial_rotary_factor`` 0.5); we export full rotation (factor 1.0).
"""

from __future__ import annotations

from models.config import MambaConfig, ModelConfig
from pretrain.hf.arch_llama import attention_config, attention_from_config
from pretrain.hf.arch_io import base_issues, blocks, need, stack
from pretrain.hf.pieces import Attention, MambaMixer, MappedArch, mlp, norm


def mamba_issues(mc: ModelConfig, fixed_dt_limit: bool = False) -> list[str]:
    mm, out = mc.mamba, []
    if mm.n_groups != 1:
        out.append(f"model.mamba.n_groups={mm.n_groups} (grouped gated norm; transformers normalises "
                   "d_inner as one group)")
    if fixed_dt_limit and tuple(mm.dt_limit) != (0.0, float("inf")):
        out.append(f"model.mamba.dt_limit={tuple(mm.dt_limit)}")
    return out


def mamba_from_config(hf: dict, prefix: str, where: str) -> MambaConfig:
    g = lambda k, default=None: hf.get(prefix + k, default)  # noqa: E731
    lim = hf.get("time_step_limit", (0.0, float("inf"))) if prefix == "" else (0.0, float("inf"))
    return MambaConfig(d_state=g("state_size" if not prefix else "d_state"),
                       head_dim=g("head_dim" if not prefix else "d_head"),
                       n_groups=g("n_groups", 1), d_conv=g("conv_kernel" if not prefix else "d_conv", 4),
                       expand=g("expand", 2), chunk_size=g("chunk_size", 256),
                       conv_bias=bool(g("use_conv_bias" if not prefix else "conv_bias", True)),
                       dt_limit=(float(lim[0]), float(lim[1])))


class Mamba2(MappedArch):
    hf_class = "Mamba2ForCausalLM"
    ends = ("backbone.embeddings.weight", "backbone.norm_f.weight")
    model_types = ("mamba2",)

    def issues(self, mc, sd):
        if set(stack(mc)) != {"M"}:
            return None
        return base_issues(mc, attention=False) + mamba_issues(mc)

    def export_config(self, mc):
        mm = mc.mamba
        return {"model_type": "mamba2", "vocab_size": mc.vocab_size, "hidden_size": mc.d_model,
                "num_hidden_layers": mc.n_sublayers, "num_heads": mm.expand * mc.d_model // mm.head_dim,
                "head_dim": mm.head_dim, "state_size": mm.d_state, "expand": mm.expand, "n_groups": mm.n_groups,
                "conv_kernel": mm.d_conv, "use_conv_bias": mm.conv_bias, "use_bias": False,
                "chunk_size": mm.chunk_size, "time_step_limit": list(mm.dt_limit), "rms_norm": True,
                "residual_in_fp32": True, "layer_norm_epsilon": mc.norm_eps,
                "tie_word_embeddings": mc.tie_embeddings, "hidden_act": "silu",
                "time_step_min": mm.dt_min, "time_step_max": mm.dt_max, "time_step_floor": mm.dt_init_floor}

    def pieces(self, mc):
        return [piece for i in range(mc.n_sublayers)
                for piece in ((f"layers.{i}.", f"backbone.layers.{i}.", norm("norm")),
                              (f"layers.{i}.mixer.", f"backbone.layers.{i}.mixer.", MambaMixer()))]

    def import_config(self, hf):
        where = "Mamba2ForCausalLM"
        need(hf.get("rms_norm", True), f"{where}: rms_norm=false (ungated output) has no equivalent here")
        need(not hf.get("use_bias", False), f"{where}: use_bias=true (projection biases) has no equivalent here")
        need(hf.get("hidden_act", "silu") in ("silu", "swish"), f"{where}: hidden_act {hf.get('hidden_act')!r}")
        mm = mamba_from_config(hf, "", where)
        need(mm.expand * hf["hidden_size"] == hf["num_heads"] * mm.head_dim,
             f"{where}: expand*hidden_size != num_heads*head_dim")
        d, eps = hf["hidden_size"], float(hf.get("layer_norm_epsilon", 1e-5))
        return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], pattern="M",
                           n_heads=1, norm_eps=eps, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           mamba=mm)


class Bamba(MappedArch):
    hf_class = "BambaForCausalLM"
    ends = ("model.embed_tokens.weight", "model.final_layernorm.weight")
    model_types = ("bamba",)

    def issues(self, mc, sd):
        b = blocks(mc)
        if b is None or not set(b) <= {"M-", "*-"} or "M-" not in b:
            return None
        out = base_issues(mc, attention="*-" in b) + mamba_issues(mc, fixed_dt_limit=True)
        if mc.qkv_bias:
            out.append("model.qkv_bias=true (Bamba attention has no bias)")
        return out

    def export_config(self, mc):
        mm, b = mc.mamba, blocks(mc)
        return {"model_type": "bamba", **attention_config(mc), "intermediate_size": mc.ffn_hidden_resolved,
                "num_hidden_layers": len(b), "attn_layer_indices": [i for i, x in enumerate(b) if x == "*-"],
                "mamba_n_heads": mm.expand * mc.d_model // mm.head_dim, "mamba_d_head": mm.head_dim,
                "mamba_n_groups": mm.n_groups, "mamba_d_state": mm.d_state, "mamba_d_conv": mm.d_conv,
                "mamba_expand": mm.expand, "mamba_chunk_size": mm.chunk_size, "mamba_conv_bias": mm.conv_bias,
                "mamba_proj_bias": False, "partial_rotary_factor": 1.0}

    def pieces(self, mc):
        out = []
        for i, blk in enumerate(blocks(mc)):
            a, f, dst = f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}."
            mixer = (f"{a}mixer.", f"{dst}mamba.", MambaMixer()) if blk == "M-" else \
                (f"{a}mixer.", f"{dst}self_attn.", Attention())
            out += [(a, dst, norm("input_layernorm")), mixer,
                    (f, dst, norm("pre_ff_layernorm")), (f"{f}mixer.", f"{dst}feed_forward.", mlp())]
        return out

    def import_config(self, hf):
        where = "BambaForCausalLM"
        need(float(hf.get("partial_rotary_factor", 0.5)) == 1.0,
             f"{where}: partial_rotary_factor={hf.get('partial_rotary_factor', 0.5)} (RoPE on part of each "
             "head) has no equivalent here")
        need(not hf.get("mamba_proj_bias", False), f"{where}: mamba_proj_bias=true has no equivalent here")
        n = hf["num_hidden_layers"]
        attn = set(hf.get("attn_layer_indices") or [])
        kinds = ["*-" if i in attn else "M-" for i in range(n)]
        same = len(set(kinds)) == 1
        mm = mamba_from_config(hf, "mamba_", where)
        d_head = hf.get("mamba_d_head", "auto")
        mm.head_dim = mm.expand * hf["hidden_size"] // hf["mamba_n_heads"] if d_head == "auto" else d_head
        return ModelConfig(pattern=kinds[0] if same else "".join(kinds), n_layers=n if same else 1,
                           ffn_hidden=hf["intermediate_size"], mamba=mm, **attention_from_config(hf, where))
