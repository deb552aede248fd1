"""Kernels on CPU without Triton: dispatch, the chunked loss, document-masked attention."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import dispatch, reference
from kernels.flash import cu_seqlens_from_doc_ids, varlen_attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_dispatch(monkeypatch):
    for op in kernels.OPS:
        monkeypatch.delenv(dispatch.env_key(op), raising=False)
    monkeypatch.delenv(dispatch.ENV_ALL, raising=False)
    kernels.configure()
    yield
    kernels.configure()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PRETRAIN_KERNEL", "TRITON_INTERPRET"))}
    e.update(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)


# ---- dispatch --------------------------------------------------------------------------

def test_auto_is_reference_on_cpu():
    for op in kernels.OPS:
        assert kernels.backend_for(op, "cpu") == "reference"
    x = torch.randn(3, 8)
    torch.testing.assert_close(kernels.rms_norm(x, torch.ones(8), 1e-5),
                               reference.rms_norm(x, torch.ones(8), 1e-5), rtol=0, atol=0)


def test_precedence_env_over_config(monkeypatch):
    kernels.configure(backend="reference")
    assert kernels.backend_for("attention") == "reference"
    monkeypatch.setenv("PRETRAIN_KERNEL_ATTENTION", "vendor")
    kernels.configure(backend="reference")  # re-reads the environment
    with pytest.raises(RuntimeError, match="attention.*PRETRAIN_KERNEL_ATTENTION.*flash-attn"):
        kernels.backend_for("attention")
    monkeypatch.setenv("PRETRAIN_KERNEL_ATTENTION", "auto")
    kernels.configure()
    assert kernels.backend_for("attention") == "reference"


def test_global_backend_applies_only_where_implemented():
    # attention has no Triton kernel: a global "triton" leaves it on auto.
    kernels.configure(backend="triton")
    assert kernels.backend_for("attention", "cpu") == "reference"


def test_configure_rejects_bad_names():
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        kernels.configure(backend="fast")


def test_forcing_a_missing_implementation_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PRETRAIN_KERNEL_ATTENTION", "triton")
    kernels.configure()
    with pytest.raises(ValueError) as e:
        kernels.attention(*[torch.randn(1, 4, 2, 8)] * 3)
    msg = str(e.value)
    assert "\n" not in msg and "attention" in msg and "no 'triton' implementation" in msg


def test_forcing_unavailable_paths_in_a_fresh_process():
    code = (
        "import torch, kernels\n"
        "x = torch.randn(2, 8)\n"
        "try:\n    kernels.rms_norm(x, torch.ones(8), 1e-5)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
        "try:\n    kernels.attention(*[torch.randn(1, 4, 2, 8)] * 3)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    out = _run(code, PRETRAIN_KERNELS="triton", PRETRAIN_KERNEL_ATTENTION="vendor")
    lines = [l for l in out.stdout.splitlines() if l.startswith("ERR")]
    assert len(lines) == 2, out.stdout + out.stderr
    assert "kernel 'rms_norm'" in lines[0] and "TRITON_INTERPRET=1" in lines[0] and "PRETRAIN_KERNELS" in lines[0]
    assert "kernel 'attention'" in lines[1] and "flash-attn" in lines[1] and "PRETRAIN_KERNEL_ATTENTION" in lines[1]


def test_import_is_lazy_and_triton_absence_is_detected():
    code = (
        "import sys\n"
        "import kernels\n"
        "assert 'triton' not in sys.modules and 'kernels.triton_ops' not in sys.modules\n"
        "sys.modules['triton'] = None  # as if not installed\n"
        "assert kernels.available()['triton'] is False\n"
        "import torch\n"
        "kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5)  # auto still works\n"
        "import os; os.environ['PRETRAIN_KERNEL_SWIGLU'] = 'triton'; kernels.configure()\n"
        "try:\n    kernels.swiglu(torch.randn(2), torch.randn(2))\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    out = _run(code, TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert "ERR kernel 'swiglu'" in out.stdout and "not installed" in out.stdout


def test_available_reports_booleans():
    av = kernels.available()
    assert set(av) >= {"cuda", "triton", "flash_attn", "mamba_ssm", "causal_conv1d"}
    assert all(isinstance(v, bool) for v in av.values())


# ---- cross-entropy references -------------------------------------------------------------

def test_cross_entropy_all_ignored_is_zero_and_sum_reduction():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = reference.cross_entropy(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    labels = torch.tensor([1, 2, -100, 3])
    s = reference.cross_entropy(logits, labels, reduction="sum", z_loss=1e-3)
    m = reference.cross_entropy(logits, labels, z_loss=1e-3)
    torch.testing.assert_close(s / 3, m)


def _plain(h, w, y, **kw):
    return reference.cross_entropy(h @ w.t(), y, **kw)


def _loss_and_grads(fn, h, w, y, **kw):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [0, 1, 7, 16, 64, 1000])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_loss_equals_plain(chunk, z_loss):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(3, 21, 32, generator=g)
    w = torch.randn(300, 32, generator=g) * 0.2
    y = torch.randint(0, 300, (3, 21), generator=g)
    y[0, :6] = -100
    y[2, -1] = -100
    want = _loss_and_grads(_plain, h, w, y, z_loss=z_loss)
    got = _loss_and_grads(reference.linear_cross_entropy, h, w, y, z_loss=z_loss, chunk_size=chunk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_options():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g)
    w = torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (40,), generator=g)
    y[::3] = 7  # ignore_index other than -100
    kw = dict(ignore_index=7, reduction="sum")
    want = _loss_and_grads(_plain, h, w, y, **kw)
    got = _loss_and_grads(reference.linear_cross_entropy, h, w, y, chunk_size=8, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # weight-only gradient, and no gradient work at all under no_grad
    wp = w.clone().requires_grad_()
    reference.linear_cross_entropy(h, wp, y, chunk_size=8).backward()
    torch.testing.assert_close(wp.grad, _loss_and_grads(_plain, h, w, y)[2], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(reference.linear_cross_entropy(h, w, y, chunk_size=8), _plain(h, w, y))
    with pytest.raises(ValueError, match="reduction"):
        reference.linear_cross_entropy(h, w, y, reduction="none")


def test_chunked_loss_bf16_autocast_and_tied_weight():
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(64, 32)
    tok = torch.randint(0, 64, (2, 10), generator=g)
    y = torch.randint(0, 64, (2, 10), generator=g)

    def run(fused):
        emb.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = emb(tok) * 1.0
            if fused:
                loss = reference.linear_cross_entropy(h, emb.weight, y, chunk_size=4)
            else:
                loss = reference.cross_entropy(h @ emb.weight.t(), y)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone()

    (la, ga), (lb, gb) = run(True), run(False)
    assert ga.dtype == torch.float32
    torch.testing.assert_close(la, lb, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ga, gb, rtol=2e-2, atol=2e-3)


def test_dispatched_loss_is_the_chunked_reference_on_cpu():
    h, w = torch.randn(8, 16), torch.randn(20, 16)
    y = torch.randint(0, 20, (8,))
    torch.testing.assert_close(kernels.linear_cross_entropy(h, w, y, z_loss=1e-4),
                               _plain(h, w, y, z_loss=1e-4))


# ---- attention ----------------------------------------------------------------------------

def _flash_varlen_emulation(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """flash_attn_varlen_func's contract in torch: each [cu[i], cu[i+1]) is its own sequence."""
    assert cu_seqlens_q.dtype == torch.int32 and causal
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens_q.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    for a, b in zip(bounds, bounds[1:]):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
        ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(0, 1)
    return out


