"""Weights that make an export comparison meaningful, and the checks that they do.

A freshly initialised model (std 0.02) attends almost uniformly and its sublayers add
almost nothing to the residual stream, so logits agree to 1e-4 even when a mapping gets
RoPE, a head layout or a mixer wrong. ``sharpen`` rescales every weight matrix to a gain
per input (queries and keys larger, so attention is sharp as in a trained model) and the
embedding to unit scale: the same cost as the tiny model, the sensitivity of a trained one.
``attention_sharpness`` and ``sublayer_shares`` measure that it worked.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

QK_GAIN = 2.5  # per-head score std ~ QK_GAIN**2: most of the probability on one or two keys
GAIN = 1.0
HEAD_GAIN = 3.0  # an untied LM head: logits of a few units, clear greedy choices
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # MoE experts [E, in, out]
LOGIT_TOL = 1e-4  # fp32 logits (std 3-8 after sharpen): what README.md claims for every mapping
MIN_SHARPNESS = 0.6  # mean largest attention probability (uniform over >= 5 keys: <= 0.2)
MIN_SHARE = 0.1  # each sublayer's output RMS over its input stream's (moves logits by >> LOGIT_TOL)


def _rescale(w: torch.Tensor, fan_in: int, gain: float) -> None:
    w.mul_(gain / (w.float().std().item() * math.sqrt(fan_in)))


@torch.no_grad()
def sharpen(model: nn.Module) -> nn.Module:
    """Rescale ``model``'s weights in place (see the module docstring); returns it."""
    done = set()
    for p in (model.tok_embeddings.weight,):
        p.mul_(1.0 / p.std())
        done.add(id(p))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in done:
            leaf = name.rsplit(".", 1)[-1]
            gain = QK_GAIN if leaf in ("wq", "wk") else HEAD_GAIN if name == "output" else GAIN
            _rescale(mod.weight, mod.in_features, gain)
            done.add(id(mod.weight))
    for name, p in model.named_parameters():
        if p.ndim == 3 and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS and id(p) not in done:
            _rescale(p, p.shape[1], GAIN)
    return model


@contextmanager
def _recording_attention(maxima: list):
    """Record, for every attention call, each query's largest attention probability."""
    import kernels

    original = kernels.attention

    def attention(q, k, v, doc_ids=None):
        H, S = q.shape[2], q.shape[1]
        qh, kh = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        kh = kh.repeat_interleave(H // kh.shape[1], dim=1)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        maxima.append(probs.amax(-1)[..., 4:].flatten())  # queries with >= 5 keys to choose from
        return original(q, k, v, doc_ids)

    kernels.attention = attention
    try:
        yield
    finally:
        kernels.attention = original


@torch.no_grad()
def attention_sharpness(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over heads and queries (those with >= 5 keys) of the largest attention
    probability: 1 is one-hot, <= 0.2 would be uniform. NaN without attention layers."""
    maxima: list = []
    with _recording_attention(maxima):
        model(x)
    return torch.cat(maxima).mean().item() if maxima else float("nan")


@torch.no_grad()
def sublayer_shares(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """RMS of each sublayer's output over the RMS of the stream it reads: how much each
    sublayer (attention, MLP, experts, Mamba-2, hybrid heads) moves the logits."""
    shares, hooks = {}, []
    for idx, layer in model.layers.items():
        def hook(mod, args, out, idx=idx):
            shares[f"{idx}:{mod.kind}"] = (out.float().pow(2).mean().sqrt() /
                                           args[0].float().pow(2).mean().sqrt()).item()
        hooks.append(layer.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return shares


def check_sharp(model: nn.Module, x: torch.Tensor, what: str) -> None:
    """Assert (and print) that attention is sharp and every sublayer matters on ``x``."""
    sharp = attention_sharpness(model, x)
    shares = sublayer_shares(model, x)
    print(f"{what}: attention sharpness {sharp:.2f}, sublayer shares "
          + " ".join(f"{k}={v:.2f}" for k, v in shares.items()))
    if any(k.split(":")[1] in ("attention", "hybrid") for k in shares):
        assert sharp > MIN_SHARPNESS, sharp
    assert min(shares.values()) > MIN_SHARE, shares
