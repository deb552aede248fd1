"""Parallel hybrid heads (``P``), hybrid language models training, and the Mamba presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import kernels
from models.config import HybridHeadsConfig, MambaConfig, ModelConfig
from models.hybrid import HybridHeadsMixer, hybrid_flops_per_token, hybrid_kv_heads
from models.layers import Attention
from models.mamba2 import Mamba2Mixer
from models.transformer import build_model
from pretrain.config import load_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These ops are tiny; on a shared 2-core machine intra-op threads only contend.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(pattern="P-", **kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=1, pattern=pattern, n_heads=4, n_kv_heads=2,
                mamba=MambaConfig(d_state=8, head_dim=8, n_groups=2, chunk_size=8),
                hybrid=HybridHeadsConfig(n_attn_heads=2, n_mamba_heads=4))
    base.update(kw)
    return ModelConfig(**base)


def test_hybrid_shapes_and_grad_flow():
    model = build_model(_cfg())
    mixer = model.layers["0"].mixer
    assert isinstance(mixer, HybridHeadsMixer)
    assert mixer.out_proj.weight.shape == (32, 2 * 8 + 4 * 8)
    x = torch.randn(2, 11, 32)
    ctx = model.make_context(11, "cpu", torch.tensor([[0] * 5 + [1] * 6] * 2))
    y = mixer(x, ctx)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_kv_heads_capped():
    assert hybrid_kv_heads(_cfg(n_kv_heads=2)) == 2
    assert hybrid_kv_heads(_cfg(n_kv_heads=0)) == 2  # MHA: capped at the 2 attention heads
    assert hybrid_kv_heads(_cfg(n_heads=6, n_kv_heads=3, hybrid=HybridHeadsConfig(4, 4))) == 1


@pytest.mark.parametrize("with_docs", [False, True])
def test_hybrid_equals_attention_plus_mamba_with_split_out_proj(with_docs):
    """One out_proj over [attn | mamba] == an attention mixer and a Mamba-2 mixer whose
    output projections are the two column blocks (the Falcon-H1 checkpoint layout)."""
    cfg = _cfg()
    model = build_model(cfg, seed=3)
    hyb = model.layers["0"].mixer
    acfg = dataclasses.replace(cfg, n_heads=2, n_kv_heads=hybrid_kv_heads(cfg), head_dim=cfg.head_dim_resolved)
    attn = Attention(acfg)
    mamba = Mamba2Mixer(cfg, n_heads=4)
    d_attn = 2 * cfg.head_dim_resolved
    W = hyb.out_proj.weight.detach()
    with torch.no_grad():
        for n in ("wq", "wk", "wv"):
            getattr(attn, n).weight.copy_(getattr(hyb, n).weight)
        attn.wo.weight.copy_(W[:, :d_attn])
        mamba.load_state_dict({**hyb.mamba.state_dict(), "out_proj.weight": W[:, d_attn:]})
        x = torch.randn(2, 13, 32)
        doc = torch.tensor([[0] * 4 + [1] * 9, [0] * 13]) if with_docs else None
        ctx = model.make_context(13, "cpu", doc)
        assert ctx.rope is not None
        torch.testing.assert_close(hyb(x, ctx), attn(x, ctx) + mamba(x, ctx), rtol=1e-5, atol=1e-6)


def test_hybrid_flops_match_flop_counter():
    cfg = _cfg()
    mixer = build_model(cfg).layers["0"].mixer
    S = 50
    ctx = build_model(cfg, init=False).make_context(S, "cpu", None)
    # CPU's fused SDPA is not counted by FlopCounterMode; the math backend is (as GPU SDPA is)
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        mixer(torch.randn(1, S, 32), ctx)
    assert fc.get_total_flops() / S == pytest.approx(hybrid_flops_per_token(cfg, S), rel=0.02)


@pytest.mark.parametrize("pattern", ["M-*-", "P-"])
def test_tiny_hybrid_lm_trains(pattern):
    torch.manual_seed(0)
    cfg = _cfg(pattern=pattern, n_layers=1 if pattern == "M-*-" else 2)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=g)
    doc = torch.cat([torch.zeros(4, 20, dtype=torch.long), torch.ones(4, 13, dtype=torch.long)], 1)[:, :-1]
    losses = []
    for _ in range(12):
        logits = model(tokens[:, :-1], doc_ids=doc)
        loss = kernels.cross_entropy(logits, tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


# ---- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hybrid_tiny", "mamba2_tiny"])
def test_tiny_presets_load_and_run(name):
    cfg = load_config(name)
    model = build_model(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 40))
    assert model(tokens).shape == (1, 40, cfg.model.vocab_size)
    assert "mamba" in cfg.model.sublayer_kinds


def test_mamba2_hybrid_8b_preset():
    cfg = load_config("mamba2_hybrid_8b")
    kinds = cfg.model.sublayer_kinds
    assert (kinds.count("mamba"), kinds.count("attention"), kinds.count("mlp")) == (24, 4, 28)
    model = build_model(cfg.model, init=False)
    assert next(model.parameters()).device.type == "meta"
    n = model.num_params()
    assert 8.4e9 < n < 8.9e9, n  # the released checkpoint has ~8.66B
    m = model.layers["0"].mixer
    assert m.x_proj.weight.shape == (8192, 4096) and m.B_proj.weight.shape == (8 * 128, 4096)
    assert m.A_log.shape == (128,)
