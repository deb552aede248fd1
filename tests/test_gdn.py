"""Gated DeltaNet (``G``): chunked == recurrent kernel, equality with transformers' Qwen3-Next
layer, generation, FLOPs, config rules, and a tiny ``G`` model trained by ``pretrain train``."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_overrides
from kernels.gdn import flop_mapping, gated_delta_rule_chunked, gated_delta_rule_recurrent, l2norm
from models.config import GDNConfig, ModelConfig, UserError
from models.gdn import GatedDeltaNetMixer, from_hf_gdn, gdn_flops_per_token, to_hf_gdn
from models.layers import ForwardContext
from pretrain.metrics import read_metrics


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(b=2, L=37, H=3, K=8, V=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k = l2norm(r(b, L, H, K)), l2norm(r(b, L, H, K))
    # decays down to exp(-3) per token: the state forgets within a chunk, as in training
    gl = -3 * torch.rand(b, L, H, generator=g, dtype=dtype)
    beta = torch.rand(b, L, H, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, r(b, L, H, V), gl, beta)], r(b, H, K, V).requires_grad_()


def _docs(b, L):
    ids = torch.zeros(b, L, dtype=torch.long)
    ids[0, 10:], ids[0, 11:], ids[0, 30:] = 1, 2, 3  # a one-token document, a boundary at 30
    ids[1, 16:] = 7
    return ids


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_matches_recurrent_forward_and_backward(dtype, docs, init):
    (q, k, v, g, beta), S0 = _inputs(dtype=dtype)
    seq_idx = _docs(2, q.shape[1]) if docs else None
    S0 = S0 if init else None
    leaves = [q, k, v, g, beta] + ([S0] if init else [])
    o, S = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=S0, seq_idx=seq_idx,
                                      return_final_state=True)
    w = torch.randn_like(o), torch.randn_like(S)
    ref = torch.autograd.grad((o * w[0]).sum() + (S * w[1]).sum(), leaves)
    for chunk in (1, 3, 16, 64):  # 37 tokens: no chunk size divides them
        oc, Sc = gated_delta_rule_chunked(q, k, v, g, beta, chunk, initial_state=S0, seq_idx=seq_idx,
                                          return_final_state=True)
        got = torch.autograd.grad((oc * w[0]).sum() + (Sc * w[1]).sum(), leaves)
        assert (oc - o).abs().max() < 1e-5 and (Sc - S).abs().max() < 1e-5, chunk
        for name, a, b in zip("q k v g beta S0".split(), got, ref):
            assert (a - b).abs().max() < 1e-5, (chunk, name, (a - b).abs().max())


def test_doc_reset_equals_separate_sequences():
    """A packed row gives each document exactly what it gives alone (the state never leaks)."""
    (q, k, v, g, beta), _ = _inputs(b=1, L=24)
    ids = torch.tensor([[0] * 9 + [1] * 15])
    packed = gated_delta_rule_chunked(q, k, v, g, beta, 8, seq_idx=ids)
    for sl in (slice(0, 9), slice(9, 24)):
        alone = gated_delta_rule_chunked(*(t[:, sl] for t in (q, k, v, g, beta)), 8)
        assert torch.allclose(packed[:, sl], alone, atol=1e-12)


def test_fla_varlen_packing_matches_reference():
    """How packed documents are handed to fla (one row, ``cu_seqlens``, initial states on
    each row's first run, final states of each row's last run), checked with a stand-in for
    fla's kernel that runs the reference on each run."""
    from kernels.gdn import _fla_chunked

    def fla_like(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        outs, finals = [], []
        for i, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            o, S = gated_delta_rule_recurrent(*(t[:, a:b] for t in (q, k, v, g, beta)), scale,
                                              initial_state=initial_state[i:i + 1], return_final_state=True)
            outs.append(o)
            finals.append(S)
        return torch.cat(outs, 1), torch.cat(finals)

    (q, k, v, g, beta), S0 = _inputs()
    ids = _docs(2, q.shape[1])
    want = gated_delta_rule_chunked(q, k, v, g, beta, 8, initial_state=S0, seq_idx=ids, return_final_state=True)
    got = _fla_chunked(fla_like, q, k, v, g, beta, q.shape[-1] ** -0.5, S0, ids, True)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-12


# ---- the mixer against transformers' Qwen3-Next ----------------------------------------------

def _cfg(**gdn) -> ModelConfig:
    kw = {**dict(n_heads=2, n_v_heads=4, head_k_dim=8, head_v_dim=6, chunk_size=16), **gdn}
    return ModelConfig(vocab_size=64, d_model=32, n_layers=1, pattern="G", n_heads=4, gdn=GDNConfig(**kw))


def _qwen3_next(cfg: ModelConfig):
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    gc = cfg.gdn
    hc = Qwen3NextConfig(hidden_size=cfg.d_model, linear_num_key_heads=gc.n_heads,
                         linear_num_value_heads=gc.n_v_heads, linear_key_head_dim=gc.head_k_dim,
                         linear_value_head_dim=gc.head_v_dim, linear_conv_kernel_dim=gc.conv_size,
                         rms_norm_eps=gc.norm_eps)
    logging.getLogger("transformers.models.qwen3_next.modeling_qwen3_next").setLevel(logging.ERROR)
    torch.manual_seed(0)
    theirs = Qwen3NextGatedDeltaNet(hc, layer_idx=0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    return theirs


@pytest.mark.parametrize("n_v_heads", [2, 4])
def test_mixer_equals_transformers_qwen3_next(n_v_heads):
    cfg = _cfg(n_v_heads=n_v_heads)
    theirs = _qwen3_next(cfg)
    ours = GatedDeltaNetMixer(cfg)
    ours.load_state_dict(from_hf_gdn(theirs.state_dict(), cfg.gdn.n_heads))
    back = to_hf_gdn(ours.state_dict(), cfg.gdn.n_heads)
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], t) for k, t in theirs.state_dict().items())
    x = torch.randn(2, 37, cfg.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs(x), ours(x, ForwardContext())
    # both fp32; their chunk form subtracts cumulative decays, ours sums segments: each is
    # ~1e-6 relative from an fp64 run of ours
    assert (got - want).abs().max() < 1e-5 * want.abs().max(), (got - want).abs().max()


def _mixer(cfg: ModelConfig, dtype=torch.float32) -> GatedDeltaNetMixer:
    torch.manual_seed(0)
    m = GatedDeltaNetMixer(cfg).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_prefill_then_steps_equal_full_forward():
    cfg = _cfg()
    m = _mixer(cfg, torch.float64)
    x = torch.randn(2, 20, cfg.d_model, dtype=torch.float64)
    full = m(x, ForwardContext())
    cache = m.allocate_cache(2)
    head = m(x[:, :13], ForwardContext(), cache=cache)
    steps = torch.stack([m.step(x[:, t], cache) for t in range(13, 20)], 1)
    assert torch.allclose(torch.cat([head, steps], 1), full, atol=1e-10)


def test_conv_and_state_do_not_cross_documents():
    cfg = _cfg()
    m = _mixer(cfg)
    x = torch.randn(1, 24, cfg.d_model)
    ids = torch.tensor([[0] * 9 + [1] * 15])
    packed = m(x, ForwardContext(doc_ids=ids))
    assert torch.allclose(packed[:, 9:], m(x[:, 9:], ForwardContext()), atol=1e-5)
    assert torch.allclose(packed[:, :9], m(x[:, :9], ForwardContext()), atol=1e-5)


@pytest.mark.parametrize("seq_len", [64, 50])
def test_flops_match_flop_counter(seq_len):
    cfg = _cfg()
    m = GatedDeltaNetMixer(cfg)
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as fc:
        m(torch.randn(2, seq_len, cfg.d_model), ForwardContext())
    assert fc.get_total_flops() / (2 * seq_len) == pytest.approx(gdn_flops_per_token(cfg, seq_len), rel=1e-9)


def test_config_rules():
    with pytest.raises(UserError, match="model.gdn.n_v_heads"):
        ModelConfig(pattern="G-", gdn=GDNConfig(n_heads=4, n_v_heads=6)).validate()
    with pytest.raises(UserError, match="model.gdn.dt_min"):
        ModelConfig(pattern="G-", gdn=GDNConfig(dt_min=0.5, dt_max=0.1)).validate()
    ModelConfig(pattern="G-*-", gdn=GDNConfig(n_heads=2, n_v_heads=4)).validate()


def test_export_refuses_gdn_in_one_line():
    from pretrain.errors import UserError
    from pretrain.hf.registry import choose

    with pytest.raises(UserError, match="Gated DeltaNet"):
        choose(ModelConfig(pattern="G-"), {})
    # no target computes MLA or the attention options yet either (not silently as Llama)
    for kw, needle in ((dict(attention="mla"), "latent attention"), (dict(qk_norm=True), "qk_norm"),
                       (dict(attn_output_gate=True), "attn_output_gate"),
                       (dict(partial_rotary_factor=0.5), "partial_rotary_factor")):
        with pytest.raises(UserError, match=needle):
            choose(ModelConfig(pattern="*-", **kw), {}, remote_code="always")


@pytest.mark.timeout(240)
def test_tiny_gdn_model_trains_via_cli(tiny_dataset, tmp_path):
    from pretrain.cli import main  # ``pretrain train`` in this process (no second interpreter start)

    run = tmp_path / "run"
    over = tiny_overrides(tiny_dataset, run, **{
        "model.pattern": "G-*-", "model.n_layers": 1, "model.gdn.n_heads": 2, "model.gdn.n_v_heads": 4,
        "model.gdn.head_k_dim": 16, "model.gdn.head_v_dim": 16, "model.gdn.chunk_size": 16,
        "train.steps": 12, "optim.lr": 1e-2, "optim.warmup_steps": 2, "checkpoint.every": 100})
    assert main(["train", "tiny", *over]) == 0
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_sharded_mixer_equals_whole_sequence(tmp_path):
    """The context-parallel path (state passing through ``RecurrentShard``, here one rank
    holding three uneven pieces) gives the whole-sequence outputs and gradients, in fp64."""
    import torch.distributed as dist

    from parallel.cp_recurrent import RecurrentShard

    cfg = _cfg(chunk_size=4)
    m = _mixer(cfg, torch.float64)
    x = torch.randn(2, 37, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids = _docs(2, 37)
    ids[1, 23:] = 8  # a document starting exactly at the third piece
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for doc_ids in (None, ids):
            want = m(x, ForwardContext(doc_ids=doc_ids))
            gw = torch.autograd.grad(want.square().sum(), list(m.parameters()))
            shard = RecurrentShard(dist.group.WORLD, [[0, 1, 2]], [10, 13, 14], doc_ids)
            got = m(x, ForwardContext(doc_ids=doc_ids, recurrent_shard=shard))
            gg = torch.autograd.grad(got.square().sum(), list(m.parameters()))
            assert (got - want).abs().max() < 1e-10
            assert max((a - b).abs().max() for a, b in zip(gg, gw)) < 1e-9
    finally:
        dist.destroy_process_group()
