"""MLA (``model.attention: mla``) and the standard attention's options (qk_norm, output gate,
partial rotary): equal to transformers' modules with mapped weights, FLOPs exact, trains."""

from __future__ import annotations

import pytest
import torch

from models.config import MLAConfig, ModelConfig, RopeScalingConfig, UserError
from models.layers import Attention, ForwardContext, rope_tables
from models.mla import MLAttention, kv_cache_bytes_per_token, mla_flops_per_token

transformers = pytest.importorskip("transformers")

B, S = 2, 24


def causal_mask(s: int) -> torch.Tensor:
    m = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)
    return m[None, None].expand(B, 1, s, s)


def deinterleave(d: int) -> torch.Tensor:
    """transformers' rope_interleave reads rope dims (0, 2, 4, ..., 1, 3, ...): our rotate-half
    rows are theirs in this order."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def map_deepseek_v3(ours: MLAttention, hf, heads: int) -> None:
    """Our MLA weights from transformers' DeepseekV3Attention (rope_interleave=True)."""
    nope, rope, r = ours.nope, ours.rope, ours.kv_lora_rank
    perm = deinterleave(rope)
    q_rows = torch.cat([torch.arange(nope), nope + perm])  # per head: [nope | rope]
    q_rows = torch.cat([h * (nope + rope) + q_rows for h in range(heads)])
    with torch.no_grad():
        if hasattr(ours, "wq"):
            ours.wq.weight.copy_(hf.q_proj.weight[q_rows])
        else:
            ours.wq_a.weight.copy_(hf.q_a_proj.weight)
            ours.q_norm.weight.copy_(hf.q_a_layernorm.weight)
            ours.wq_b.weight.copy_(hf.q_b_proj.weight[q_rows])
        ours.wkv_a.weight.copy_(hf.kv_a_proj_with_mqa.weight[torch.cat([torch.arange(r), r + perm])])
        ours.kv_norm.weight.copy_(hf.kv_a_layernorm.weight)
        ours.wkv_b.weight.copy_(hf.kv_b_proj.weight)
        ours.wo.weight.copy_(hf.o_proj.weight)


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.15) + (p.dim() == 1))


@pytest.mark.parametrize("q_lora_rank,yarn", [(0, False), (24, False), (24, True)])
def test_mla_equals_deepseek_v3(q_lora_rank, yarn):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    heads, theta = 4, 10000.0
    scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=32.0,
                   beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0) if yarn else None
    hcfg = DeepseekV3Config(hidden_size=64, num_attention_heads=heads, num_key_value_heads=heads,
                            q_lora_rank=q_lora_rank or None, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=4, v_head_dim=12, rope_theta=theta, max_position_embeddings=32,
                            rope_scaling=scaling, attention_bias=False, rope_interleave=True)
    hcfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(hcfg, 0).eval()
    randomize(hf, 1)
    ours_scaling = RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=8, attention_factor=1.0) \
        if yarn else RopeScalingConfig()
    cfg = ModelConfig(d_model=64, n_heads=heads, attention="mla", max_seq_len=32, rope_theta=theta,
                      rope_scaling=ours_scaling,
                      mla=MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=4, v_head_dim=12, mscale_all_dim=1.0 if yarn else 0.0))
    cfg.validate()
    ours = MLAttention(cfg)
    map_deepseek_v3(ours, hf, heads)
    if yarn:
        assert ours.q_mult != 1.0  # the mscale adjustment is exercised
    x = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(2))
    cos, sin = DeepseekV3RotaryEmbedding(hcfg)(x, torch.arange(S)[None])
    want = hf(x, (cos, sin), causal_mask(S))[0]
    ctx = ForwardContext(rope=rope_tables(cfg.rope_dim, S, theta, scaling=cfg.rope_scaling, max_seq_len=32))
    got = ours(x, ctx)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the CP / flash-attn path (q, k, v padded to one head dim) computes the same
    import kernels

    ctx.attention = kernels.attention
    torch.testing.assert_close(ours(x, ctx), got, atol=1e-6, rtol=1e-5)


