"""The planner: layout ranking, the memory and time model's mechanics, ``--dry-run``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT
from models.config import ModelConfig
from pretrain import cli
from pretrain.planner import hardware as hw
from pretrain.planner.layout import Layout, Workload, megatron_recipe, project_recipe
from pretrain.planner.memory import balanced_split, rank_memory, state_bytes
from pretrain.planner.search import evaluate, rank
from pretrain.planner.timing import estimate

H100 = hw.DEVICES["h100"]
MID = ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, max_seq_len=2048)


def _recipe():
    from pretrain.config import Config

    return project_recipe(Config())


def test_zero_stages_shard_what_they_promise():
    wl, rec = Workload(2048, 64), _recipe()
    mem = {z: rank_memory(MID, Layout(dp_shard=8, zero=z), wl, rec)[0] for z in (0, 1, 2, 3)}
    p = mem[0].parts["params"]
    assert mem[0].parts["grads"] == p and mem[0].parts["optimizer"] == 2 * p  # DDP: 4 + 4 + 8 bytes
    assert mem[1].parts["optimizer"] == pytest.approx(3 * p / 8)  # fp32 partition + AdamW, /8
    assert mem[1].parts["grads"] == p and mem[2].parts["grads"] == pytest.approx(p / 8)
    assert mem[3].parts["params"] == pytest.approx(p / 8, rel=1e-3)
    states = [state_bytes(mem[z]) for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True)


def test_recompute_pipeline_and_experts_change_memory():
    wl, rec = Workload(2048, 64), _recipe()
    act = lambda lay: rank_memory(MID, lay, wl, rec)[0].parts["activations"]  # noqa: E731
    assert act(Layout(ac="full")) < act(Layout(ac="every_n")) < act(Layout())
    # 1F1B: the first stage holds pp micro-batches; GPipe holds all of them
    one_f = act(Layout(pp=4, dp_shard=1, schedule="1f1b"))
    gpipe = act(Layout(pp=4, dp_shard=1, schedule="gpipe"))
    assert gpipe > one_f
    moe = ModelConfig(vocab_size=32000, d_model=1024, n_layers=8, pattern="*E", n_heads=8)
    no_ep = rank_memory(moe, Layout(dp_shard=8), wl, rec)[0].parts
    ep = rank_memory(moe, Layout(dp_shard=8, ep=8), wl, rec)[0].parts
    # experts split over ep, then FSDP over dp_shard/ep: the same sharded state, but each rank
    # gathers only its own experts for compute
    assert ep["params"] == no_ep["params"]
    assert ep["fsdp_buffers"] < 0.5 * no_ep["fsdp_buffers"]


def test_communication_model():
    intra, inter = hw.Group(8, 8), hw.Group(16, 1)
    assert hw.all_reduce_time(1e9, intra, H100) < hw.all_reduce_time(1e9, inter, H100)
    # across nodes NCCL's channels use every member's NIC: 8 members per node is 8x faster
    assert hw.all_reduce_time(1e9, hw.Group(16, 8), H100) < hw.all_reduce_time(1e9, inter, H100) / 4
    assert hw.group_for([1, 1, 4, 1, 8], 2, 8) == hw.Group(4, 1)  # dp over nodes, tp inside
    wl = Workload(4096, 256)
    t = lambda **kw: estimate(MID, Layout(tp=8, pp=4, dp_shard=1, micro_batch=1, **kw), wl, H100, _recipe())  # noqa: E731
    assert t(schedule="gpipe").parts["bubble"] == pytest.approx(t(schedule="1f1b").parts["bubble"])
    assert t(schedule="interleaved_1f1b", vpp=2).parts["bubble"] < t(schedule="1f1b").parts["bubble"]
    assert t(schedule="zbv", vpp=2).parts["bubble"] < t(schedule="interleaved_1f1b", vpp=2).parts["bubble"]


def test_ladder_residual_hides_tensor_parallel_reductions():
    from dataclasses import replace

    wl, lay = Workload(4096, 64), Layout(tp=8, dp_shard=1)
    std = estimate(MID, lay, wl, H100, _recipe())
    ladder = estimate(MID, lay, wl, H100, replace(_recipe(), tp_overlap="ladder"))
    assert ladder.parts["tp_comm"] < 0.7 * std.parts["tp_comm"]
    assert ladder.step_s < std.step_s


def test_rank_orders_fitting_layouts_by_step_time():
    plans = rank(MID, 16, Workload(2048, 64), H100, megatron_recipe())
    fit = [p for p in plans if p.fits]
    assert fit and all(p.peak_bytes <= H100.usable_bytes for p in fit)
    steps = [p.estimate.step_s for p in fit]
    assert steps == sorted(steps)
    big = ModelConfig(vocab_size=32000, d_model=8192, n_layers=64, n_heads=64, max_seq_len=4096)
    lonely = evaluate(big, Layout(), Workload(4096, 8), H100, megatron_recipe())
    assert not lonely.fits and "GiB" in lonely.problem


def test_balanced_split_matches_parallel_pipeline():
    from parallel.pipeline import split_stages

    rnd = random.Random(0)
    for _ in range(100):
        n = rnd.randint(2, 24)
        cfg = ModelConfig(n_layers=n, pattern="-")
        k = rnd.randint(1, n)
        costs = [float(rnd.choice([1, 2, 3, 5])) for _ in range(n)]
        head = float(rnd.choice([0, 4, 20]))
        assert balanced_split(costs, k, 0.0, head) == split_stages(cfg, k, costs, 0.0, head)


def test_plan_cli_ranks_layouts(capsys):
    assert cli.main(["plan", "tiny", "--gpus", "8", "--gpu-type", "a100", "--json", "--top", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["configured"]["fits"] and len(out["ranked"]) == 5
    steps = [p["step_s"] for p in out["ranked"]]
    assert steps == sorted(steps)
    assert cli.main(["plan", "tiny", "--gpus", "4", "--parallel.tp=2"]) == 0
    text = capsys.readouterr().out
    assert "configured layout: tp2 pp1 dp2(fsdp)" in text and "fastest runnable: pretrain train tiny" in text


def test_dry_run_exact_counts(capsys):
    args = ["plan", "tiny", "--gpus", "8", "--parallel.tp=2", "--parallel.pp=2", "--dry-run", "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["pp_rank"] for r in out["ranks"]] == [0, 1]
    for r in out["ranks"]:
        assert r["params"] == r["predicted"] > 0


@pytest.mark.parametrize("layout", [["--gpus", "8", "--parallel.ep=2"],
                                    ["--gpus", "8", "--parallel.ep=2", "--parallel.dp_replicate=2"],
                                    ["--gpus", "4", "--parallel.ep=2", "--parallel.pp=2"],
                                    ["--gpus", "8", "--parallel.ep=2", "--parallel.tp=2"]],
                         ids=["edp4", "hsdp", "pp2", "tp2"])
def test_dry_run_shards_experts_over_ep_and_edp(capsys, layout):
    """Expert parallel in the dry run: the experts split over ep, then FSDP over edp, as the
    trainer does; the planner's prediction is exact."""
    assert cli.main(["plan", "moe_mixtral_tiny", *layout, "--dry-run", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)["ranks"]
    for r in ranks:
        assert r["params"] == r["predicted"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "6", "--parallel.tp=3"], "parallel.tp: 3 does not divide model.vocab_size=512"),
    (["--gpus", "8", "--parallel.pp=8"], "parallel.pp"),
    (["--gpus", "6", "--parallel.tp=4"], "world size 6"),
    (["--gpus", "4", "--parallel.tp=4", "--model.n_kv_heads=2", "--model.n_heads=6",
      "--model.d_model=48"], "parallel.tp: 4 does not divide model.n_heads=6"),
])
def test_dry_run_reports_what_cannot_divide(capsys, args, needle):
    assert cli.main(["plan", "tiny", *args, "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_plan_defaults_to_the_hardware_a_preset_names(capsys):
    """A preset's `hardware:` section is what `pretrain plan` plans for unless flags say otherwise;
    a config that names none needs --gpus (one error line)."""
    assert cli.main(["plan", "gdn_hybrid", "--json"]) == 0
    named = capsys.readouterr().out
    assert cli.main(["plan", "gdn_hybrid", "--gpus", "8", "--gpu-type", "h100", "--json"]) == 0
    assert capsys.readouterr().out == named and json.loads(named)["configured"]["fits"]
    assert cli.main(["plan", "gdn_hybrid", "--gpus", "16", "--json"]) == 0
    assert capsys.readouterr().out != named
    assert cli.main(["plan", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus: required (tiny names no hardware.gpus)"


def test_dry_run_error_through_the_cli_exits_2():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "pretrain", "plan", "tiny", "--gpus", "6",
                        "--parallel.tp=3", "--dry-run"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines == ["error: parallel.tp: 3 does not divide model.vocab_size=512"]


def test_cpu_device_measures_the_matmul_rate(monkeypatch):
    """``--gpu-type cpu``: the peak is fp32 matmuls timed on this machine, shared by the
    processes of a node (a fake clock makes the count exact)."""
    import itertools

    assert 1e8 < hw.get_device("cpu").peak_flops < 1e14  # a real measurement
    ticks = itertools.count()
    monkeypatch.setattr(hw.time, "perf_counter", lambda: next(ticks) * 0.01)
    dev = hw.get_device("cpu", 2)
    # t0 = 0, matmuls at 0.01-0.04 (4 of them), the loop ends at 0.05, the rate is read at 0.06
    assert dev.peak_flops == pytest.approx(2 * 384**3 * 4 / 0.06 / 2)
    assert dev.gpus_per_node == 2