def _qkv(B=2, S=12, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g), torch.randn(B, S, Hkv, D, generator=g),
            torch.randn(B, S, Hkv, D, generator=g))


DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2],
                     [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 0, 0]])


def test_recurring_id_starts_a_new_document_on_both_paths():
    docs = torch.tensor([[0, 0, 1, 1, 0, 0]])
    q, k, v = _qkv(B=1, S=6)
    ref = reference.attention(q, k, v, docs)
    torch.testing.assert_close(varlen_attention(q, k, v, docs, _flash_varlen_emulation), ref,
                               rtol=1e-5, atol=1e-5)
    assert not reference.doc_mask(docs)[0, 0, 4, :2].any()


def test_cu_seqlens_from_doc_ids():
    cu, mx = cu_seqlens_from_doc_ids(DOCS)
    assert cu.tolist() == [0, 3, 8, 12, 22, 24] and mx == 10 and cu.dtype == torch.int32


def test_varlen_path_matches_reference_doc_mask():
    q, k, v = _qkv()
    want = reference.attention(q, k, v, DOCS)
    got = varlen_attention(q, k, v, DOCS, _flash_varlen_emulation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_doc_mask_blocks_cross_document_attention():
    q, k, v = _qkv()
    base = kernels.attention(q, k, v, DOCS)
    # Perturb keys/values of document 1 in row 0: only document 1's outputs may move.
    k2, v2 = k.clone(), v.clone()
    k2[0, 3:8] += 5.0
    v2[0, 3:8] += 5.0
    out = kernels.attention(q, k2, v2, DOCS)
    moved = (out - base).abs().amax(dim=(-1, -2)) > 1e-6
    assert moved[0, 3:8].all()
    assert not moved[0, :3].any() and not moved[0, 8:].any() and not moved[1].any()
    # and the first token of each document sees only itself
    for b, s in [(0, 0), (0, 3), (0, 8), (1, 0), (1, 10)]:
        torch.testing.assert_close(base[b, s], v[b, s].repeat_interleave(2, 0))


def test_dtensor_inputs_use_the_reference_even_when_fused_is_forced():
    """Tensor-parallel norms see DTensors; the dispatcher must not hand them to Triton."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    import kernels
    from kernels import reference

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(3, 8)
        w = torch.rand(8)
        dx = distribute_tensor(x, mesh, [Replicate()])
        dw = distribute_tensor(w, mesh, [Replicate()])
        kernels.configure(backend="triton")
        try:
            out = kernels.rms_norm(dx, dw, 1e-5)
        finally:
            kernels.configure(backend="auto")
        torch.testing.assert_close(out.full_tensor(), reference.rms_norm(x, w, 1e-5))
    finally:
        if created:
            dist.destroy_process_group()
