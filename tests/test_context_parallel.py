"""Context parallelism on gloo: ring and all-to-all attention and whole training runs equal
one process.

Attention: forward output and q/k/v gradients of the split sequence vs single-process
attention (GQA and MQA, documents crossing chunk boundaries). Training: seq 1024 on real text
(``tiny_dataset``) with document masking, 10 steps: loss per step, every parameter's gradient
after step 1 by name and the final weights vs one process (tests/cp_parity.py). One torchrun
launch per world size runs all its jobs (tests/test_cp_worker.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import cp_parity as P  # noqa: E402
from torchrun_jobs import job_result, run_jobs  # noqa: E402

TOL = 1e-5  # loss (absolute, values ~6) and gradients / weights (relative to each tensor's max)
SAVE_AT = 5
ATTN = [
    {"name": "ring_gqa_docs", "mode": "ring", "shape": [2, 64, 4, 2, 8], "docs": True, "tile": 5},
    {"name": "ring_mqa", "mode": "ring", "shape": [2, 64, 4, 1, 8], "docs": False},
    {"name": "alltoall_gqa_docs", "mode": "alltoall", "shape": [2, 64, 4, 2, 8], "docs": True},
    {"name": "alltoall_mqa_docs", "mode": "alltoall", "shape": [2, 64, 4, 1, 8], "docs": True},
]
CP2 = {"cp": 2, "dp_shard": 1}
JOBS = {
    2: [{"name": "cp2_ring", "layout": CP2},
        {"name": "cp2_alltoall", "layout": {**CP2, "cp_mode": "alltoall"}},
        {"name": "cp2_ring_mqa", "layout": CP2, "model": "mqa"},
        {"name": "resume_cp2_save", "kind": "resume", "save": CP2, "save_at": SAVE_AT}],
    4: [{"name": "cp4_ring", "layout": {"cp": 4, "dp_shard": 1}},
        {"name": "cp4_alltoall", "layout": {"cp": 4, "dp_shard": 1, "cp_mode": "alltoall"}},
        {"name": "cp2_tp2_sp", "layout": {**CP2, "tp": 2, "sequence_parallel": True}},
        {"name": "cp2_dp_shard2", "layout": {"cp": 2, "dp_shard": 2}},
        {"name": "cp2_pp2", "layout": {**CP2, "pp": 2}},
        {"name": "cp2_ep2_moe", "layout": {**CP2, "dp_shard": 1, "ep": 2}, "model": "moe"},
        {"name": "ladder_cp2_tp2", "layout": {**CP2, "tp": 2}, "model": "ladder"},
        {"name": "resume_one_to_cp4", "kind": "resume", "load": {"cp": 4, "dp_shard": 1},
         "save_at": SAVE_AT, "steps": P.STEPS}],
}
TRAIN = [j["name"] for n in JOBS for j in JOBS[n] if j.get("kind", "train") == "train"]


@pytest.fixture(scope="module")
def work(tiny_dataset, tmp_path_factory):
    """Token stream, one-process references and a one-process checkpoint at SAVE_AT."""
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cp")
    tokens = P.write_tokens(tiny_dataset, tmp / "tokens.pt")
    data = torch.load(tokens)
    models = {j.get("model", "dense") for n in JOBS for j in JOBS[n]}
    torch.save({m: P.train(data, {}, m, P.STEPS) for m in sorted(models)}, tmp / "ref.pt")
    P.resume_job({"tokens": str(tokens), "save": {}, "save_at": SAVE_AT, "dir": str(tmp / "one")})
    return tmp


@pytest.fixture(scope="module")
def results(work):
    out = {}
    for n, jobs in JOBS.items():
        attn = [{**a, "name": f"{a['name']}_cp{n}", "kind": "attn"} for a in ATTN]
        train = [{"kind": "train", "tokens": str(work / "tokens.pt"), "ref": str(work / "ref.pt"),
                  "dir": str(work / ("one" if "one" in j["name"] else "cp2")), "steps": P.STEPS, **j}
                 for j in jobs]
        out.update(run_jobs("test_cp_worker.py", n, attn + train, work, timeout=600))
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("n", sorted(JOBS))
@pytest.mark.parametrize("case", [a["name"] for a in ATTN])
def test_attention_matches_one_process(results, case, n):
    res = job_result(results, f"{case}_cp{n}")
    for key in ("out", "dq", "dk", "dv"):
        assert res[key] <= 1e-6 * res["scale"], (key, res)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", TRAIN)
def test_training_matches_one_process(results, name):
    res = job_result(results, name)
    print(f"{name}: loss {res['loss_diff']:.2e} grads {res['grads_diff']:.2e} "
          f"(rel {res['grads_rel']:.2e}) weights {res['weights_diff']:.2e} (rel {res['weights_rel']:.2e})")
    assert res["loss_diff"] <= TOL, res["loss"]
    assert res["grads_rel"] <= TOL and res["weights_rel"] <= TOL, res


@pytest.mark.timeout(900)
def test_resume_across_cp_layouts(results, work):
    import torch

    one = P.resume_job({"tokens": str(work / "tokens.pt"), "ref": str(work / "ref.pt"), "load": {},
                        "save_at": SAVE_AT, "steps": P.STEPS, "dir": str(work / "cp2")})
    for res in (one, job_result(results, "resume_one_to_cp4")):
        assert res["loss_diff"] <= TOL and res["weights_diff"] <= TOL, res
    del torch


@pytest.mark.parametrize("override,needle", [
    ("--parallel.cp=2 --data.seq_len=30", "data.seq_len: 30 must be divisible by 2*parallel.cp = 4"),
    ("--parallel.cp=4 --parallel.cp_mode=alltoall --model.n_heads=2 --model.n_kv_heads=2",
     "parallel.cp_mode: alltoall needs the attention heads"),
    ("--parallel.cp=2 --parallel.dp_engine=deepspeed", "parallel.cp: context parallel does not compose"),
    ("--parallel.cp=2 --parallel.cp_mode=zigzag", "parallel.cp_mode: 'zigzag'"),
])
def test_bad_cp_config_rejected(override, needle):
    from pretrain.config import load_config
    from pretrain.errors import UserError

    with pytest.raises(UserError) as e:
        load_config("tiny", override.split())
    assert needle in str(e.value)


def test_cp_not_dividing_the_world_rejected():
    from models.config import ConfigError
    from parallel import ParallelConfig, resolve_layout

    with pytest.raises(ConfigError, match="parallel.cp: 4 does not divide the world size 6"):
        resolve_layout(ParallelConfig(cp=4), 6)


@pytest.mark.timeout(300)
def test_bad_cp_input_is_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pretrain", "train", "tiny", "--parallel.cp=2",
                        f"--logging.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert lines == ["error: parallel.cp: 2 does not divide the world size 1"], p.stderr[-2000:]
