"""Context parallelism on gloo: ring and all-to-all attention and whole training runs equal
one process.

Attention: forward output and q/k/v gradients of the split sequence vs single-process
attention (GQA and MQA, documents crossing chunk boundaries). Training: seq 1024 on real text
(``tiny_dataset``) with document masking, 10 steps: loss per step, every parameter's gradient
after step 1 by name and the final weights vs one process (tests/cp_parity.py). One launch
per world size runs all its jobs (tests/test_cp_worker.py), its ranks forked from one
process that imported torch once (tests/fork_run.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import cp_parity  # noqa: E402
from torchrun_jobs import job_result, run_jobs  # noqa: E402

TOL = 1e-5  # loss (absolute, values ~6) and step-1 gradients (relative to each tensor's max)
# Final weights: AdamW turns last-bit gradient differences of near-zero gradient entries
# into whole lr-sized steps, so they are held to 10x the noise floor of one process whose
# attention only sums in a different order (``cp_parity.blockwise_attention``).
SAVE_AT = 5
ATTN = [
    {"name": "ring_gqa_docs", "mode": "ring", "shape": [2, 64, 4, 2, 8], "docs": True, "tile": 5},
    {"name": "ring_mqa", "mode": "ring", "shape": [2, 64, 4, 1, 8], "docs": False},
    {"name": "ring_gqa_docs_fused", "mode": "ring", "shape": [2, 64, 4, 2, 8], "docs": True, "blocks": "fused"},
    {"name": "alltoall_gqa_docs", "mode": "alltoall", "shape": [2, 64, 4, 2, 8], "docs": True},
    {"name": "alltoall_mqa_docs", "mode": "alltoall", "shape": [2, 64, 4, 1, 8], "docs": True},
]
CP2 = {"cp": 2, "dp_shard": 1}
JOBS = {  # CI: the issue's list, each layout once
    # cp2_ring also writes the cp2 checkpoint at SAVE_AT that test_resume_across_cp_layouts loads
    2: [{"name": "cp2_ring", "layout": CP2, "save_dir": "cp2", "save_at": SAVE_AT},
        {"name": "cp2_alltoall", "layout": {**CP2, "cp_mode": "alltoall"}},
        {"name": "cp2_ep2_moe", "layout": {**CP2, "ep": 2}, "model": "moe"},
        {"name": "cp2_hybrid", "layout": CP2, "model": "hybrid"},
        {"name": "cp2_heads", "layout": CP2, "model": "heads"},
        {"name": "cp2_ring_mla", "layout": CP2, "model": "mla"}],
    4: [{"name": "cp4_ring", "layout": {"cp": 4, "dp_shard": 1}},
        {"name": "cp4_alltoall", "layout": {"cp": 4, "dp_shard": 1, "cp_mode": "alltoall"}},
        {"name": "cp4_hybrid", "layout": {"cp": 4, "dp_shard": 1}, "model": "hybrid"},
        {"name": "cp2_tp2_sp", "layout": {**CP2, "tp": 2, "sequence_parallel": True}},
        {"name": "ladder_cp2_tp2", "layout": {**CP2, "tp": 2}, "model": "ladder"},
        {"name": "cp2_dp_shard2", "layout": {"cp": 2, "dp_shard": 2}},
        {"name": "cp2_pp2", "layout": {**CP2, "pp": 2}},
        {"name": "resume_one_to_cp4", "kind": "resume", "load": {"cp": 4, "dp_shard": 1},
         "save_at": SAVE_AT, "steps": cp_parity.STEPS}],
    8: [{"name": "cp2_tp2_sp_dp_shard2", "layout": {"cp": 2, "tp": 2, "dp_shard": 2, "sequence_parallel": True}}],
}
ATTN_WORLDS = (2, 4)  # the attention jobs ride on these launches
PARITY_JOBS = {  # pytest -m parity
    2: [{"name": "cp2_ring_mqa", "layout": CP2, "model": "mqa"},
        {"name": "cp2_alltoall_mla", "layout": {**CP2, "cp_mode": "alltoall"}, "model": "mla"}],
    4: [{"name": "cp2_tp2_hybrid", "layout": {**CP2, "tp": 2}, "model": "hybrid"},
        {"name": "cp2_tp2_sp_mla", "layout": {**CP2, "tp": 2, "sequence_parallel": True}, "model": "mla"},
        {"name": "cp2_dp_shard2_ep4_moe", "layout": {"cp": 2, "dp_shard": 2, "ep": 4}, "model": "moe"},
        {"name": "cp2_pp2_interleaved_ac", "layout": {**CP2, "pp": 2, "pp_schedule": "interleaved_1f1b",
                                                      "pp_virtual_stages": 2}, "kw": {"ac": "full"}}],
    8: [{"name": "cp2_tp2_pp2", "layout": {**CP2, "tp": 2, "pp": 2, "sequence_parallel": True}}],
}


def _train_names(jobs):
    return [j["name"] for n in jobs for j in jobs[n] if j.get("kind", "train") == "train"]


def _model_of(name: str) -> str:
    return next(j.get("model", "dense") for js in (JOBS, PARITY_JOBS) for n in js for j in js[n]
                if j["name"] == name)


@pytest.fixture(scope="module")
def work(tiny_dataset, tmp_path_factory):
    """Token stream (references: :func:`_refs`)."""
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("cp")
    cp_parity.write_tokens(tiny_dataset, tmp / "tokens.pt")
    return tmp


def _refs(work, jobs) -> None:
    """One-process references (ref.pt) and noise floors (floor.pt) of the models ``jobs`` use:
    the floor is the same run with attention summed in the ring's block order. The dense
    reference also writes the one-process checkpoint at SAVE_AT (``one/``) the resume
    tests load."""
    import torch

    refs = torch.load(work / "ref.pt") if (work / "ref.pt").exists() else {}
    floors = torch.load(work / "floor.pt") if (work / "floor.pt").exists() else {}
    todo = sorted({j.get("model", "dense") for n in jobs for j in jobs[n]} - set(refs))
    save = {"dense": (str(work / "one"), SAVE_AT)}
    for m, (ref, floor) in cp_parity.references(str(work / "tokens.pt"), todo, save=save).items():
        refs[m], floors[m] = ref, floor
    torch.save(refs, work / "ref.pt")
    torch.save(floors, work / "floor.pt")


def _launch(work, jobs, attn: bool) -> dict:
    _refs(work, jobs)
    out = {}
    for n, js in jobs.items():
        with_attn = attn and n in ATTN_WORLDS
        extra = [{**a, "name": f"{a['name']}_cp{n}", "kind": "attn"} for a in ATTN] if with_attn else []
        train = [{"kind": "train", "tokens": str(work / "tokens.pt"), "ref": str(work / "ref.pt"),
                  "dir": str(work / ("one" if "one" in j["name"] else "cp2")), "steps": cp_parity.STEPS, **j}
                 for j in js]
        for j in train:
            if "save_dir" in j:
                j["save_dir"] = str(work / j["save_dir"])
        out.update(run_jobs("test_cp_worker.py", n, extra + train, work, timeout=1800, fork=True))
    return out


@pytest.fixture(scope="module")
def results(work):
    return _launch(work, JOBS, attn=True)


@pytest.fixture(scope="module")
def parity_results(work):
    return _launch(work, PARITY_JOBS, attn=False)


@pytest.mark.timeout(3000)
@pytest.mark.parametrize("n", ATTN_WORLDS)
@pytest.mark.parametrize("case", [a["name"] for a in ATTN])
def test_attention_matches_one_process(results, case, n):
    res = job_result(results, f"{case}_cp{n}")
    for key in ("out", "dq", "dk", "dv"):
        assert res[key] <= 1e-6 * res["scale"], (key, res)


def _floor(work, model: str) -> float:
    import torch

    return torch.load(work / "floor.pt")[model]["weights_diff"]


def _check_training(res, work, name):
    floor = _floor(work, _model_of(name))
    print(f"{name}: loss {res['loss_diff']:.2e} grads {res['grads_diff']:.2e} (rel {res['grads_rel']:.2e}) "
          f"weights {res['weights_diff']:.2e} (noise floor {floor:.2e})")
    assert res["loss_diff"] <= TOL, res["loss"]
    assert res["grads_rel"] <= TOL, res
    assert res["weights_diff"] <= 10 * max(floor, 1e-7), (res, floor)


@pytest.mark.timeout(3000)
@pytest.mark.parametrize("name", _train_names(JOBS))
def test_training_matches_one_process(results, work, name):
    _check_training(job_result(results, name), work, name)


@pytest.mark.parity
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", _train_names(PARITY_JOBS))
def test_more_layouts_match_one_process(parity_results, work, name):
    _check_training(job_result(parity_results, name), work, name)


@pytest.mark.timeout(3000)
def test_resume_across_cp_layouts(results, work):
    one = cp_parity.resume_job({"tokens": str(work / "tokens.pt"), "ref": str(work / "ref.pt"), "load": {},
                                "save_at": SAVE_AT, "steps": cp_parity.STEPS, "dir": str(work / "cp2")})
    floor = _floor(work, "dense")
    for res in (one, job_result(results, "resume_one_to_cp4")):
        print(f"resume: loss {res['loss_diff']:.2e} weights {res['weights_diff']:.2e} (floor {floor:.2e})")
        assert res["loss_diff"] <= TOL and res["weights_diff"] <= 10 * max(floor, 1e-7), res


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
    from models.config import UserError
    from parallel import ParallelConfig, resolve_layout

    with pytest.raises(UserError, match="parallel.cp: 4 does not divide the world size 6"):
        resolve_layout(ParallelConfig(cp=4), 6)


@pytest.mark.timeout(300)
def test_bad_cp_input_is_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pretrain", "train", "tiny", "--parallel.cp=2",
                        f"--logging.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert lines == ["error: parallel.cp: 2 does not divide the world size 1"], p.stderr[-2000:]


def test_planner_knows_cp():
    """Activations per rank / cp, K/V blocks in flight, exposed ring time shrinks as blocks
    grow, all-to-all fully exposed, cp searched for long sequences, FSDP over dp_shard x cp."""
    from models.config import ModelConfig
    from pretrain.config import Config
    from pretrain.planner import hardware as hw
    from pretrain.planner.layout import Layout, Workload, project_recipe
    from pretrain.planner.memory import rank_memory
    from pretrain.planner.search import enumerate_layouts
    from pretrain.planner.timing import estimate

    cfg = ModelConfig(vocab_size=32000, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=8,
                      max_seq_len=65536)
    dev, rec = hw.DEVICES["h100"], project_recipe(Config())
    wl = Workload(32768, 8)
    one = rank_memory(cfg, Layout(dp_shard=8), wl, rec)[0].parts
    four = rank_memory(cfg, Layout(dp_shard=2, cp=4), wl, rec)[0].parts
    assert four["activations"] == pytest.approx(one["activations"] / 4)
    assert four["params"] == pytest.approx(one["params"], rel=1e-3)  # sharded over dp_shard x cp
    assert four["cp_buffers"] > 0 and "cp_buffers" not in one
    ring = estimate(cfg, Layout(dp_shard=2, cp=4), wl, dev, rec).parts
    a2a = estimate(cfg, Layout(dp_shard=2, cp=4, cp_mode="alltoall"), wl, dev, rec).parts
    short = estimate(cfg, Layout(dp_shard=2, cp=4), Workload(2048, 8), dev, rec).parts
    assert 0 <= ring["cp_comm"] < a2a["cp_comm"]
    assert short["cp_comm"] / short["compute"] > ring["cp_comm"] / ring["compute"]
    cps = {lay.cp for lay in enumerate_layouts(cfg, 16, wl, dev, micro_batches=(1,), recompute=("full",))}
    assert cps == {1, 2, 4, 8}
    assert {lay.cp for lay in enumerate_layouts(cfg, 16, Workload(4096, 8), dev, micro_batches=(1,))} == {1}


@pytest.mark.timeout(300)
def test_dry_run_with_cp(capsys):
    from pretrain import cli

    assert cli.main(["plan", "tiny", "--gpus", "8", "--gpu-type", "h100", "--parallel.cp=2",
                     "--parallel.tp=2", "--parallel.sequence_parallel=true", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cp2" in out and "matches the planner" in out, out
