"""MLA (+ MoE) stacks <-> ``DeepseekV3ForCausalLM``, the MTP modules in DeepSeek-V3's layout.

The HF class: ``first_k_dense_replace`` attention + dense-MLP layers, then attention + MoE
layers only (``moe_layer_freq`` is not read); MLA attention; a router with sigmoid scores,
``e_score_correction_bias`` (our ``expert_bias``, aux-loss-free balancing) for the choice
only, group-limited top-k (``n_group``/``topk_group``, groups ranked by their two best biased
scores), optional renormalisation (``norm_topk_prob``), then ``routed_scaling_factor``; always
ungated shared experts of ``n_shared_experts x moe_intermediate_size`` (none: zero width).
One difference: outside the chosen groups transformers masks biased scores to 0 where we
(and DeepSeek's reference code) use -inf, so the choices differ for tokens whose k-th best
biased score inside the chosen groups is negative; with non-negative biases never (sigmoid
scores are positive; export notes negative biases).

Weights: DeepSeek stores each head's rope rows (of q and of ``kv_a_proj_with_mqa``'s rope
key) interleaved, pairs ``(2i, 2i+1)``, and transformers de-interleaves them at run time
(``rope_interleave: true``, the default); ours are rotate-half, so export permutes those rows
once and import permutes them back (import also takes ``rope_interleave: false`` unpermuted).

MTP (``model.mtp_depth: D``): as DeepSeek-V3's checkpoints, module k is stored as decoder
layer ``num_hidden_layers + k - 1`` with ``enorm``, ``hnorm``, ``eh_proj``, the block's
attention and MLP, ``shared_head.norm`` and copies of the embedding (``embed_tokens``) and LM
head (``shared_head.head``); ``num_nextn_predict_layers: D`` in config.json. transformers
ignores those layers on load; ``pretrain import-hf`` reads them back. The block's MLP kind
follows DeepSeek's rule for that layer index (MoE from ``first_k_dense_replace`` on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.config import MLAConfig, MoEConfig, ModelConfig
from models.rope_scaling import rope_scaling_from_hf, rope_scaling_to_hf
from pretrain.errors import UserError
from pretrain.hf.arch_io import base_issues, blocks, need, rope_issues, take
from pretrain.hf.pieces import ROUTER, Experts, MappedArch, Piece, Rename, mlp, norm

WHERE = "DeepseekV3ForCausalLM"
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
# DeepSeek-V3's training-only balancing values, for imported models (config.json has none)
BIAS_UPDATE_RATE, SEQ_AUX_COEF = 1e-3, 1e-4


def deinterleave(d: int) -> torch.Tensor:
    """Our rotate-half rope row i is DeepSeek's interleaved row ``deinterleave(d)[i]``."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


@dataclass(frozen=True)
class MLA(Piece):
    """Our MLA mixer <-> ``DeepseekV3Attention``; rope rows permuted when ``interleave``."""

    heads: int
    nope: int
    rope: int
    kv_lora: int
    q_lora: bool
    interleave: bool = True

    def _pairs(self):
        q = (("wq_a.weight", "q_a_proj.weight"), ("q_norm.weight", "q_a_layernorm.weight"),
             ("wq_b.weight", "q_b_proj.weight")) if self.q_lora else (("wq.weight", "q_proj.weight"),)
        return q + (("wkv_a.weight", "kv_a_proj_with_mqa.weight"), ("kv_norm.weight", "kv_a_layernorm.weight"),
                    ("wkv_b.weight", "kv_b_proj.weight"), ("wo.weight", "o_proj.weight"))

    def _rows(self) -> dict[str, torch.Tensor]:
        """Our row ``i`` of each permuted weight is the HF row ``rows[name][i]``."""
        perm = deinterleave(self.rope) if self.interleave else torch.arange(self.rope)
        per_head = torch.cat([torch.arange(self.nope), self.nope + perm])
        q = torch.cat([h * (self.nope + self.rope) + per_head for h in range(self.heads)])
        kv_a = torch.cat([torch.arange(self.kv_lora), self.kv_lora + perm])
        return {"wq.weight": q, "wq_b.weight": q, "wkv_a.weight": kv_a}

    def to_hf(self, sd, ours, theirs):
        rows, out = self._rows(), {}
        for o, h in self._pairs():
            w = sd[ours + o]
            if o in rows:  # HF row rows[i] = our row i (a gather: live export passes meta tensors)
                w = w.index_select(0, torch.argsort(rows[o]).to(w.device))
            out[theirs + h] = w
        return out

    def from_hf(self, t, theirs, ours, where):
        rows = self._rows()
        for b in ("q_a_proj.bias", "kv_a_proj_with_mqa.bias", "o_proj.bias"):
            need(theirs + b not in t, f"{where}: {theirs}{b} (attention_bias=true) has no equivalent here")
        return {ours + o: take(t, theirs + h, where)[rows[o]] if o in rows else take(t, theirs + h, where)
                for o, h in self._pairs()}


