"""Every Triton kernel against its reference, forward and backward, in the Triton
interpreter on CPU (awkward row lengths, one row, a long row, fp32/bf16, strided inputs).

``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, i.e. when
``kernels.triton_ops`` is imported, so it is set here before that import (and left set:
the interpreter reads it again at launch). bf16 tolerances
allow a couple of ulps: the interpreter truncates fp32->bf16 where CUDA rounds to nearest.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import reference as R  # noqa: E402


def _import_interpreted(*names):
    mods = []
    for name in names:
        full = f"kernels.triton_ops.{name}"
        common = sys.modules.get("kernels.triton_ops._common")
        if common is not None and not common.INTERPRET:  # imported earlier as GPU kernels
            for m in [k for k in sys.modules if k.startswith("kernels.triton_ops")]:
                del sys.modules[m]
        mods.append(importlib.import_module(full))
    return mods


T_norms, T_rotary, T_swiglu, T_ce = _import_interpreted("norms", "rotary", "swiglu", "cross_entropy")

F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: 2e-5, BF16: 2e-2}


def close(got, want, dtype, what=""):
    """Max error relative to the reference's scale."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = want.float().abs().max().clamp(min=1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def compare(fn_t, fn_r, inputs, dtype, seed=0):
    """Run both on the same leaf inputs with the same random output grads; compare all."""
    def run(fn):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(seed)
        grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, grads)
        return outs, [t.grad for t in leaves if t.requires_grad]

    (ot, gt), (orf, gr) = run(fn_t), run(fn_r)
    for i, (a, b) in enumerate(zip(ot, orf)):
        close(a, b, dtype, f"output {i}")
    for i, (a, b) in enumerate(zip(gt, gr)):
        close(a, b, dtype, f"grad {i}")


def rnd(*shape, dtype=F32, seed=0, scale=1.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)


def strided(t, extra=3):
    """A non-contiguous view holding t's values: last dim sliced out of a wider buffer."""
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] + extra, dtype=t.dtype)
    buf[..., extra:] = t.detach()
    v = buf[..., extra:]
    assert v.stride(-2) == t.shape[-1] + extra
    return v.requires_grad_(t.requires_grad)


