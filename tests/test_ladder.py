"""Ladder residual under tensor parallelism (parallel/ladder.py) and ``pretrain convert-ladder``.

Multi-process jobs run under torchrun (tests/test_ladder_worker.py, the shared
tests/test_parallel_worker.py infra); the reference runs in this process with world size 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import test_parallel_worker  # noqa: E402
from torchrun_jobs import assert_steps_close, job_result, run_jobs  # noqa: E402

STEPS = 3  # these jobs check the asynchronous reductions; ladder parity: tests/test_parity.py
LADDER = {"residual": "ladder"}
LADDER_FROM2 = {"residual": "ladder", "ladder_from": 2}  # sublayers 0, 1 standard
LADDER_MOE = {"residual": "ladder", "pattern": "*E", "moe": {"n_experts": 4, "top_k": 2}}
TP2 = {"tp": 2, "dp_shard": 1}
JOBS_2 = [
    # first in the process: run after the other ladder jobs of this list, inductor fails on
    # it ("device_mesh._get_submesh is not an OpOverload"; alone or first it passes) - a known
    # gap, see the session 4 note
    {"name": "tp2_ladder_compile", "layout": TP2, "model": LADDER, "kw": {"compile": True}, "steps": 3},
    {"name": "tp2_ladder", "layout": TP2, "model": LADDER, "steps": STEPS},
    {"name": "tp2_sp_ladder", "layout": {**TP2, "sequence_parallel": True}, "model": LADDER, "steps": STEPS},
    {"name": "tp2_ladder_ac", "layout": TP2, "model": LADDER, "kw": {"ac": "full"}, "steps": 3},
    {"name": "tp2_ladder_from2", "layout": TP2, "model": LADDER_FROM2, "steps": STEPS},
    {"name": "tp2_sp_ladder_moe", "layout": {**TP2, "sequence_parallel": True}, "model": LADDER_MOE, "steps": 3},
    {"name": "tp2_standard", "layout": TP2, "steps": 3},
]
JOBS_4 = [
    {"name": "pp2_tp2_sp_ladder", "layout": {"pp": 2, "tp": 2, "dp_shard": 1, "sequence_parallel": True},
     "model": LADDER, "steps": STEPS},  # the pending output crosses the stage boundary
    {"name": "tp2_dp_shard2_ladder", "layout": {"tp": 2, "dp_shard": 2}, "model": LADDER, "steps": 2},
]
# deferred input-gradient reductions (not under torch.compile, which schedules its own)
DEFERRED_JOBS = [j["name"] for j in JOBS_2 + JOBS_4
                 if j.get("model") in (LADDER, LADDER_FROM2, LADDER_MOE) and "compile" not in j.get("kw", {})]


def torchrun(nproc: int, jobs: list[dict], tmp, timeout: float) -> dict:
    return run_jobs("test_ladder_worker.py", nproc, jobs, tmp, timeout)


@pytest.fixture(scope="module")
def ref(parity_tokens):
    torch.set_num_threads(1)
    return {"ladder": test_parallel_worker.run_layout({}, STEPS, LADDER), "standard": test_parallel_worker.run_layout({}, 3)}


@pytest.fixture(scope="module")
def results(parity_tokens, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ladder")
    out = torchrun(2, JOBS_2, tmp, 240)
    out.update(torchrun(4, JOBS_4, tmp, 200))
    return out


_job = job_result


_close = assert_steps_close


@pytest.mark.timeout(500)
@pytest.mark.parametrize("name", DEFERRED_JOBS)
def test_input_gradient_reduction_overlaps_the_previous_sublayer(results, name):
    """Sublayer k's input-gradient reduction is issued, then sublayer k-1's backward runs
    (its own reduction is issued, or done synchronously if it starts the stage) and only
    then is k's waited; each is waited exactly once."""
    res = _job(results, name)
    assert all(n > 0 for n in res["grad_issued"]), res["grad_issued"]
    total_waits = 0
    for trace in res["per_rank_trace"]:
        trace = [tuple(e) for e in trace]  # JSON made them lists
        issued_at = {}
        waits = 0
        for i, (event, k) in enumerate(trace):
            if event == "issue":
                assert k not in issued_at, trace  # the previous one was waited first
                issued_at[k] = i
            elif event == "wait":
                j = issued_at.pop(k)
                between = trace[j + 1:i]
                if any(e[1] == k - 1 for e in trace):  # (an MoE sublayer has no boundary events)
                    assert ("issue", k - 1) in between or ("sync", k - 1) in between, (k, trace)
                waits += 1
        assert not issued_at and waits == sum(e == "issue" for e, _ in trace), trace
        total_waits += waits
    assert total_waits > 0  # (a pipeline stage holding one sublayer has nothing to defer)