@dataclass(frozen=True)
class SharedExperts(Piece):
    """Our ungated shared experts <-> ``shared_experts``; none exports as zero width."""

    present: bool

    def to_hf(self, sd, ours, theirs):
        if self.present:
            return mlp().to_hf(sd, f"{ours}shared_expert.", f"{theirs}shared_experts.")
        d = sd[f"{ours}router.weight"].shape[1]
        z = sd[f"{ours}router.weight"].new_zeros
        return {f"{theirs}shared_experts.gate_proj.weight": z(0, d), f"{theirs}shared_experts.up_proj.weight": z(0, d),
                f"{theirs}shared_experts.down_proj.weight": z(d, 0)}

    def from_hf(self, t, theirs, ours, where):
        if not self.present:
            return {}
        return mlp().from_hf(t, f"{theirs}shared_experts.", f"{ours}shared_expert.", where)


EXPERT_BIAS = Rename((("expert_bias", "e_score_correction_bias"),))


@dataclass(frozen=True)
class MTPShared(Piece):
    """The MTP layer's copies of the embedding and LM head (one tensor each here): exported
    as copies, checked equal on import."""

    tied: bool

    def to_hf(self, sd, ours, theirs):
        head = sd["tok_embeddings.weight"] if self.tied else sd["output.weight"]
        return {f"{theirs}embed_tokens.weight": sd["tok_embeddings.weight"], f"{theirs}shared_head.head.weight": head}

    def from_hf(self, t, theirs, ours, where):
        embed = take(t, "model.embed_tokens.weight", where)
        for mine, main in (("embed_tokens.weight", embed),
                           ("shared_head.head.weight", embed if self.tied else t.get("lm_head.weight"))):
            w = take(t, theirs + mine, where)
            need(main is not None and w.shape == main.shape and torch.equal(w, main),
                 f"{where}: {theirs}{mine} differs from the main model's (the MTP modules here share the "
                 "embedding and LM head)")
        return {}


def mla_mscale(factor: float, m: float) -> float:
    return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0


def first_dense(mc: ModelConfig) -> int | None:
    """Leading ``*-`` layers before the ``*E`` ones (None if dense layers follow MoE ones)."""
    b = blocks(mc)
    k = next((i for i, blk in enumerate(b) if blk == "*E"), len(b))
    return k if all(blk == "*E" for blk in b[k:]) else None


def dense_replace(mc: ModelConfig) -> int:
    """``first_k_dense_replace``: the leading dense layers; an all-dense model also counts its
    dense MTP layers (so DeepSeek's rule gives them the dense MLP)."""
    k = first_dense(mc)
    if k == len(blocks(mc)) and mc.mtp_depth and mc.mtp_pattern == "*-":
        k += mc.mtp_depth
    return k