SHAPES = [(1, 100), (3, 5, 100), (300, 257), (2, 8192)]  # (300, 257): several programs, several blocks each
DTYPES = [F32, BF16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype):
    x = rnd(*shape, dtype=dtype, scale=2.0)
    w = rnd(shape[-1], seed=1, scale=0.1) + 1.0
    w = w.detach().requires_grad_()
    compare(lambda x, w: T_norms.rms_norm(x, w, 1e-5), lambda x, w: R.rms_norm(x, w, 1e-5), [x, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_and_transposed(dtype):
    w = rnd(100, seed=1).detach().requires_grad_()
    x = strided(rnd(6, 100, dtype=dtype))
    compare(lambda x, w: T_norms.rms_norm(x, w, 1e-6), lambda x, w: R.rms_norm(x, w, 1e-6), [x, w], dtype)
    xt = rnd(100, 6, dtype=dtype).detach().t().requires_grad_()  # non-unit last-dim stride
    compare(lambda x, w: T_norms.rms_norm(x, w, 1e-6), lambda x, w: R.rms_norm(x, w, 1e-6), [xt, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, group", [((1, 100), 100), ((2, 3, 100), 25), ((5, 258), 129), ((70, 96), 48), ((1, 8192), 8192)])
def test_gated_rms_norm(shape, group, dtype):
    x, z = rnd(*shape, dtype=dtype), rnd(*shape, dtype=dtype, seed=3)
    w = rnd(shape[-1], seed=1).detach().requires_grad_()
    compare(lambda x, z, w: T_norms.gated_rms_norm(x, z, w, 1e-5, group),
            lambda x, z, w: R.gated_rms_norm(x, z, w, 1e-5, group), [x, z, w], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_slices_of_one_projection(dtype):
    # Mamba-2's in_proj output is split into z and x: both are strided views.
    zx = rnd(2, 7, 2 * 96, dtype=dtype).detach()
    z, x = (t.requires_grad_() for t in zx.split(96, dim=-1))
    assert not x.is_contiguous()
    w = rnd(96, seed=1).detach().requires_grad_()
    compare(lambda x, z, w: T_norms.gated_rms_norm(x, z, w, 1e-5, 48),
            lambda x, z, w: R.gated_rms_norm(x, z, w, 1e-5, 48), [x, z, w], dtype)


def _rope(S, D, B=None):
    from models.layers import rope_tables
    pos = None if B is None else torch.randint(0, 50, (B, S))
    if pos is None:
        return rope_tables(D, S, 10000.0)
    c, s = rope_tables(D, pos.numel(), 10000.0, positions=pos.reshape(-1))
    return c.view(B, S, -1), s.view(B, S, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, S, H, Hkv, D, batched", [(2, 7, 4, 2, 16, False), (1, 1, 1, 1, 6, False),
                                                       (3, 5, 3, 1, 10, True)])
def test_rotary(B, S, H, Hkv, D, batched, dtype):
    cos, sin = _rope(S, D, B if batched else None)
    q, k = rnd(B, S, H, D, dtype=dtype), rnd(B, S, Hkv, D, dtype=dtype, seed=1)
    compare(lambda q, k: T_rotary.apply_rotary(q, k, cos, sin),
            lambda q, k: R.apply_rotary(q, k, cos, sin), [q, k], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_slices_of_fused_qkv(dtype):
    B, S, H, Hkv, D = 2, 6, 4, 2, 8
    qkv = rnd(B, S, (H + 2 * Hkv) * D, dtype=dtype).detach()
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.view(B, S, H, D).requires_grad_(), k.view(B, S, Hkv, D).requires_grad_()
    assert not q.is_contiguous()
    cos, sin = _rope(S, D)
    compare(lambda q, k: T_rotary.apply_rotary(q, k, cos, sin),
            lambda q, k: R.apply_rotary(q, k, cos, sin), [q, k], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 100), (5, 257), (2, 3, 64), (2, 8192)])
def test_swiglu(shape, dtype):
    compare(T_swiglu.swiglu, R.swiglu, [rnd(*shape, dtype=dtype), rnd(*shape, dtype=dtype, seed=1)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_halves_of_fused_projection(dtype):
    gu = rnd(3, 4, 2 * 100, dtype=dtype).detach()
    g, u = (t.requires_grad_() for t in gu.chunk(2, dim=-1))
    compare(T_swiglu.swiglu, R.swiglu, [g, u], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V, z_loss", [(300, 0.0), (1000, 1e-3), (20000, 1e-4)])
def test_cross_entropy(V, z_loss, dtype):
    logits = rnd(2, 9, V, dtype=dtype, scale=3.0)
    y = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(V))
    y[0, :4] = -100
    compare(lambda x: T_ce.cross_entropy(x, y, z_loss=z_loss),
            lambda x: R.cross_entropy(x, y, z_loss=z_loss), [logits], dtype)


def test_cross_entropy_all_ignored_sum_and_strided():
    logits = strided(rnd(3, 50))
    y = torch.full((3,), -100)
    compare(lambda x: T_ce.cross_entropy(x, y), lambda x: R.cross_entropy(x, y), [logits], F32)
    y = torch.tensor([3, -100, 49])
    compare(lambda x: T_ce.cross_entropy(x, y, reduction="sum", z_loss=1e-2),
            lambda x: R.cross_entropy(x, y, reduction="sum", z_loss=1e-2), [logits], F32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [0, 5, 32])
def test_fused_linear_cross_entropy(chunk, dtype):
    h = rnd(2, 19, 48, dtype=dtype)
    w = rnd(333, 48, dtype=dtype, seed=1, scale=0.2)
    y = torch.randint(0, 333, (2, 19), generator=torch.Generator().manual_seed(chunk))
    y[1, 3:9] = -100
    kw = dict(z_loss=1e-3, chunk_size=chunk)
    compare(lambda h, w: T_ce.linear_cross_entropy(h, w, y, **kw),
            lambda h, w: R.linear_cross_entropy(h, w, y, **kw), [h, w], dtype)
    if dtype == F32:  # and the chunked path equals the plain, materialised one
        compare(lambda h, w: T_ce.linear_cross_entropy(h, w, y, **kw),
                lambda h, w: R.cross_entropy(h @ w.t(), y, z_loss=1e-3), [h, w], dtype)


def test_tiny_model_loss_with_triton_kernels_equals_reference():
    from models.config import ModelConfig
    from models.transformer import build_model

    model = build_model(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32))
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 256, (2, 17), generator=g)
    doc = torch.tensor([[0] * 9 + [1] * 8, [0] * 17])
    x, y = tok[:, :-1], tok[:, 1:]

    def run(backend):
        kernels.configure(backend=backend)
        try:
            model.zero_grad()
            logits_loss = kernels.cross_entropy(model(x, doc_ids=doc[:, :-1]), y, z_loss=1e-4)
            fused_loss = kernels.linear_cross_entropy(model.hidden_states(x, doc[:, :-1]),
                                                      model.output.weight, y, z_loss=1e-4, chunk_size=8)
            (logits_loss + fused_loss).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            return logits_loss.detach(), fused_loss.detach(), grads
        finally:
            kernels.configure()

    kernels.configure(backend="triton")
    assert [kernels.backend_for(op) for op in ("rms_norm", "apply_rotary", "swiglu", "linear_cross_entropy")] \
        == ["triton"] * 4
    lt, ft, gt = run("triton")
    lr, fr, gr = run("reference")
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ft, fr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lt, fr, rtol=1e-5, atol=1e-5)
    for n in gr:
        torch.testing.assert_close(gt[n], gr[n], rtol=1e-4, atol=1e-6, msg=n)
