"""Expert parallelism on gloo: expert weights and Adam state are sharded over ep and edp,
the all-to-all handles uneven and empty splits, expert FSDP reduces in the last micro-batch
only, metrics report load and volume, and checkpoints move between expert layouts. (Layout
parity under ep, with tp, sp, pp, edp, HSDP and both MoE presets: tests/test_parity.py.)

One torchrun per world size (2 and 4 processes) runs all jobs in sequence on one process
group (tests/test_parallel_moe_worker.py, built on tests/test_parallel_worker.py); the
reference runs in this process with world size 1.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT
from models.config import UserError

sys.path.insert(0, str(ROOT / "tests"))
import test_parallel_moe_worker  # noqa: E402
from torchrun_jobs import assert_steps_close, job_result, run_jobs  # noqa: E402

STEPS = 10
SAVE_AT = 5  # checkpoint step of the cross-layout resume jobs
EP2 = {"dp_shard": 2, "ep": 2}
EDP2 = {"dp_shard": 4, "ep": 2}  # edp = 2: experts FSDP-sharded over 2 ranks
CKPT = "ckpt_ep2"  # saved by the 2-process run at ep=2, loaded by the later ones
CKPT_EDP2 = "ckpt_edp2"  # saved at (edp, ep) = (2, 2), loaded in this process
MEM = {"preset": "mixtral", "steps": 2}  # jobs for sharding, memory and metrics checks
# Layout parity under expert parallel (loss, gradients, weights, expert biases): tests/test_parity.py.
JOBS_2 = [
    {"name": "comm_uneven", "kind": "comm"},
    {"name": "mixtral_ep2", "layout": EP2, **MEM},
    # save at ep=2, resume at ep=1 (dp_shard=2): experts go from ep shards to FSDP over dp
    {"name": "resume_ep2_to_ep1_dp2", "kind": "resume", "save": EP2, "load": {"dp_shard": 2}},
]
JOBS_4 = [
    {"name": "mixtral_ep2_tp2", "layout": {**EP2, "tp": 2}, **MEM},
    {"name": "mixtral_ep2_pp2", "layout": {**EP2, "pp": 2}, **MEM},
    {"name": "mixtral_ep2_edp2", "layout": EDP2, **MEM},
    {"name": "mixtral_ep2_hsdp2", "layout": {"dp_replicate": 2, **EP2}, **MEM},
    {"name": "edp2_nosync", "kind": "nosync", "layout": EDP2, "preset": "mixtral"},
    # the ep=2 checkpoint into experts sharded over (edp, ep) = 2 x 2, and a checkpoint of
    # those for one process
    {"name": "resume_ep2_to_edp2", "kind": "resume", "save": None, "load": EDP2},
    {"name": "save_edp2", "kind": "resume", "save": EDP2, "load": None, "ckpt": CKPT_EDP2},
]


def _torchrun(nproc: int, jobs: list[dict], tmp, timeout: float) -> dict:
    ckpt = {"save_at": SAVE_AT, "steps": STEPS, "preset": "mixtral"}
    jobs = [{**ckpt, **j, "dir": str(tmp / j.get("ckpt", CKPT))} if j.get("kind") == "resume" else j
            for j in jobs]
    return run_jobs("test_parallel_moe_worker.py", nproc, jobs, tmp, timeout, steps=STEPS)


@pytest.fixture(scope="module")
def ref(parity_tokens):
    import torch

    torch.set_num_threads(1)
    return {"mixtral": test_parallel_moe_worker.run_moe({}, "mixtral", STEPS)}


@pytest.fixture(scope="module")
def results(parity_tokens, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel_moe")
    out = _torchrun(2, JOBS_2, tmp, 400)
    out.update(_torchrun(4, JOBS_4, tmp, 600))
    out["tmp"] = str(tmp)
    return out


_job = job_result


_close = assert_steps_close


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,shards", [("mixtral_ep2", 2), ("mixtral_ep2_hsdp2", 2), ("mixtral_ep2_edp2", 4),
                                         ("mixtral_ep2_tp2", 2)])
def test_expert_weights_and_adam_state_are_sharded_over_ep_and_edp(results, name, shards):
    mem = _job(results, name)["expert_memory"]
    assert mem["local"] * shards == mem["total"], mem
    assert mem["adam_state"] == 2 * mem["local"], mem


@pytest.mark.timeout(600)
def test_expert_fsdp_reduces_only_in_the_last_micro_batch(results):
    first, last = _job(results, "edp2_nosync")["has_grad"]
    assert first and not any(first) and all(last)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["resume_ep2_to_ep1_dp2", "resume_ep2_to_edp2"])
def test_resume_across_expert_layouts(results, ref, name):
    _close(_job(results, name)["loss"], ref["mixtral"]["loss"][SAVE_AT:], 1e-5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ckpt", [CKPT, CKPT_EDP2])
def test_resume_expert_parallel_checkpoint_in_one_process(results, ref, ckpt):
    _job(results, "save_edp2")
    res = test_parallel_moe_worker.run_resume(None, {}, f"{results['tmp']}/{ckpt}", "mixtral", SAVE_AT, STEPS)
    _close(res["loss"], ref["mixtral"]["loss"][SAVE_AT:], 1e-5)


@pytest.mark.timeout(600)
def test_all_to_all_with_uneven_and_empty_splits(results):
    res = _job(results, "comm_uneven")
    assert res["out_err"] == 0.0 and res["grad_err"] == 0.0
    per_rank = res["local_counts"]
    assert 0 in res["send_counts"] and len({sum(c) for c in per_rank}) > 1, res


@pytest.mark.timeout(600)
def test_step_metrics_report_moe_load_and_all_to_all_volume(results):
    m = _job(results, "mixtral_ep2")["metrics"]
    assert {"moe/1/load_max_mean", "moe/1/dropped", "moe/1/aux_loss", "moe/1/z_loss"} <= m.keys()
    assert m["moe/a2a_bytes_last_micro"] > 0
    m = _job(results, "mixtral_ep2_pp2")["metrics"]  # rank 0 holds stage 0 only
    assert {"moe/1/load_max_mean", "moe/3/load_max_mean"} <= m.keys()


def test_ep_must_divide_dp_shard_and_experts():
    from parallel import ParallelConfig, resolve_layout
    from parallel.expert_parallel import check_ep

    with pytest.raises(UserError, match=r"parallel.ep: 3 does not divide parallel.dp_shard\*cp = 4\*1"):
        resolve_layout(ParallelConfig(ep=3), 4)
    assert resolve_layout(ParallelConfig(ep=2, tp=2), 8)["dp_shard"] == 4
    with pytest.raises(UserError, match="parallel.ep: 3 does not divide model.moe.n_experts=8"):
        check_ep(test_parallel_moe_worker.moe_model_cfg("mixtral"), 3)


def test_deepspeed_rejects_expert_parallel():
    from parallel import ParallelConfig
    from parallel.deepspeed_engine import check_layout
    from parallel.world import World

    with pytest.raises(UserError, match="parallel.ep: must be 1 with parallel.dp_engine=deepspeed"):
        check_layout(ParallelConfig(ep=2, dp_engine="deepspeed"), World(world_size=4, dp_size=4))


@pytest.mark.timeout(300)
def test_expert_parallel_training_end_to_end(tiny_dataset, tmp_path):
    """``pretrain launch local`` with ep=2: the trainer logs per-layer expert load and the
    all-to-all volume, checkpoints, and the checkpoint evaluates in one process."""
    import json
    import os
    import subprocess

    from conftest import tiny_overrides
    from pretrain import checkpoint as ckpt
    from pretrain.metrics import read_metrics

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = ["launch", "local", "--nproc", "2", "moe_mixtral_tiny",
            *tiny_overrides(tiny_dataset, run, **{"train.steps": 4, "checkpoint.every": 4,
                                                  "parallel.dp_shard": 2, "parallel.ep": 2})]
    p = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    recs = read_metrics(run)
    assert [r["step"] for r in recs if "loss" in r][-1] == 4
    last = [r for r in recs if "loss" in r][-1]
    assert last["moe/a2a_bytes_last_micro"] > 0
    assert any(k.startswith("moe/") and k.endswith("/load_max_mean") for k in last), sorted(last)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4]
    p = subprocess.run([sys.executable, "-m", "pretrain", "eval", "--checkpoint", str(run), "--batches", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["loss"] > 0
