"""Bytes a cp rank sends per Mamba-2 layer (forward + backward): state passing
(parallel/cp_recurrent.py) against head-parallel all-to-all (Megatron's CP for Mamba).

    python bench/bench_cp_mamba.py [--measure]

State passing: one all-gather of each piece's last K-1 pre-conv inputs (the conv halo,
activation dtype) and one of each piece's final state + log-decay (fp32); the backward
reduce-scatters their gradients. All-to-all: x/B/C/dt go from sequence- to head-sharded
before the conv+SSD and y comes back (two all-to-alls forward, two backward). Sent bytes
per rank assume ring all-gather and reduce-scatter ((W-1)/W of the gathered tensor) and
all-to-all ((W-1)/W of the local tensor).

``--measure`` runs one sharded Mamba-2 mixer forward+backward on 2 gloo processes,
records the tensors handed to the collectives, and checks the formula against them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Megatron's 8B Mamba-2-Hybrid mixer: d_model 4096, expand 2, head_dim 64, d_state 128, 8 groups
M8B = dict(d_model=4096, expand=2, head_dim=64, d_state=128, n_groups=8, d_conv=4)


def state_passing_payload(W, B, d_model, expand, head_dim, d_state, n_groups, d_conv, act_bytes=2,
                          pieces=2):
    """(halo elements, state elements) one rank hands to the two forward all-gathers."""
    d_inner = expand * d_model
    H = d_inner // head_dim
    halo = pieces * B * (d_conv - 1) * (d_inner + 2 * n_groups * d_state)
    state = pieces * B * (H * head_dim * d_state + H)
    return halo, state


def state_passing_bytes(W, S, B, act_bytes=2, **m) -> float:
    halo, state = state_passing_payload(W, B, **m)
    per = halo * act_bytes + state * 4
    fwd = (W - 1) * per  # ring all-gather of W * per
    bwd = (W - 1) * per  # ring reduce-scatter of the gathered tensor's gradient
    return fwd + bwd


def all_to_all_bytes(W, S, B, d_model, expand, head_dim, d_state, n_groups, d_conv, act_bytes=2) -> float:
    d_inner = expand * d_model
    H = d_inner // head_dim
    tokens = B * S / W
    inp = tokens * (d_inner + 2 * n_groups * d_state + H) * act_bytes
    out = tokens * d_inner * act_bytes
    return 2 * (W - 1) / W * (inp + out)  # forward and backward


def table() -> None:
    print("Mamba-2 layer of Megatron's 8B hybrid (d_model 4096, 128 heads x 64, d_state 128, 8 groups), "
          "bf16 activations, batch 1: bytes sent per cp rank per layer, forward + backward")
    print(f"{'seq':>8} {'cp':>3} {'state passing':>14} {'all-to-all':>12} {'ratio':>8}")
    for S in (8192, 32768, 131072):
        for W in (2, 4, 8):
            sp, a2a = state_passing_bytes(W, S, 1, **M8B), all_to_all_bytes(W, S, 1, **M8B)
            print(f"{S:>8} {W:>3} {sp / 2**20:>11.2f} MB {a2a / 2**20:>9.1f} MB {a2a / sp:>7.2f}x")


def _measure_rank(rank: int, world: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = []
    for name in ("all_gather", "reduce_scatter_tensor"):
        inner = getattr(dist, name)

        def wrapped(*a, _inner=inner, _name=name, **k):
            t = a[1] if _name == "all_gather" else a[0]  # the per-rank slice
            seen.append((_name, t.numel(), t.dtype))
            return _inner(*a, **k)
        setattr(dist, name, wrapped)
    from models.config import MambaConfig, ModelConfig
    from models.mamba2 import Mamba2Mixer
    from models.transformer import init_tensor  # noqa: F401  (imports the model package fully)
    from parallel.cp_recurrent import zigzag_shard

    m = dict(d_model=64, expand=2, head_dim=16, d_state=16, n_groups=2, d_conv=4)
    cfg = ModelConfig(d_model=64, pattern="M", mamba=MambaConfig(d_state=16, head_dim=16, n_groups=2,
                                                                 chunk_size=8))
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    B, S = 2, 64
    shard = zigzag_shard(dist.group.WORLD, S)  # no doc ids: no metadata gather
    x = torch.randn(B, S // world, 64, requires_grad=True)
    mixer.mix(x, None, shard=shard).sum().backward()
    halo, state = state_passing_payload(world, B, **m)
    fwd_elems = [n for name, n, _ in seen if name == "all_gather"]
    bwd_elems = [n for name, n, _ in seen if name == "reduce_scatter_tensor"]
    if rank == 0:
        out.put((fwd_elems, bwd_elems, halo, state))
    dist.destroy_process_group()


def measure() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_measure_rank, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    fwd, bwd, halo, state = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    print(f"measured on 2 gloo ranks (tiny mixer): all-gather inputs {sorted(fwd)} elements, "
          f"backward reduce-scatters {sorted(bwd)}; formula: halo {halo}, state {state}")
    ok = sorted(fwd) == sorted([halo, state]) and sorted(bwd) == sorted([halo, state])
    print("formula matches the collectives" if ok else "MISMATCH between formula and collectives")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="check the formula on 2 gloo processes")
    args = ap.parse_args()
    if args.measure:
        measure()
    table()
