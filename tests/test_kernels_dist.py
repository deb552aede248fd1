"""Vocab-parallel fused LM head + loss: 2 gloo processes, each holding a slice of the
vocabulary, give the loss and gradients of the unsharded computation."""

from __future__ import annotations

import os
import queue
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
V, D = 301, 24  # odd vocab: shards of 151 and 150 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    y = torch.randint(0, V, (3, 11), generator=g)
    y[0, :4] = -100
    y[2, 5] = V - 1  # a target in the last shard's last row
    return h, w, y


def _worker(rank: int, port: int, results) -> None:
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        import torch.distributed as dist

        from kernels.reference import cross_entropy
        from kernels.reference import linear_cross_entropy as reference
        from kernels.triton_ops.cross_entropy import linear_cross_entropy as triton

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD)
        group = dist.new_group(list(range(WORLD)))
        h, w, y = _data()
        kw = dict(z_loss=1e-3, chunk_size=8)

        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        want = cross_entropy(hf @ wf.t(), y, z_loss=1e-3)
        want.backward()

        lo, hi = (0, 151) if rank == 0 else (151, V)
        for fused, reduce_hidden in ((reference, True), (reference, False), (triton, True), (triton, False)):
            hs = h.clone().requires_grad_()
            ws = w[lo:hi].clone().requires_grad_()
            loss = fused(hs, ws, y, process_group=group, reduce_hidden_grad=reduce_hidden, **kw)
            loss.backward()
            gh = hs.grad
            if not reduce_hidden:  # partial grads: the caller's collective sums them
                dist.all_reduce(gh, group=group)
            what = f"{fused.__module__} reduce_hidden_grad={reduce_hidden}"
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6, msg=what)
            torch.testing.assert_close(gh, hf.grad, rtol=1e-5, atol=1e-6, msg=what)
            torch.testing.assert_close(ws.grad, wf.grad[lo:hi], rtol=1e-5, atol=1e-6, msg=what)
        dist.destroy_process_group()
        results.put((rank, "ok"))
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_vocab_parallel_loss_matches_unsharded():
    """Reference and Triton (interpreter) chunk steps, hidden grad reduced here or by the caller."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(WORLD):
            rank, msg = results.get(timeout=150)
            got[rank] = msg
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    assert got == {r: "ok" for r in range(WORLD)}, "\n".join(str(v) for v in got.values())
