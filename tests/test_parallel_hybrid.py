"""Mamba-2 and hybrid-heads models under tensor, sequence, pipeline and data parallelism.

Like tests/test_parallel.py: one torchrun of 2 processes runs every layout in sequence
on one process group (tests/test_parallel_hybrid_worker.py), and each loss curve must
equal the single-process one.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT
from models.config import ConfigError

sys.path.insert(0, str(ROOT / "tests"))
import test_parallel_hybrid_worker as H  # noqa: E402
import test_parallel_worker as W  # noqa: E402
from test_parallel import _check_job, _close  # noqa: E402
from torchrun_jobs import run_jobs  # noqa: E402

STEPS = 10
TP2 = {"tp": 2, "dp_shard": 1}
TP2_SP = {**TP2, "sequence_parallel": True}
JOBS = [
    {"name": "hybrid_tp2", "layout": TP2, "model": H.HYBRID},
    {"name": "hybrid_tp2_sp", "layout": TP2_SP, "model": H.HYBRID},
    {"name": "hybrid_pp2", "layout": {"pp": 2, "dp_shard": 1}, "model": H.HYBRID},
    # 4 stages of one sublayer each: a cut after every sublayer of "M-*-"
    {"name": "hybrid_pp2_interleaved", "layout": {"pp": 2, "dp_shard": 1, "pp_schedule": "interleaved_1f1b",
                                                  "pp_virtual_stages": 2}, "model": H.HYBRID, "steps": 4},
    {"name": "hybrid_dp_shard2", "layout": {"dp_shard": 2}, "model": H.HYBRID},
    {"name": "heads_tp2", "layout": TP2, "model": H.HEADS},
    {"name": "heads_tp2_sp", "layout": TP2_SP, "model": H.HEADS, "steps": 4},
    # ladder residual: Mamba-2 and P sublayers defer their reductions too (parallel/ladder.py)
    {"name": "hybridladder_tp2_sp", "layout": TP2_SP, "model": {**H.HYBRID, "residual": "ladder"}, "steps": 5},
    {"name": "headsladder_tp2", "layout": TP2, "model": {**H.HEADS, "residual": "ladder"}, "steps": 5},
]
SAVE_AT = 5
OTHER_JOBS = [
    {"name": "init_hybrid_tp2", "kind": "init", "layout": TP2, "model": H.HYBRID},
    {"name": "init_heads_tp2", "kind": "init", "layout": TP2, "model": H.HEADS},
    # out_proj of P keeps its canonical layout: a tp checkpoint loads under other layouts
    {"name": "resume_heads_tp2_to_dp_shard2", "kind": "resume", "model": H.HEADS, "save": TP2_SP,
     "load": {"dp_shard": 2}, "save_at": SAVE_AT, "steps": SAVE_AT + 2},
]


def torchrun(nproc: int, jobs: list[dict], tmp, timeout: float) -> dict:
    return run_jobs("test_parallel_hybrid_worker.py", nproc, jobs, tmp, timeout, steps=STEPS)


@pytest.fixture(scope="module")
def ref():
    import torch

    torch.set_num_threads(1)
    return {"hybrid": W.run_layout({}, STEPS, H.HYBRID), "heads": W.run_layout({}, STEPS, H.HEADS),
            "hybridladder": W.run_layout({}, 5, {**H.HYBRID, "residual": "ladder"}),
            "headsladder": W.run_layout({}, 5, {**H.HEADS, "residual": "ladder"})}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_hybrid")


@pytest.fixture(scope="module")
def results(tmp_path_factory, ckpt_dir):
    tmp = tmp_path_factory.mktemp("parallel_hybrid")
    for j in OTHER_JOBS:
        j["dir"] = str(ckpt_dir)
    return torchrun(2, JOBS + OTHER_JOBS, tmp, 240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [j["name"] for j in JOBS])
def test_hybrid_layout_matches_single_process(results, ref, name):
    res = _check_job(results, name)
    want = ref[name.split("_")[0]]
    n = len(res["loss"])
    _close(res["loss"], want["loss"][:n], 1e-5)
    _close(res["grad_norm"], want["grad_norm"][:n], 1e-4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["init_hybrid_tp2", "init_heads_tp2"])
def test_initial_weights_do_not_depend_on_layout(results, name):
    assert _check_job(results, name)["max_abs_diff"] == 0.0


@pytest.mark.timeout(300)
def test_hybrid_heads_checkpoint_resumes_across_layouts(results, ref, ckpt_dir):
    # saved under tp=2 with SP, resumed under dp_shard=2 ...
    res = _check_job(results, "resume_heads_tp2_to_dp_shard2")
    _close(res["loss"], ref["heads"]["loss"][SAVE_AT:SAVE_AT + 2], 1e-5)
    # ... and in one process
    single = H.with_model(H.HEADS, W.run_resume, None, {}, str(ckpt_dir), SAVE_AT, SAVE_AT + 2)
    _close(single["loss"], ref["heads"]["loss"][SAVE_AT:SAVE_AT + 2], 1e-5)


def _check(model: dict, layout: dict):
    from models.transformer import build_model
    from parallel import ParallelConfig, World, check_layout

    m = build_model(W.model_cfg(**model), init=False)
    w = World(tp_size=layout.get("tp", 1), pp_size=layout.get("pp", 1), dp_size=layout.get("dp_shard", 1))
    check_layout(m, ParallelConfig(**layout), w)


@pytest.mark.parametrize("model,tp,needle", [
    (H.HYBRID, 4, "model.mamba.n_groups: 2 groups cannot be split over parallel.tp=4"),
    ({**H.HYBRID, "mamba": {**H.HYBRID["mamba"], "n_groups": 1}}, 2,
     "model.mamba.n_groups: 1 groups cannot be split over parallel.tp=2"),
    (H.HEADS, 4, "model.mamba.n_groups: 2 groups cannot be split over parallel.tp=4"),
    ({**H.HEADS, "hybrid": {"n_attn_heads": 3, "n_mamba_heads": 4}, "n_kv_heads": 1}, 2,
     "parallel.tp: 2 does not divide model.hybrid.n_attn_heads=3"),
])
def test_bad_tp_layout_is_rejected(model, tp, needle):
    with pytest.raises(ConfigError) as e:
        _check(model, {"tp": tp, "dp_shard": 1})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_good_layouts_pass_the_checks():
    _check(H.HYBRID, {"tp": 2, "dp_shard": 1})
    _check(H.HEADS, {"tp": 2, "dp_shard": 1})
    # 4 query heads over 2 KV heads: tp=4 replicates the KV heads; groups then limit tp
    _check({**H.HEADS, "mamba": {**H.HEADS["mamba"], "n_groups": 4}}, {"tp": 4, "dp_shard": 1})
