"""The planner's "runnable" is the trainer's verdict: every candidate layout the planner
enumerates goes through the trainer's start-up check (``pretrain.layout_check.check_run``);
the planner never ranks a layout the check refuses, and every layout it leaves out carries
the check's message."""

from __future__ import annotations

import pytest

from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.layout_check import check_run
from pretrain.planner import hardware as hw
from pretrain.planner.layout import project_recipe, workload
from pretrain.planner.search import enumerate_layouts, evaluate, layout_config

H100 = hw.DEVICES["h100"]


def _trainer_refuses(cfg, layout, wl) -> str | None:
    try:
        check_run(layout_config(cfg.model, layout, wl, cfg), layout.world)
    except UserError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name,gpus,extra", [
    ("tiny", 8, ["--train.global_batch=16"]),
    ("hybrid_tiny", 8, ["--train.global_batch=8"]),
    ("moe_mixtral_tiny", 8, ["--train.global_batch=16"]),
    ("mamba2_hybrid_8b", 64, []),
])
def test_planner_candidates_agree_with_the_trainer(name, gpus, extra):
    cfg = load_config(name, extra)
    wl = workload(cfg)
    layouts = enumerate_layouts(cfg.model, gpus, wl, H100)
    recipe = project_recipe(cfg)
    verdicts = {"runnable": 0, "refused": 0}
    for lay in layouts:
        refused = _trainer_refuses(cfg, lay, wl)
        plan = evaluate(cfg.model, lay, wl, H100, recipe, cfg)
        if refused:  # not ranked, and the reason given is the trainer's own line
            assert not plan.fits and plan.estimate is None, (lay.name, refused)
            assert plan.problem == plan.unsupported == refused, (lay.name, plan.problem, refused)
        else:  # ranked (unless memory is short), with no refusal attached
            assert plan.estimate is not None and plan.unsupported is None, (lay.name, plan.problem)
            assert plan.fits or "GiB" in plan.problem, (lay.name, plan.problem)
        if refused:
            assert refused.count("\n") == 0 and refused.split(":")[0].count(".") >= 1, refused
        verdicts["refused" if refused else "runnable"] += 1
    print(name, gpus, verdicts)
    assert verdicts["runnable"] and verdicts["refused"]


def test_issue_example_zbv_with_data_parallel_is_not_runnable():
    """`pretrain plan mamba2_hybrid_8b --gpus 64` listed tp1 pp2(zbv,v2) dp32(hsdp 4x8) as
    runnable; the trainer refuses zbv with data parallelism."""
    from pretrain.planner.layout import Layout

    cfg = load_config("mamba2_hybrid_8b", [])
    lay = Layout(tp=1, pp=2, dp_replicate=4, dp_shard=8, zero=3, schedule="zbv", vpp=2, micro_batch=1)
    plan = evaluate(cfg.model, lay, workload(cfg), H100, project_recipe(cfg), cfg)
    assert plan.unsupported and "zbv does not compose with data parallelism" in plan.unsupported


def test_pp_microbatches_default_and_override():
    """README: pipeline micro-batches per step default to the train.micro_batch slices, or
    pp with one slice; parallel.pp_microbatches overrides and must divide the rows."""
    from parallel.runner import pipeline_microbatches
    from pretrain.planner.layout import config_layout

    assert pipeline_microbatches(0, 4, 2) == 4
    assert pipeline_microbatches(0, 1, 2) == 2
    assert pipeline_microbatches(6, 4, 2) == 6
    base = ["--parallel.pp=2", "--train.global_batch=8"]
    assert config_layout(load_config("tiny", base), 2).micro_batch == 4  # 8 rows / pp
    cfg = load_config("tiny", [*base, "--parallel.pp_microbatches=4"])
    check_run(cfg, 2)
    assert config_layout(cfg, 2).micro_batch == 2
    with pytest.raises(UserError, match="parallel.pp_microbatches: 3 micro-batches do not divide the 8 rows"):
        check_run(load_config("tiny", [*base, "--parallel.pp_microbatches=3"]), 2)
    with pytest.raises(UserError, match="needs at least pp=2"):  # torch's 1F1B refuses 1 < pp
        check_run(load_config("tiny", [*base, "--parallel.pp_microbatches=1"]), 2)


@pytest.mark.parametrize("world,extra,needle", [
    (4, ["--parallel.pp=2", "--parallel.pp_schedule=zbv"], "parallel.pp_schedule: zbv does not compose"),
    # known from data.seq_len at start (was checked on every batch)
    (2, ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--data.seq_len=63"],
     "data.seq_len: 63 must be divisible by parallel.tp=2"),
])
def test_trainer_checks_the_layout_before_the_process_group(monkeypatch, tmp_path, world, extra, needle):
    import parallel
    from pretrain.train import train

    def init_world(pcfg):
        raise AssertionError("the process group started before the layout check")

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(parallel, "init_world", init_world)
    cfg = load_config("tiny", [*extra, f"--logging.run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=needle):
        train(cfg)
    assert not (tmp_path / "run").exists()