def test_qk_norm_equals_qwen3():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    hcfg = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64)
    hcfg._attn_implementation = "eager"
    hf = Qwen3Attention(hcfg, 0).eval()
    randomize(hf, 3)
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True, norm_eps=1e-6,
                      max_seq_len=64)
    ours = Attention(cfg)
    with torch.no_grad():
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"),
                     ("q_norm", "q_norm"), ("k_norm", "k_norm")):
            getattr(ours, a).weight.copy_(getattr(hf, b).weight)
    x = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(4))
    want = hf(x, Qwen3RotaryEmbedding(hcfg)(x, torch.arange(S)[None]), causal_mask(S))[0]
    got = ours(x, ForwardContext(rope=rope_tables(cfg.rope_dim, S, 10000.0)))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_gate_and_partial_rotary_equal_qwen3_next():
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

    hcfg = Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           partial_rotary_factor=0.25, rms_norm_eps=1e-6, rope_theta=10000.0,
                           max_position_embeddings=64)
    hcfg._attn_implementation = "eager"
    hf = Qwen3NextAttention(hcfg, 3).eval()
    randomize(hf, 5)
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True, attn_output_gate=True,
                      partial_rotary_factor=0.25, norm_eps=1e-6, max_seq_len=64)
    cfg.validate()
    assert cfg.rope_dim == 4
    ours = Attention(cfg)
    with torch.no_grad():
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            getattr(ours, a).weight.copy_(getattr(hf, b).weight)
        # Qwen3-Next's norms scale by (1 + weight)
        ours.q_norm.weight.copy_(1 + hf.q_norm.weight)
        ours.k_norm.weight.copy_(1 + hf.k_norm.weight)
    x = torch.randn(B, S, 64, generator=torch.Generator().manual_seed(6))
    want = hf(x, Qwen3NextRotaryEmbedding(hcfg)(x, torch.arange(S)[None]), causal_mask(S))[0]
    got = ours(x, ForwardContext(rope=rope_tables(cfg.rope_dim, S, 10000.0)))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bad,msg", [
    (dict(attention="mla", qk_norm=True), "model.qk_norm"),
    (dict(attention="mla", qkv_bias=True), "model.qkv_bias"),
    (dict(attention="mla", mla=MLAConfig(qk_rope_head_dim=5)), "model.mla.qk_rope_head_dim"),
    (dict(partial_rotary_factor=0.2), "model.partial_rotary_factor"),
    (dict(attention="mla", pattern="P-"), "model.attention"),
    (dict(attention="gqa"), "model.attention"),
])
def test_config_rules(bad, msg):
    with pytest.raises(UserError, match=msg):
        ModelConfig(d_model=64, n_heads=4, **bad).validate()


MLA_TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                mla=MLAConfig(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=16))


@pytest.mark.parametrize("kw,doc_mask", [
    (dict(), False), (dict(), True),
    (dict(mla=MLAConfig(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=4, v_head_dim=8)), False),
])
def test_mla_flops_exact(kw, doc_mask):
    from torch.utils.flop_counter import FlopCounterMode

    from models.transformer import build_model
    from pretrain.flops import cpu_attention_flop_mapping, forward_flops_per_token, train_flops_per_token

    cfg = ModelConfig(**{**MLA_TINY, **kw})
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, 64))
    doc_ids = torch.zeros(B, 64, dtype=torch.long) if doc_mask else None
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as fwd:
        model(x, doc_ids)
    assert fwd.get_total_flops() / (B * 64) == forward_flops_per_token(cfg, 64)
    mixer = model.layers["0"].mixer
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as one:
        mixer(torch.randn(B, 64, 64), model.make_context(64, "cpu", doc_ids))
    assert one.get_total_flops() / (B * 64) == mla_flops_per_token(cfg, 64)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as both:
        model(x, doc_ids).float().sum().backward()
    # as tests/test_flops.py: 3x forward (+ score recompute) is the conventional upper count
    assert abs(both.get_total_flops() / (B * 64) - train_flops_per_token(cfg, 64)) \
        / train_flops_per_token(cfg, 64) < 0.02


def test_kv_cache_bytes():
    mla = ModelConfig(**MLA_TINY)
    assert kv_cache_bytes_per_token(mla) == 2 * 2 * (16 + 8)  # 2 layers, bf16, latent + rope key
    gqa = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    assert kv_cache_bytes_per_token(gqa, 4) == 4 * 2 * (2 * 2 * 16)


@pytest.mark.timeout(300)
def test_tiny_mla_model_trains_via_cli(tiny_dataset, tmp_path):
    """``pretrain train`` (the CLI entry point, in process) on real text: the loss falls."""
    import json

    from conftest import tiny_overrides
    from pretrain import cli

    run = tmp_path / "run"
    ov = tiny_overrides(tiny_dataset, run, **{
        "train.steps": 12, "checkpoint.every": 12, "optim.lr": 3e-3, "model.attention": "mla",
        "model.mla.q_lora_rank": 32, "model.mla.kv_lora_rank": 16, "model.mla.qk_nope_head_dim": 16,
        "model.mla.qk_rope_head_dim": 8, "model.mla.v_head_dim": 12})
    assert cli.main(["train", "tiny", *ov]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and recs[-1]["loss"] < recs[0]["loss"] - 0.5, [r["loss"] for r in recs]
    assert "attention: mla" in (run / "config.yaml").read_text()


MLA_CLI = ["--model.attention=mla", "--model.mla.q_lora_rank=32", "--model.mla.kv_lora_rank=16",
           "--model.mla.qk_nope_head_dim=16", "--model.mla.qk_rope_head_dim=8", "--model.mla.v_head_dim=12"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra,cache", [
    (MLA_CLI, "kv cache: 96 bytes/token"),  # 2 layers x (16 + 8) x bf16
    (["--model.qk_norm=true", "--model.attn_output_gate=true", "--model.partial_rotary_factor=0.5"],
     "kv cache: 256 bytes/token"),  # 2 layers x 2 x 2 KV heads x 16 x bf16
])
def test_dry_run_tp2_matches_planner_and_reports_kv_cache(capsys, extra, cache):
    """The planner's tp split of every MLA / attention-option parameter is the one applied."""
    from pretrain import cli

    assert cli.main(["plan", "tiny", "--gpus", "2", "--gpu-type", "h100", "--parallel.tp=2",
                     "--dry-run", *extra]) == 0
    out = capsys.readouterr().out
    assert "matches the planner" in out and cache in out, out
