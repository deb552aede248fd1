# Remote code written by `pretrain export` for models no standard transformers class
# represents (ladder/parallel residual, Peri-LN, no positional encoding, free sublayer
# patterns, sigmoid/shared-expert MoE, grouped Mamba-2 norms, ...).
#
# Self-contained: needs only torch and transformers. Load with
#   AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
# Parameter names are the training project's own, so the weights load unchanged.
#
# Limits (see README.md next to this file):
# - no KV/SSM cache: generate() re-runs the full forward for every new token;
# - attention is causal over the whole input; the document masking of packed training
#   sequences is not applied (identical logits on one document without EOS inside);
# - Mamba-2 uses the exact quadratic (attention-like) form of the SSD scan: memory grows
#   with the square of the sequence length;
# - an MoE with a capacity factor drops tokens per forward, as in training, so outputs
#   depend on the batch (batch size 1 reproduces the training code's inference).
"""Self-contained modeling file for `pretrain export` remote-code checkpoints."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PretrainLMConfig(PretrainedConfig):
    """``pretrain_model`` holds the resolved architecture (see ``architecture`` below)."""

    model_type = "pretrain_lm"

    def __init__(self, pretrain_model=None, vocab_size=32000, hidden_size=256, num_hidden_layers=1,
                 tie_word_embeddings=False, **kwargs):
        self.pretrain_model = dict(pretrain_model or {})
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ---- basic ops -----------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    """q, k [B, S, H, D]; cos/sin [B, S, D/2] (rotate-half layout, computed in fp32)."""
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(-2)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(-2)
    rot = lambda t: (t.float() * cos + rotate_half(t.float()) * sin).to(t.dtype)  # noqa: E731
    return rot(q), rot(k)


def attention(q, k, v, mask):
    """q [B, S, H, D], k/v [B, S, Hkv, D]; KV head j serves query heads j*g .. j*g+g-1."""
    H, Hkv = q.shape[2], k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


class Side:
    """Per-forward inputs shared by the sublayers."""

    def __init__(self, rope, mask, valid):
        self.rope, self.mask, self.valid = rope, mask, valid  # valid: [B, S] bool or None


# ---- mixers ----------------------------------------------------------------------------------

class QKV(nn.Module):
    def __init__(self, d, n_heads, n_kv, hd, bias):
        super().__init__()
        self.head_dim = hd
        self.wq = nn.Linear(d, n_heads * hd, bias=bias)
        self.wk = nn.Linear(d, n_kv * hd, bias=bias)
        self.wv = nn.Linear(d, n_kv * hd, bias=bias)

    def attend(self, x, side):
        B, S, _ = x.shape
        q, k, v = (p(x).view(B, S, -1, self.head_dim) for p in (self.wq, self.wk, self.wv))
        if side.rope is not None:
            q, k = apply_rotary(q, k, *side.rope)
        return attention(q, k, v, side.mask).reshape(B, S, -1)


class Attention(QKV):
    def __init__(self, a):
        super().__init__(a["d_model"], a["n_heads"], a["n_kv_heads"], a["head_dim"], a["qkv_bias"])
        self.wo = nn.Linear(a["n_heads"] * a["head_dim"], a["d_model"], bias=False)

    def forward(self, x, side):
        return self.wo(self.attend(x, side))


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x, side=None):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    def __init__(self, a):
        super().__init__()
        m, d = a["moe"], a["d_model"]
        E, h = m["n_experts"], m["ffn_dim"]
        self.m = m
        self.router = nn.Linear(d, E, bias=m["router_bias"])
        self.w_gate = nn.Parameter(torch.zeros(E, d, h))
        self.w_up = nn.Parameter(torch.zeros(E, d, h))
        self.w_down = nn.Parameter(torch.zeros(E, h, d))
        self.shared_expert = MLP(d, m["n_shared_experts"] * h) if m["n_shared_experts"] else None
        self.shared_gate = (nn.Linear(d, 1, bias=False)
                            if m["n_shared_experts"] and m["shared_expert_gate"] else None)
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)

    def route(self, xt):
        m = self.m
        b = self.router.bias.float() if self.router.bias is not None else None
        logits = F.linear(xt.float(), self.router.weight.float(), b)
        scores = logits.softmax(-1) if m["score_fn"] == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias.to(scores.dtype)
        G = m["n_groups"]
        if G > 1:  # keep the topk_groups groups whose two best scores sum highest
            T, E = choice.shape
            per = E // G
            top2 = choice.view(T, G, per).topk(min(2, per), dim=-1).values.sum(-1)
            keep = torch.zeros(T, G, dtype=torch.bool, device=xt.device)
            keep.scatter_(1, top2.topk(m["topk_groups"], dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
        idx = choice.topk(m["top_k"], dim=-1).indices
        prio = scores.gather(1, idx)
        w = prio / (prio.sum(-1, keepdim=True) + 1e-20) if m["renormalize"] else prio
        w = w * m.get("routed_scaling_factor", 1.0)
        return idx, w, prio

    def kept(self, idx, priority):
        """Assignments within each expert's capacity (all of them when dropless)."""
        m, E = self.m, self.w_gate.shape[0]
        flat = idx.reshape(-1)
        keep = torch.ones_like(flat, dtype=torch.bool)
        if m["capacity_factor"] <= 0:
            return keep
        cap = math.ceil(m["capacity_factor"] * idx.shape[0] * idx.shape[1] / E)
        if m["drop_policy"] == "probs":
            pre = torch.argsort(priority.reshape(-1), descending=True, stable=True)
        else:
            pre = torch.arange(flat.numel(), device=flat.device)
        order = pre[torch.argsort(flat[pre], stable=True)]
        counts = torch.bincount(flat, minlength=E)
        rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
        keep.zero_()
        keep[order[rank < cap]] = True
        return keep

    def forward(self, x, side=None):
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        idx, w, prio = self.route(xt)
        keep = self.kept(idx, prio)  # capacity ranks assignments by unnormalised score
        w = w * keep.view_as(w).to(w.dtype)
        y = torch.zeros_like(xt)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            h = xt[tok]
            out = (F.silu(h @ self.w_gate[e]) * (h @ self.w_up[e])) @ self.w_down[e]
            y.index_add_(0, tok, out * w[tok, slot].to(out.dtype).unsqueeze(-1))
        if self.shared_expert is not None:
            s = self.shared_expert(xt)
            if self.shared_gate is not None:
                s = s * torch.sigmoid(self.shared_gate(xt))
            y = y + s
        return y.view(shape)


