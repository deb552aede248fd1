"""Mamba-2 and hybrid-heads models under tensor parallelism: layout-independent initial
weights, checkpoints that resume across layouts, and the layout checks (their layout parity
is in tests/test_parity.py).

One torchrun of 2 processes runs the jobs on one process group
(tests/test_parallel_hybrid_worker.py).
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT
from models.config import UserError

sys.path.insert(0, str(ROOT / "tests"))
import test_parallel_hybrid_worker  # noqa: E402
import test_parallel_worker  # noqa: E402
from test_parallel import _check_job, _close  # noqa: E402
from torchrun_jobs import run_jobs  # noqa: E402

STEPS = 10
TP2 = {"tp": 2, "dp_shard": 1}
TP2_SP = {**TP2, "sequence_parallel": True}
# Layout parity of the Mamba-2 ("mamba") and P-hybrid ("heads") families: tests/test_parity.py.
SAVE_AT = 5
OTHER_JOBS = [
    {"name": "init_hybrid_tp2", "kind": "init", "layout": TP2, "model": test_parallel_hybrid_worker.HYBRID},
    {"name": "init_heads_tp2", "kind": "init", "layout": TP2, "model": test_parallel_hybrid_worker.HEADS},
    # out_proj of P keeps its canonical layout: a tp checkpoint loads under other layouts
    {"name": "resume_heads_tp2_to_dp_shard2", "kind": "resume", "model": test_parallel_hybrid_worker.HEADS, "save": TP2_SP,
     "load": {"dp_shard": 2}, "save_at": SAVE_AT, "steps": SAVE_AT + 2},
]


def torchrun(nproc: int, jobs: list[dict], tmp, timeout: float) -> dict:
    return run_jobs("test_parallel_hybrid_worker.py", nproc, jobs, tmp, timeout, steps=STEPS)


@pytest.fixture(scope="module")
def ref(parity_tokens):
    import torch

    torch.set_num_threads(1)
    return {"heads": test_parallel_worker.run_layout({}, STEPS, test_parallel_hybrid_worker.HEADS)}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_hybrid")


@pytest.fixture(scope="module")
def results(parity_tokens, tmp_path_factory, ckpt_dir):
    tmp = tmp_path_factory.mktemp("parallel_hybrid")
    for j in OTHER_JOBS:
        j["dir"] = str(ckpt_dir)
    return torchrun(2, OTHER_JOBS, tmp, 240)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["init_hybrid_tp2", "init_heads_tp2"])
def test_initial_weights_do_not_depend_on_layout(results, name):
    assert _check_job(results, name)["max_abs_diff"] == 0.0


@pytest.mark.timeout(900)
def test_hybrid_heads_checkpoint_resumes_across_layouts(results, ref, ckpt_dir):
    # saved under tp=2 with SP, resumed under dp_shard=2 ...
    res = _check_job(results, "resume_heads_tp2_to_dp_shard2")
    _close(res["loss"], ref["heads"]["loss"][SAVE_AT:SAVE_AT + 2], 1e-5)
    # ... and in one process
    single = test_parallel_hybrid_worker.with_model(test_parallel_hybrid_worker.HEADS, test_parallel_worker.run_resume, None, {}, str(ckpt_dir), SAVE_AT, SAVE_AT + 2)
    _close(single["loss"], ref["heads"]["loss"][SAVE_AT:SAVE_AT + 2], 1e-5)


def _check(model: dict, layout: dict):
    from models.transformer import build_model
    from parallel import ParallelConfig, World, check_layout

    m = build_model(test_parallel_worker.model_cfg(**model), init=False)
    w = World(tp_size=layout.get("tp", 1), pp_size=layout.get("pp", 1), dp_size=layout.get("dp_shard", 1))
    check_layout(m, ParallelConfig(**layout), w)


@pytest.mark.parametrize("model,tp,needle", [
    (test_parallel_hybrid_worker.HYBRID, 4, "model.mamba.n_groups: 2 groups cannot be split over parallel.tp=4"),
    ({**test_parallel_hybrid_worker.HYBRID, "mamba": {**test_parallel_hybrid_worker.HYBRID["mamba"], "n_groups": 1}}, 2,
     "model.mamba.n_groups: 1 groups cannot be split over parallel.tp=2"),
    (test_parallel_hybrid_worker.HEADS, 4, "model.mamba.n_groups: 2 groups cannot be split over parallel.tp=4"),
    ({**test_parallel_hybrid_worker.HEADS, "hybrid": {"n_attn_heads": 3, "n_mamba_heads": 4}, "n_kv_heads": 1}, 2,
     "parallel.tp: 2 does not divide model.hybrid.n_attn_heads=3"),
])
def test_bad_tp_layout_is_rejected(model, tp, needle):
    with pytest.raises(UserError) as e:
        _check(model, {"tp": tp, "dp_shard": 1})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_good_layouts_pass_the_checks():
    _check(test_parallel_hybrid_worker.HYBRID, {"tp": 2, "dp_shard": 1})
    _check(test_parallel_hybrid_worker.HEADS, {"tp": 2, "dp_shard": 1})
    # 4 query heads over 2 KV heads: tp=4 replicates the KV heads; groups then limit tp
    _check({**test_parallel_hybrid_worker.HEADS, "mamba": {**test_parallel_hybrid_worker.HEADS["mamba"], "n_groups": 4}}, {"tp": 4, "dp_shard": 1})