@pytest.mark.timeout(500)
def test_compiled_ladder_keeps_input_gradients_synchronous(results):
    assert _job(results, "tp2_ladder_compile")["grad_issued"] == [0, 0, 0]


@pytest.mark.timeout(500)
@pytest.mark.parametrize("name", DEFERRED_JOBS)
def test_async_reductions_are_all_waited(results, name):
    res = _job(results, name)
    # 2 layers x (attention + MLP), each stage holds its share; micro-batches x (train fwd
    # [+ recompute]); every one of them was issued asynchronously and waited by step end
    assert all(n > 0 for n in res["issued"]), res["issued"]
    assert all(p == [0] * len(res["loss"]) for p in res["per_rank_pending"]), res["per_rank_pending"]


@pytest.mark.timeout(500)
def test_standard_mode_stays_synchronous_and_differs(results, ref):
    std = _job(results, "tp2_standard")
    assert std["issued"] == [0, 0, 0] and std["grad_issued"] == [0, 0, 0]
    _close(std["loss"], ref["standard"]["loss"], 1e-5)
    lad = _job(results, "tp2_ladder")
    # same data, same init: by step 3 ladder and standard differ by 10x more than the same
    # mode differs between layouts (at least 4 fp32 ulps of the loss), so the mode really
    # applied under tp
    noise = max(max(abs(a - b) for a, b in zip(std["loss"], ref["standard"]["loss"])),
                4 * abs(std["loss"][2]) * 2.0 ** -23)
    print(f"ladder - standard at step 3: {abs(lad['loss'][2] - std['loss'][2]):.2e}; layout noise {noise:.2e}")
    assert abs(lad["loss"][2] - std["loss"][2]) > 10 * noise
    assert abs(ref["ladder"]["loss"][2] - ref["standard"]["loss"][2]) > 10 * noise


# ---- pretrain convert-ladder ------------------------------------------------------------

def _standard_checkpoint(tmp_path: Path) -> Path:
    from models.transformer import build_model
    from pretrain.config import load_config
    from pretrain.convert import write_weights_checkpoint

    cfg = load_config("tiny", [f"--logging.run_dir={tmp_path / 'std'}", f"--data.path={tmp_path / 'nodata'}"])
    model = build_model(cfg.model, seed=3)
    write_weights_checkpoint(str(tmp_path / "std"), cfg, model, None)
    return tmp_path / "std"


def _sublayer_io(model, tokens):
    """Inputs and outputs of every sublayer during one forward."""
    io, hooks = {}, []
    for name, layer in model.layers.items():
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, name=name: io.__setitem__(int(name), (a[0].detach(), o.detach()))))
    logits = model(tokens)
    for h in hooks:
        h.remove()
    return io, logits.detach()


@pytest.mark.timeout(120)
def test_convert_ladder_keeps_sublayers_below_index(tmp_path):
    from pretrain.convert import ladder_main
    from pretrain.evaluate import load_for_inference

    src = _standard_checkpoint(tmp_path)
    cfg, std, _ = load_for_inference(str(src))
    n = cfg.model.n_sublayers
    assert n >= 3
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    std_io, std_logits = _sublayer_io(std, tokens)
    for start in (1, n - 2, n - 1):
        out = tmp_path / f"ladder{start}"
        assert ladder_main(["--checkpoint", str(src), "--out", str(out), "--from", str(start)]) == 0
        lcfg, lad, _ = load_for_inference(str(out))
        assert (lcfg.model.residual, lcfg.model.ladder_from) == ("ladder", start)
        sd, lsd = std.state_dict(), lad.state_dict()
        assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
        io, logits = _sublayer_io(lad, tokens)
        # sublayers 0..start read the same stream as the standard model (the first ladder
        # sublayer's predecessor was already added) and so compute the same output
        for j in range(start + 1):
            assert torch.equal(io[j][0], std_io[j][0]) and torch.equal(io[j][1], std_io[j][1]), j
        if start + 1 < n:
            assert not torch.allclose(io[start + 1][0], std_io[start + 1][0])
            assert not torch.allclose(logits, std_logits, atol=1e-5)
        else:  # ladder on the last sublayer only: its output is added right away, as standard
            assert torch.allclose(logits, std_logits, atol=1e-6)


def test_convert_ladder_rejects_bad_input(tmp_path):
    from pretrain.convert import ladder_main
    from pretrain.errors import UserError

    src = _standard_checkpoint(tmp_path)
    with pytest.raises(UserError, match="--from"):
        ladder_main(["--checkpoint", str(src), "--out", str(tmp_path / "a"), "--from", "99"])
    ladder_main(["--checkpoint", str(src), "--out", str(tmp_path / "b"), "--from", "0"])
    with pytest.raises(UserError, match="already a 'ladder'"):
        ladder_main(["--checkpoint", str(tmp_path / "b"), "--out", str(tmp_path / "c")])