class CausalConv1d(nn.Module):
    def __init__(self, channels, kernel, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x):  # [B, L, C] -> silu(causal depthwise conv)
        K = self.weight.shape[-1]
        y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), self.weight, self.bias, groups=x.shape[-1])
        return F.silu(y.transpose(1, 2))


class GatedRMSNorm(nn.Module):
    def __init__(self, dim, group_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, x, z):
        h = x.float() * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.view(shape) * self.weight.float()).to(x.dtype)


def ssd(x, dt, A, B, C, D):
    """Mamba-2 scan in its quadratic form: y_t = sum_{s<=t} C_t.B_s exp(sum_{s<r<=t} dt_r A) dt_s x_s
    + D x_t. x [b, L, H, P]; dt [b, L, H] (fp32, after softplus); B, C [b, L, G, N]."""
    b, L, H, P = x.shape
    G = B.shape[2]
    a = (dt * A).transpose(1, 2)  # [b, H, L] log-decays
    tri = torch.ones(L, L, dtype=torch.bool, device=x.device)
    seg = a.unsqueeze(-1).expand(b, H, L, L).masked_fill(~torch.tril(tri, -1), 0.0).cumsum(-2)
    decay = torch.exp(seg.masked_fill(~torch.tril(tri), float("-inf")))  # [b, H, t, s]
    CB = torch.einsum("btgn,bsgn->bgts", C.float(), B.float()).repeat_interleave(H // G, dim=1)
    xf = x.float()
    y = torch.einsum("bhts,bshp->bthp", decay * CB, xf * dt.unsqueeze(-1)) + xf * D.float().view(H, 1)
    return y.to(x.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, a, n_heads=None, out_proj=True):
        super().__init__()
        mc, D = a["mamba"], a["d_model"]
        H = n_heads or mc["n_heads"]
        self.P, self.N, self.dt_limit = mc["head_dim"], mc["d_state"], mc["dt_limit"]
        d_inner, gn = H * mc["head_dim"], mc["n_groups"] * mc["d_state"]
        for part, width in (("z", d_inner), ("x", d_inner), ("B", gn), ("C", gn), ("dt", H)):
            setattr(self, f"{part}_proj", nn.Linear(D, width, bias=False))
        for part, width in (("x", d_inner), ("B", gn), ("C", gn)):
            setattr(self, f"conv_{part}", CausalConv1d(width, mc["d_conv"], mc["conv_bias"]))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(d_inner, d_inner // mc["n_groups"], a["norm_eps"])
        self.out_proj = nn.Linear(d_inner, D, bias=False) if out_proj else None

    def mix(self, u, side):
        b, L, _ = u.shape
        if side.valid is not None:  # padding tokens must not feed the state
            u = u * side.valid.unsqueeze(-1).to(u.dtype)
        p = {k: getattr(self, f"{k}_proj")(u) for k in ("z", "x", "B", "C", "dt")}
        for k in ("x", "B", "C"):
            p[k] = getattr(self, f"conv_{k}")(p[k])
            if side.valid is not None:
                p[k] = p[k] * side.valid.unsqueeze(-1).to(p[k].dtype)
        H, G = p["x"].shape[-1] // self.P, p["B"].shape[-1] // self.N
        dt = F.softplus(p["dt"].float() + self.dt_bias.float())
        lo, hi = self.dt_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(lo, hi)
        y = ssd(p["x"].view(b, L, H, self.P), dt, -torch.exp(self.A_log.float()),
                p["B"].view(b, L, G, self.N), p["C"].view(b, L, G, self.N), self.D)
        return self.norm(y.reshape(b, L, H * self.P).to(p["z"].dtype), p["z"])

    def forward(self, x, side):
        return self.out_proj(self.mix(x, side))


class HybridHeadsMixer(QKV):
    """Attention and Mamba-2 heads on the same input, concatenated, one output projection."""

    def __init__(self, a):
        hy = a["hybrid"]
        super().__init__(a["d_model"], hy["n_attn_heads"], hy["n_kv_heads"], a["head_dim"], a["qkv_bias"])
        self.mamba = Mamba2Mixer(a, n_heads=hy["n_mamba_heads"], out_proj=False)
        d_cat = hy["n_attn_heads"] * a["head_dim"] + hy["n_mamba_heads"] * a["mamba"]["head_dim"]
        self.out_proj = nn.Linear(d_cat, a["d_model"], bias=False)

    def forward(self, x, side):
        att = self.attend(x, side)
        return self.out_proj(torch.cat([att, self.mamba.mix(x, side).to(att.dtype)], dim=-1))


MIXERS = {"attention": Attention, "mlp": lambda a: MLP(a["d_model"], a["ffn_dim"]), "moe": MoE,
          "mamba": Mamba2Mixer, "hybrid": HybridHeadsMixer}


class Sublayer(nn.Module):
    def __init__(self, kind, a):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(a["d_model"], a["norm_eps"])
        self.mixer = MIXERS[kind](a)
        self.out_norm = RMSNorm(a["d_model"], a["norm_eps"]) if a["norm"] == "peri" else None

    def forward(self, x, side):
        h = self.mixer(self.norm(x), side)
        return self.out_norm(h) if self.out_norm is not None else h


# ---- the model -------------------------------------------------------------------------------

class PretrainLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainLMConfig
    base_model_prefix = "pretrain_lm"
    _tied_weights_keys = ["output.weight"]
    _no_split_modules = ["Sublayer"]
    _supports_sdpa = True
    # multi-token-prediction modules (training only) travel with the weights for re-import
    _keys_to_ignore_on_load_unexpected = [r"^mtp\."]

    def __init__(self, config):
        super().__init__(config)
        a = config.pretrain_model
        self.arch = a
        self.tok_embeddings = nn.Embedding(a["vocab_size"], a["d_model"])
        self.layers = nn.ModuleDict({str(i): Sublayer(k, a) for i, k in enumerate(a["sublayers"])})
        self.norm = RMSNorm(a["d_model"], a["norm_eps"])
        self.output = nn.Linear(a["d_model"], a["vocab_size"], bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def _side(self, B, S, device, attention_mask):
        a = self.arch
        valid = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            valid = attention_mask.bool()
        mask = None
        if valid is not None:  # causal, padding keys hidden; a token always sees itself
            causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
            mask = (causal & valid[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
            mask = mask.unsqueeze(1)
        rope = None
        if a["position"] == "rope" and any(k in ("attention", "hybrid") for k in a["sublayers"]):
            hd = a["head_dim"]
            inv = 1.0 / (a["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
            mult = 1.0
            if a.get("rope_scaling"):  # context extension: transformers' own RoPE variants
                from types import SimpleNamespace

                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                spec = SimpleNamespace(rope_theta=a["rope_theta"], head_dim=hd, hidden_size=a["d_model"],
                                       num_attention_heads=a["n_heads"], partial_rotary_factor=1.0,
                                       max_position_embeddings=a["max_seq_len"], rope_scaling=a["rope_scaling"])
                inv, mult = ROPE_INIT_FUNCTIONS[a["rope_scaling"]["rope_type"]](spec, device)
            if valid is not None:  # left padding: positions count real tokens only
                pos = (valid.long().cumsum(-1) - 1).clamp(min=0).float()
            else:
                pos = torch.arange(S, dtype=torch.float32, device=device).expand(B, S)
            freqs = pos.unsqueeze(-1) * inv
            rope = (freqs.cos() * mult, freqs.sin() * mult)
        return Side(rope, mask, valid)

    def run_stack(self, h, side):
        """Residual modes exactly as in training (standard, ladder from ``ladder_from``, parallel)."""
        a = self.arch
        mode, items = a["residual"], list(self.layers.items())
        pending, i = None, 0
        while i < len(items):
            idx, layer = int(items[i][0]), items[i][1]
            if mode == "parallel" and i + 1 < len(items) and layer.kind == "attention" \
                    and items[i + 1][1].kind == "mlp":
                att, mlp = layer(h, side), items[i + 1][1](h, side)
                h = (h + att) + mlp
                i += 2
                continue
            if mode == "ladder" and idx >= a["ladder_from"]:
                out = layer(h, side)
                if pending is not None:
                    h = h + pending
                pending = out
            else:
                if pending is not None:
                    h, pending = h + pending, None
                h = h + layer(h, side)
            i += 1
        return h + pending if pending is not None else h

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                return_dict=None, **kwargs):
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = h.shape[:2]
        h = self.run_stack(h, self._side(B, S, h.device, attention_mask))
        logits = self.output(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # No cache: every step sees the whole sequence so far.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
