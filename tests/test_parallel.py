"""Multi-dimensional parallelism on gloo: checkpoints resume across layouts, initial weights do
not depend on the layout, gradients are reduced once per step, the trainer under torchrun,
and the layout checks. (Every layout's parity with one process: tests/test_parity.py.)

One torchrun per world size (2, 4 processes) runs the jobs in sequence on one process group
(tests/test_parallel_worker.py); the reference runs in this process with world size 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides
from models.config import UserError

sys.path.insert(0, str(ROOT / "tests"))
import test_parallel_worker  # noqa: E402
from torchrun_jobs import assert_steps_close, job_result, run_jobs  # noqa: E402

STEPS = 10
PP = {"pp": 2, "dp_shard": 1}
SAVE_AT = 5

# Layout parity (every layout's loss, gradients and weights against one process) lives in
# tests/test_parity.py; these jobs check resuming across layouts, initial weights and when
# gradients are reduced.
JOBS_2 = [
    {"name": "resume_into_pp2_zbv", "kind": "resume", "save": None,
     "load": {**PP, "pp_schedule": "zbv"}, "save_at": SAVE_AT, "steps": SAVE_AT + 2},
    {"name": "gradsync_shard", "kind": "gradsync", "layout": {"dp_shard": 2}},
    {"name": "gradsync_replicate", "kind": "gradsync", "layout": {"dp_replicate": 2, "dp_shard": 1}},
]
JOBS_4 = [
    {"name": "init_tp2_dp_shard2", "kind": "init", "layout": {"tp": 2, "dp_shard": 2}},
    {"name": "resume_pp2tp2_to_dp_shard4", "kind": "resume",
     "save": {"pp": 2, "tp": 2, "dp_shard": 1, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2},
     "load": {"dp_shard": 4}, "save_at": SAVE_AT, "steps": STEPS},
]


def torchrun(nproc: int, jobs: list[dict], tmp, timeout: float) -> dict:
    return run_jobs("test_parallel_worker.py", nproc, jobs, tmp, timeout, steps=STEPS)


@pytest.fixture(scope="module")
def ref(parity_tokens):
    import torch

    torch.set_num_threads(1)
    return {"base": test_parallel_worker.run_layout({}, STEPS)}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def results(parity_tokens, tmp_path_factory, ckpt_dir):
    tmp = tmp_path_factory.mktemp("parallel")
    for j in JOBS_4 + JOBS_2:
        if j.get("kind") == "resume":
            j["dir"] = str(ckpt_dir)
    out = {}
    out.update(torchrun(4, JOBS_4, tmp, 300))  # first: it writes the checkpoint
    out.update(torchrun(2, JOBS_2, tmp, 240))
    return out


_check_job = job_result


_close = assert_steps_close


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["gradsync_shard", "gradsync_replicate"])
def test_gradient_accumulation_reduces_only_on_last_micro_batch(results, name):
    counts = _check_job(results, name)["per_microbatch"]
    assert counts[:-1] == [0, 0] and counts[-1] > 0, counts


@pytest.mark.timeout(900)
def test_initial_weights_do_not_depend_on_layout(results):
    assert _check_job(results, "init_tp2_dp_shard2")["max_abs_diff"] == 0.0


@pytest.mark.timeout(900)
def test_checkpoint_resumes_across_layouts(results, ref, ckpt_dir):
    # saved under pp=2 x tp=2 (two virtual stages per rank), resumed under dp_shard=4 ...
    res = _check_job(results, "resume_pp2tp2_to_dp_shard4")
    _close(res["loss"], ref["base"]["loss"][SAVE_AT:], 1e-5)
    # ... under pp=2 with two stages per rank (zbv) ...
    res = _check_job(results, "resume_into_pp2_zbv")
    _close(res["loss"], ref["base"]["loss"][SAVE_AT:SAVE_AT + 2], 1e-5)
    # ... and in one process
    single = test_parallel_worker.run_resume(None, {}, str(ckpt_dir), SAVE_AT, SAVE_AT + 2)
    _close(single["loss"], ref["base"]["loss"][SAVE_AT:SAVE_AT + 2], 1e-5)


# ---- the real trainer under torchrun ------------------------------------------------------

def _torchrun_train(tiny_dataset, run_dir, **overrides):
    args = ["--nproc_per_node", "2", "-m", "pretrain", "train", "tiny",
            *tiny_overrides(tiny_dataset, run_dir, **{"parallel.pp": 2, "parallel.dp_shard": 1, **overrides})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True,
                       text=True, timeout=240, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]


@pytest.mark.timeout(420)
def test_trainer_resumes_single_process_run_under_pipeline_parallel(tiny_dataset, tmp_path):
    """A one-process checkpoint resumed under pp=2, then that run's own pp=2 checkpoint resumed
    under pp=2 again (its optimizer groups differ per stage); both continue the single run."""
    from pretrain.config import load_config
    from pretrain.metrics import read_metrics
    from pretrain.train import train

    single = tmp_path / "single"
    train(load_config("tiny", tiny_overrides(tiny_dataset, single, **{"train.steps": 6, "checkpoint.every": 3})))
    pp = tmp_path / "pp"
    _torchrun_train(tiny_dataset, pp, **{"train.steps": 6, "checkpoint.every": 2,
                                         "checkpoint.resume": single / "checkpoints" / "step_3"})
    want = {r["step"]: r for r in read_metrics(single)}
    got = read_metrics(pp)
    assert [r["step"] for r in got] == [4, 5, 6]
    for r in got:
        _close([r["loss"], r["grad_norm"]], [want[r["step"]]["loss"], want[r["step"]]["grad_norm"]], 1e-5)
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((pp / "summary.json").read_text())
    assert abs(s1["val_loss"] - s2["val_loss"]) <= 1e-5 * s1["val_loss"]

    again = tmp_path / "pp_again"
    _torchrun_train(tiny_dataset, again, **{"train.steps": 6, "checkpoint.resume": pp / "checkpoints" / "step_4"})
    resumed = read_metrics(again)
    assert [r["step"] for r in resumed] == [5, 6]
    for r in resumed:  # same layout, same order of operations: equal to the uninterrupted pp=2 run
        assert (r["loss"], r["grad_norm"]) == (got[r["step"] - 4]["loss"], got[r["step"] - 4]["grad_norm"])
    assert json.loads((again / "summary.json").read_text())["val_loss"] == s2["val_loss"]


@pytest.mark.timeout(120)
def test_cli_rejects_layout_that_does_not_fit_the_world(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "pretrain", "train", "tiny",
                        *tiny_overrides(tmp_path / "nodata", tmp_path / "r", **{"parallel.tp": 2})],
                       capture_output=True, text=True, timeout=100, env=env, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: parallel:"), p.stderr


# ---- layout checks and stage splitting (no processes) -------------------------------------

def _pcfg(**kw):
    from parallel import ParallelConfig

    return ParallelConfig(**kw)


@pytest.mark.parametrize("kw,world,needle", [
    ({"tp": 3}, 4, "parallel: pp*dp_replicate*cp*tp = 1*1*1*3 = 3 does not divide the world size 4"),
    ({"tp": 2, "dp_shard": 1}, 4, "parallel: pp*dp_replicate*dp_shard*cp*tp = 1*1*1*1*2 = 2 does not match"),
    ({"cp": 4}, 6, "parallel.cp: 4 does not divide the world size 6"),
])
def test_layout_must_fit_world(kw, world, needle):
    from parallel import resolve_layout

    with pytest.raises(UserError) as e:
        resolve_layout(_pcfg(**kw), world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_dp_shard_fills_the_rest():
    from parallel import resolve_layout

    assert resolve_layout(_pcfg(pp=2, tp=2), 16) == {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}


@pytest.mark.parametrize("model,layout,needle", [
    ({}, {"tp": 8}, "parallel.tp: 8 does not divide model.n_heads=4"),
    ({"n_heads": 12, "n_kv_heads": 4, "d_model": 96, "vocab_size": 516}, {"tp": 6}, "model.n_kv_heads=4 must divide"),
    ({"vocab_size": 513}, {"tp": 2}, "model.vocab_size=513"),
    ({"ffn_hidden": 102}, {"tp": 4}, "MLP hidden size 102"),
    ({}, {"pp": 8}, "parallel.pp: 8 pipeline stages but the model has only 4 sublayers"),
    ({"pattern": "*-|"}, {"pp": 4}, "model.pattern: its '|' marks cut 2 pipeline stages"),
    ({}, {"pp": 2, "pp_virtual_stages": 2}, "parallel.pp_virtual_stages: 2 needs pp_schedule"),
    ({"tie_embeddings": True}, {"pp": 2}, "model.tie_embeddings"),
    ({}, {"pp": 2, "pp_schedule": "zbv", "dp_shard": 2}, "parallel.pp_schedule: zbv does not compose"),
    ({"pattern": "*E", "moe": {"n_experts": 4, "top_k": 2}}, {"pp": 2, "pp_schedule": "zbv"},
     "zbv does not compose with MoE sublayers"),
])
def test_model_must_divide_layout(model, layout, needle):
    from parallel import World, check_layout
    from models.transformer import build_model

    m = build_model(test_parallel_worker.model_cfg(**model), init=False)
    w = World(tp_size=layout.get("tp", 1), pp_size=layout.get("pp", 1), dp_size=layout.get("dp_shard", 1))
    with pytest.raises(UserError) as e:
        check_layout(m, _pcfg(**layout), w)
    msg = str(e.value)
    assert msg.startswith(("parallel.", "model.")) and "\n" not in msg
    if needle:
        assert needle in msg, msg


def test_unknown_sublayer_kind_has_no_tp_plan(monkeypatch):
    from parallel import tp, tp_plans

    monkeypatch.delitem(tp_plans.TP_PLANS, "mlp")
    with pytest.raises(UserError, match="sublayer kind 'mlp' has no tensor-parallel plan"):
        tp_plans.check_tp(test_parallel_worker.model_cfg(), 2)


def test_stage_split_by_marks_and_by_cost():
    from parallel.pipeline import split_stages

    cfg = test_parallel_worker.model_cfg(n_layers=3, pattern="*-|")  # marks at 2, 4 (and a trailing one, ignored)
    assert split_stages(cfg, 3, [1.0] * 6, 0, 0) == [[0, 1], [2, 3], [4, 5]]
    cfg = test_parallel_worker.model_cfg(n_layers=4)
    assert split_stages(cfg, 2, [1.0] * 8, 0, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # the LM head's cost moves sublayers off the last stage
    assert split_stages(cfg, 2, [1.0] * 8, 0, 2.0) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert split_stages(cfg, 4, [3, 1, 1, 1, 1, 1, 1, 3], 0, 0) == [[0], [1, 2, 3], [4, 5, 6], [7]]