class DeepseekV3(MappedArch):
    hf_class = WHERE
    model_types = ("deepseek_v3",)

    def __init__(self, interleave: bool = True):
        self.interleave = interleave

    def issues(self, mc, sd):
        b = blocks(mc)
        if mc.attention != "mla" or b is None or not set(b) <= {"*-", "*E"}:
            return None
        out = base_issues(mc)
        if first_dense(mc) is None:
            out.append("dense layers after MoE layers (DeepseekV3 has first_k_dense_replace dense layers, "
                       "then MoE layers only)")
        m = mc.moe
        if "*E" in b or (mc.mtp_depth and mc.mtp_pattern == "*E"):
            if m.score_fn != "sigmoid":
                out.append(f"model.moe.score_fn={m.score_fn} (DeepseekV3 routes with sigmoid scores)")
            if m.router_bias:
                out.append("model.moe.router_bias=true (router bias)")
            if m.capacity_factor > 0:
                out.append(f"model.moe.capacity_factor={m.capacity_factor} (token dropping)")
            if m.shared_expert_gate:
                out.append("model.moe.shared_expert_gate=true (gated shared experts)")
            if m.n_experts // m.n_groups < 2:
                out.append("model.moe.n_groups: groups of one expert (DeepseekV3 ranks groups by their two best)")
        # an MTP layer is one decoder layer, MoE after MoE layers (DeepSeek's rule by layer index)
        want = ("*-", "*E") if first_dense(mc) == len(b) else ("*E",)
        if mc.mtp_depth and mc.mtp_pattern not in want:
            out.append(f"model.mtp_pattern='{mc.mtp_pattern}' (DeepSeek-V3's MTP layer is one decoder layer: "
                       f"{' or '.join(repr(w) for w in want)} here)")
        return out

    def export_config(self, mc):
        from models.moe import expert_width

        m, a = mc.moe, mc.mla
        b = blocks(mc)
        return {"model_type": "deepseek_v3", "vocab_size": mc.vocab_size, "hidden_size": mc.d_model,
                "intermediate_size": mc.ffn_hidden_resolved, "moe_intermediate_size": expert_width(mc),
                "num_hidden_layers": len(b), "num_attention_heads": mc.n_heads,
                "num_key_value_heads": mc.n_heads, "n_shared_experts": m.n_shared_experts,
                "n_routed_experts": m.n_experts, "routed_scaling_factor": m.routed_scaling_factor,
                "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank or None,
                "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
                "qk_nope_head_dim": a.qk_nope_head_dim, "n_group": m.n_groups, "topk_group": m.topk_groups,
                "num_experts_per_tok": m.top_k, "first_k_dense_replace": dense_replace(mc), "moe_layer_freq": 1,
                "norm_topk_prob": m.renormalize, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                "hidden_act": "silu", "max_position_embeddings": mc.max_seq_len, "initializer_range": mc.init_std,
                "rms_norm_eps": mc.norm_eps, "tie_word_embeddings": mc.tie_embeddings, "rope_theta": mc.rope_theta,
                "rope_scaling": self._rope_scaling(mc), "rope_interleave": True, "attention_bias": False,
                "attention_dropout": 0.0, "num_nextn_predict_layers": mc.mtp_depth}

    @staticmethod
    def _rope_scaling(mc: ModelConfig) -> dict | None:
        """HF ``rope_scaling``; under yarn with ``mla.mscale_all_dim`` also DeepSeek's ``mscale``
        and ``mscale_all_dim`` (the softmax scale, and cos/sin x mscale/mscale_all_dim's ratio)."""
        out = rope_scaling_to_hf(mc.rope_scaling)
        sc, m = mc.rope_scaling, mc.mla.mscale_all_dim
        if out is None or sc.type != "yarn" or not m:
            return out
        out["mscale_all_dim"] = float(m)
        if sc.attention_factor == 1.0:  # DeepSeek-V3's own form: mscale == mscale_all_dim
            out.pop("attention_factor", None)
            out["mscale"] = float(m)
        return out

    def pieces(self, mc):
        out = []
        for i, blk in enumerate(blocks(mc)):
            out += self._layer(mc, f"layers.{2 * i}.", f"layers.{2 * i + 1}.", f"model.layers.{i}.", blk[1])
        n = len(blocks(mc))
        for k in range(mc.mtp_depth):
            src, dst = f"mtp.{k}.", f"model.layers.{n + k}."
            out += [(src, dst, Rename((("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"),
                                       ("proj.weight", "eh_proj.weight"), ("norm.weight", "shared_head.norm.weight")))),
                    (src, dst, MTPShared(mc.tie_embeddings))]
            out += self._layer(mc, f"{src}layers.0.", f"{src}layers.1.", dst, mc.mtp_pattern[1])
        return out

    def _layer(self, mc, a: str, f: str, dst: str, ffn: str) -> list[tuple[str, str, Piece]]:
        m, x = mc.mla, mc.moe
        attn = MLA(mc.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.q_lora_rank > 0,
                   self.interleave)
        out = [(a, dst, norm("input_layernorm")), (f"{a}mixer.", f"{dst}self_attn.", attn),
               (f, dst, norm("post_attention_layernorm"))]
        if ffn == "-":
            return out + [(f"{f}mixer.", f"{dst}mlp.", mlp())]
        return out + [(f"{f}mixer.", f"{dst}mlp.gate.", ROUTER), (f"{f}mixer.", f"{dst}mlp.gate.", EXPERT_BIAS),
                      (f"{f}mixer.", f"{dst}mlp.experts.", Experts(x.n_experts, EXPERT_NAMES)),
                      (f"{f}mixer.", f"{dst}mlp.", SharedExperts(x.n_shared_experts > 0))]

    def import_weights(self, hf, mc, t):
        interleave = bool(hf.get("rope_interleave", True))
        if interleave != self.interleave:
            return DeepseekV3(interleave).import_weights(hf, mc, t)
        n, depth = hf["num_hidden_layers"], mc.mtp_depth
        if depth and f"model.layers.{n}.eh_proj.weight" not in t:
            raise UserError(f"{WHERE}: weight model.layers.{n}.eh_proj.weight (the MTP module) is missing; "
                            f"config.json has num_nextn_predict_layers={depth} (set it to 0 to import without MTP)")
        return super().import_weights(hf, mc, t)

    def import_config(self, hf):
        need(not hf.get("quantization_config"),
             f"{WHERE}: quantization_config (e.g. DeepSeek's fp8 weights) has no equivalent here; "
             "dequantize to bf16 first")
        need(not hf.get("attention_bias", False), f"{WHERE}: attention_bias=true has no equivalent here")
        need(hf.get("moe_layer_freq", 1) == 1,
             f"{WHERE}: moe_layer_freq={hf.get('moe_layer_freq')} (transformers' class ignores it)")
        need(hf.get("scoring_func", "sigmoid") == "sigmoid",
             f"{WHERE}: scoring_func={hf.get('scoring_func')!r} (transformers' class routes with sigmoid)")
        need(hf.get("hidden_act", "silu") in ("silu", "swish"), f"{WHERE}: hidden_act {hf.get('hidden_act')!r} "
                                                                 "(only SwiGLU/silu MLPs exist here)")
        rope_issues({k: v for k, v in hf.items() if k != "rope_scaling"}, WHERE)
        scaling, mscale_all_dim = self._import_rope(hf.get("rope_scaling"))
        n, k = hf["num_hidden_layers"], min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"])
        depth = int(hf.get("num_nextn_predict_layers") or 0)
        mtp_moe = [n + i >= hf.get("first_k_dense_replace", 0) for i in range(depth)]
        need(len(set(mtp_moe)) <= 1, f"{WHERE}: first_k_dense_replace={hf.get('first_k_dense_replace')} splits "
                                     "the MTP layers into dense and MoE ones (one block kind here)")
        moe = MoEConfig(n_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                        ffn_hidden=hf["moe_intermediate_size"], score_fn="sigmoid",
                        renormalize=bool(hf.get("norm_topk_prob", True)),
                        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                        n_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1,
                        n_shared_experts=hf.get("n_shared_experts") or 0, bias_update_rate=BIAS_UPDATE_RATE,
                        aux_loss_coef=SEQ_AUX_COEF, z_loss_coef=0.0)
        mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                        v_head_dim=hf["v_head_dim"], mscale_all_dim=mscale_all_dim)
        pattern, n_layers = ("*-" * k + "*E" * (n - k), 1) if 0 < k < n else ("*-" if k else "*E", n)
        return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
                           pattern=pattern, n_heads=hf["num_attention_heads"], ffn_hidden=hf["intermediate_size"],
                           max_seq_len=hf.get("max_position_embeddings", 4096),
                           rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=scaling,
                           norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           init_std=float(hf.get("initializer_range", 0.02)), attention="mla", mla=mla, moe=moe,
                           mtp_depth=depth, mtp_pattern="*E" if any(mtp_moe) else "*-")

    @staticmethod
    def _import_rope(d: dict | None):
        """(our rope scaling, mla.mscale_all_dim) from DeepSeek's ``rope_scaling`` (with mscale)."""
        d = dict(d or {})
        m, m_all = d.pop("mscale", None), d.pop("mscale_all_dim", None)
        kind = d.get("rope_type") or d.get("type")
        try:
            sc = rope_scaling_from_hf(d)
        except UserError as e:
            raise UserError(f"{WHERE}: {e}") from None
        if kind != "yarn":
            # transformers' attention applies mscale_all_dim under any scaling type; ours under yarn
            need(not m_all or float(d.get("factor", 1.0)) <= 1,
                 f"{WHERE}: rope_scaling mscale_all_dim with type {kind!r} has no equivalent here (yarn only)")
            return sc, 0.0
        if not d.get("attention_factor") and m and m_all:  # transformers' rule for the cos/sin factor
            sc.attention_factor = mla_mscale(sc.factor, m) / mla_mscale(sc.factor, m_all)
        return sc, float(m_all or 0.0)
