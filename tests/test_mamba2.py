"""Mamba-2: SSD chunked == recurrence (values and gradients), document resets,
causal conv, mixer == token-by-token decoding, Hugging Face layout, init, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels.ssd import (causal_conv1d_ref, segment_ids, ssd, ssd_chunked, ssd_flops,
                         ssd_recurrent)
from models.config import MambaConfig, ModelConfig
from models.layers import ForwardContext
from models.mamba2 import Mamba2Mixer, from_hf_mamba2, mamba_flops_per_token, to_hf_mamba2
from models.transformer import build_model

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These ops are tiny; on a shared 2-core machine intra-op threads only contend.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(b, L, H, P, G, N, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(b, L, H, P, generator=g, dtype=F64),
        "dt": torch.rand(b, L, H, generator=g, dtype=F64) * 0.5 + 0.01,
        "A": -(torch.rand(H, generator=g, dtype=F64) * 2 + 0.1),
        "B": torch.randn(b, L, G, N, generator=g, dtype=F64),
        "C": torch.randn(b, L, G, N, generator=g, dtype=F64),
        "D": torch.randn(H, generator=g, dtype=F64),
    }
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def _mixer_cfg(**mamba) -> ModelConfig:
    mc = dict(d_state=8, head_dim=8, n_groups=2, d_conv=4, chunk_size=8)
    mc.update(mamba)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=1, pattern="M", n_heads=4,
                       mamba=MambaConfig(**mc))


def _mixer(seed=0, **mamba) -> Mamba2Mixer:
    model = build_model(_mixer_cfg(**mamba), seed=seed)
    return model.layers["0"].mixer


# ---- SSD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 7, 33, 100])
@pytest.mark.parametrize("Q", [1, 4, 16, 64])
def test_chunked_equals_recurrence_values_and_grads(L, Q):
    t = _inputs(2, L, 4, 3, 2, 5, seed=L * 100 + Q, grad=True)
    init = torch.randn(2, 4, 3, 5, dtype=F64)
    y1, s1 = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], Q, D=t["D"], initial_state=init,
                         return_final_state=True)
    y2, s2 = ssd_recurrent(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], initial_state=init,
                           return_final_state=True)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=1e-9)
    w = torch.randn_like(y1)
    ws = torch.randn_like(s1)
    g1 = torch.autograd.grad((y1 * w).sum() + (s1 * ws).sum(), list(t.values()))
    g2 = torch.autograd.grad((y2 * w).sum() + (s2 * ws).sum(), list(t.values()))
    for name, a, b in zip(t, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=f"grad {name}")


def test_chunked_fp32_close_to_fp64_and_keeps_dtype():
    t = _inputs(1, 300, 4, 8, 1, 16)
    ref = ssd_recurrent(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"])
    f = {k: v.float() for k, v in t.items()}
    y = ssd_chunked(f["x"], f["dt"], f["A"], f["B"], f["C"], 64, D=f["D"])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    yb = ssd(f["x"].bfloat16(), f["dt"], f["A"], f["B"].bfloat16(), f["C"].bfloat16(), 64, D=f["D"])
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("Q", [1, 4, 16])
def test_seq_idx_reset_equals_separate_documents(Q):
    lengths = [5, 1, 17, 9]  # documents packed into one row of 32
    L = sum(lengths)
    t = _inputs(1, L, 4, 3, 2, 5, seed=Q, grad=True)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    init = torch.randn(1, 4, 3, 5, dtype=F64)
    y, s = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], Q, D=t["D"], seq_idx=doc,
                       initial_state=init, return_final_state=True)
    yr, sr = ssd_recurrent(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], seq_idx=doc,
                           initial_state=init, return_final_state=True)
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, sr, rtol=1e-9, atol=1e-9)
    parts, start = [], 0
    for i, n in enumerate(lengths):
        sl = {k: (v[:, start:start + n] if v.dim() > 1 else v) for k, v in t.items()}
        yi, si = ssd_chunked(sl["x"], sl["dt"], sl["A"], sl["B"], sl["C"], Q, D=sl["D"],
                             initial_state=init if i == 0 else None, return_final_state=True)
        parts.append(yi)
        start += n
    torch.testing.assert_close(y, torch.cat(parts, 1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, si, rtol=1e-9, atol=1e-9)  # final state = last document's
    # gradients also agree with the recurrence under resets
    w = torch.randn_like(y)
    g1 = torch.autograd.grad((y * w).sum(), list(t.values()))
    g2 = torch.autograd.grad((yr * w).sum(), list(t.values()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_segment_ids_treat_repeated_ids_as_new_documents():
    doc = torch.tensor([[3, 3, 7, 7, 3, 3]])
    assert segment_ids(doc).tolist() == [[0, 0, 1, 1, 2, 2]]


def test_causal_conv_doc_mask():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 23, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    plain = causal_conv1d_ref(x, w, b, activation="silu")
    same_doc = causal_conv1d_ref(x, w, b, seq_idx=torch.zeros(2, 23, dtype=torch.long), activation="silu")
    torch.testing.assert_close(plain, same_doc)
    doc = torch.tensor([0] * 10 + [1] * 2 + [2] * 11).expand(2, -1)
    masked = causal_conv1d_ref(x, w, b, seq_idx=doc)
    sep = torch.cat([causal_conv1d_ref(x[:, s:e], w, b) for s, e in ((0, 10), (10, 12), (12, 23))], 1)
    torch.testing.assert_close(masked, sep)


# ---- mixer -------------------------------------------------------------------------------

def test_mixer_init():
    cfg = _mixer_cfg()
    m = _mixer()
    mc = cfg.mamba
    dt = torch.nn.functional.softplus(m.dt_bias.detach().double())
    assert dt.min() >= mc.dt_min * (1 - 1e-4) and dt.max() <= mc.dt_max * (1 + 1e-4)
    A = m.A_log.detach().exp()
    assert A.min() >= mc.A_init_range[0] and A.max() <= mc.A_init_range[1]
    assert torch.equal(m.D.detach(), torch.ones_like(m.D)) and torch.equal(m.norm.weight.detach(), torch.ones(64))
    bound = 1 / math.sqrt(mc.d_conv)
    assert m.conv_x.weight.abs().max() <= bound and m.conv_x.weight.std() > bound / 4
    # out_proj is depth-scaled like the other output projections
    assert m.out_proj.weight.std() < m.x_proj.weight.std()


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.02, 0.05)])
def test_mixer_forward_equals_step_decoding_and_prefill(dt_limit):
    m = _mixer(n_groups=2, chunk_size=8, dt_limit=dt_limit)
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        y = m(x, ForwardContext())
        cache = m.allocate_cache(2)
        steps = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(21)], dim=1)
        torch.testing.assert_close(steps, y, rtol=1e-4, atol=1e-5)
        cache = m.allocate_cache(2)
        head = m(x[:, :9], None, cache=cache)  # prefill fills the cache
        more = m(x[:, 9:13], None, cache=cache)  # chunked prefill continues from it
        tail = torch.stack([m.step(x[:, t], cache) for t in range(13, 21)], dim=1)
        torch.testing.assert_close(torch.cat([head, more, tail], 1), y, rtol=1e-4, atol=1e-5)


def test_mixer_packed_documents_do_not_mix():
    m = _mixer(chunk_size=4)
    x = torch.randn(1, 19, 32)
    doc = torch.tensor([[0] * 6 + [1] * 2 + [2] * 11])
    with torch.no_grad():
        packed = m(x, ForwardContext(doc_ids=doc))
        sep = torch.cat([m(x[:, s:e], ForwardContext()) for s, e in ((0, 6), (6, 8), (8, 19))], 1)
        torch.testing.assert_close(packed, sep, rtol=1e-4, atol=1e-5)
        # prefill over packed documents leaves only the last one's state in the cache
        cache = m.allocate_cache(1)
        m(x[:, :12], ForwardContext(doc_ids=doc[:, :12]), cache=cache)
        tail = torch.stack([m.step(x[:, t], cache) for t in range(12, 19)], 1)
        torch.testing.assert_close(tail, sep[:, 12:], rtol=1e-4, atol=1e-5)
    # with doc_reset off the documents do mix
    m.mamba_cfg.doc_reset = False
    with torch.no_grad():
        assert not torch.allclose(m(x, ForwardContext(doc_ids=doc)), sep, atol=1e-3)


def test_mixer_matches_hugging_face_mamba2():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    torch.manual_seed(0)
    # HF's torch path normalises over all of d_inner, i.e. our gated norm with one group
    hc = Mamba2Config(hidden_size=32, state_size=8, expand=2, head_dim=8, num_heads=8, n_groups=1,
                      conv_kernel=4, chunk_size=8, use_conv_bias=True, use_bias=False,
                      layer_norm_epsilon=1e-5)
    hf = HFMixer(hc, layer_idx=0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = Mamba2Mixer(_mixer_cfg(n_groups=1, chunk_size=16))
    ours.load_state_dict(from_hf_mamba2(hf.state_dict()))
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ForwardContext()), hf(x), rtol=1e-4, atol=1e-5)
    back = to_hf_mamba2(ours.state_dict())
    assert set(back) == set(hf.state_dict())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_mixer_grad_flows_to_every_parameter():
    m = _mixer()
    m(torch.randn(2, 13, 32), ForwardContext(doc_ids=torch.tensor([[0] * 6 + [1] * 7] * 2))).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("seq_len", [64, 100])
def test_flops_match_flop_counter(seq_len):
    cfg = _mixer_cfg(chunk_size=16)
    m = Mamba2Mixer(cfg)
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(2, seq_len, 32), ForwardContext())
    measured = fc.get_total_flops() / (2 * seq_len)
    assert measured == pytest.approx(mamba_flops_per_token(cfg, seq_len), rel=0.02)
    assert ssd_flops(2, seq_len, 8, 8, 2, 8, 16) > 0
