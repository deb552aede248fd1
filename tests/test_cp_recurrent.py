"""Context parallelism for Mamba-2, ``P`` and Gated DeltaNet mixers (parallel/cp_recurrent.py): state passing
and conv halos give the one-process losses, gradients and weights.

One torchrun per world size (tests/test_cp_recurrent_worker.py) trains each model for 10
steps on real text with the sequence split in zig-zag chunks; this process compares with
one-process training (final weights within 10x a measured noise floor, see ``compare``).
Documents start exactly at, just after and just before chunk boundaries; SSD's
chunk_size (12) divides no cp chunk (32 or 16 tokens). The ``delta`` jobs check the
mechanism's matrix transitions (for delta-rule mixers) on a toy gated delta rule.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from torchrun_jobs import job_result, run_jobs  # noqa: E402

STEPS = 10
MAMBA = dict(d_state=16, head_dim=16, n_groups=2, chunk_size=12)
HYBRID = dict(pattern="M-*-", n_layers=1, mamba=MAMBA)  # 8 Mamba heads of 16, 2 groups
HEADS = dict(pattern="P-", mamba=MAMBA, hybrid=dict(n_attn_heads=4, n_mamba_heads=4))
# Gated DeltaNet: 2 q/k heads, 4 value heads of 16 (chunk 12 divides no cp chunk either)
GDN = dict(pattern="G-*-", n_layers=1, gdn=dict(n_heads=2, n_v_heads=4, head_k_dim=16, head_v_dim=16,
                                                chunk_size=12))
JOBS = {2: [{"name": "hybrid_cp2", "model": HYBRID}, {"name": "heads_cp2", "model": HEADS},
            {"name": "delta_cp2", "kind": "delta"}, {"name": "gdn_cp2", "model": GDN}],
        4: [{"name": "hybrid_cp4", "model": HYBRID}, {"name": "delta_cp4", "kind": "delta"}]}
TOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4])
def results(request, tiny_dataset, tmp_path_factory):
    import torch

    from test_cp_recurrent_worker import batches

    cp, tmp = request.param, tmp_path_factory.mktemp(f"cp{request.param}")
    data = batches(str(tiny_dataset), STEPS, cp)
    torch.save(data, tmp / "batches.pt")
    jobs = [{**j, "batches": str(tmp / "batches.pt"), "out": str(tmp)} for j in JOBS[cp]]
    return cp, data, run_jobs("test_cp_recurrent_worker.py", cp, jobs, tmp, timeout=480)


def compare(model: dict, saved: str, data: list[dict]) -> dict:
    """Max differences of a cp run from one process, and the one-process noise floor."""
    import torch

    from test_cp_recurrent_worker import max_diff, train

    torch.set_num_threads(1)
    got = torch.load(saved)
    want = train(model, data, 1)
    # noise floor: one process again with SSD's chunk_size changed (same maths, other
    # summation order); AdamW turns rounding in near-zero gradients into lr-sized steps
    sec = "gdn" if "gdn" in model else "mamba"
    floor = train({**model, sec: {**model[sec], "chunk_size": 8}}, data, 1)
    g, gname = max_diff(got["grads"], want["grads"])
    w, wname = max_diff(got["weights"], want["weights"])
    return {"losses": got["losses"], "ref_losses": want["losses"],
            "loss_diff": max(abs(a - b) for a, b in zip(got["losses"], want["losses"])),
            "grad_diff": g, "grad_worst": gname, "grad_noise": max_diff(floor["grads"], want["grads"])[0],
            "grad_scale": max(float(t.abs().max()) for t in want["grads"].values()),
            "weight_diff": w, "weight_worst": wname, "weight_noise": max_diff(floor["weights"], want["weights"])[0],
            "n_params": len(want["grads"])}


@pytest.mark.timeout(900)
def test_recurrent_cp_matches_one_process(results):
    cp, data, res = results
    for job in JOBS[cp]:
        name = job["name"]
        r = job_result(res, name)
        if name.startswith("delta"):  # matrix transitions (a gated delta rule), fp64
            print(f"{name}: output diff {r['out_diff']:.1e}, input grad diffs {r['grad_diffs']}")
            assert r["out_diff"] < 1e-12 and max(r["grad_diffs"].values()) < 1e-12, r
            continue
        r = compare(job["model"], r["saved"], data)
        print(f"{name}: loss diff {r['loss_diff']:.2e}, grad diff {r['grad_diff']:.2e} "
              f"({r['grad_worst']}, grads up to {r['grad_scale']:.2e}; noise floor {r['grad_noise']:.2e}), "
              f"weight diff {r['weight_diff']:.2e} (noise floor {r['weight_noise']:.2e})")
        assert len(r["losses"]) == STEPS and r["n_params"] > 10
        assert r["losses"][-1] < r["losses"][0] - 0.5, r["losses"]  # it learns the text
        assert r["loss_diff"] <= TOL, (name, r["losses"], r["ref_losses"])
        assert r["grad_diff"] <= TOL, (name, r["grad_worst"])
        # AdamW amplifies rounding in near-zero gradients: 10x the measured floor at most
        assert r["weight_diff"] <= max(TOL, 10 * r["weight_noise"]), (name, r["weight_worst"])


def test_initial_state_contribution_is_linear():
    """``ssd(initial_state=S) == ssd() + ssd_state_output(S)``, with document resets, in fp64:
    what lets a cp rank add the state entering its chunk after the fact."""
    import torch

    from kernels.ssd import ssd_chunked, ssd_state_output

    g = torch.Generator().manual_seed(0)
    b, L, H, P, G, N = 2, 37, 4, 8, 2, 16
    x = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(b, L, H, generator=g, dtype=torch.float64) * 0.2
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 4
    B, C = (torch.randn(b, L, G, N, generator=g, dtype=torch.float64) for _ in range(2))
    S = torch.randn(b, H, P, N, generator=g, dtype=torch.float64)
    ids = torch.zeros(b, L, dtype=torch.long)
    ids[0, 20:] = 1  # row 0: a document starts at 20; row 1: one document
    for seq_idx in (ids, None):
        want = ssd_chunked(x, dt, A, B, C, 8, seq_idx=seq_idx, initial_state=S)
        got = ssd_chunked(x, dt, A, B, C, 8, seq_idx=seq_idx) + ssd_state_output(C, dt, A, S, seq_idx)
        assert (got - want).abs().max() < 1e-12
    assert ssd_state_output(C, dt, A, S, ids)[0, 20:].abs().max() == 0
