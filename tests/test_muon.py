"""Muon: Newton-Schulz, the parameter split, and sharded Muon equal to one process.

Every layout trains the same 10 steps on real text through the real trainer; per-step
loss and the final weights (read back from the layout-independent checkpoints) are compared
with a one-process Muon run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.torchrun_jobs import run_jobs

STEPS = 10
COMMON = {"optim.name": "muon", "optim.lr": 3e-3, "optim.warmup_steps": 2, "train.steps": STEPS,
          "data.seq_len": 64, "checkpoint.every": 5, "train.eval_batches": 1}
DENSE = ("tiny", {})
MOE = ("moe_mixtral_tiny", {"train.micro_batch": 4})  # one process: the ep ranks' micro-batches
LOSS_REL, WEIGHT_ABS = 1e-5, 1e-5


def test_newton_schulz_singular_values():
    from parallel.muon import newton_schulz

    g = torch.Generator().manual_seed(0)
    for shape in [(64, 256), (256, 64), (4, 48, 128)]:
        s = torch.linalg.svdvals(newton_schulz(torch.randn(*shape, generator=g)))
        assert 0.6 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())
    # an ill-conditioned square matrix: every direction with real weight is pulled to ~1
    q1, _ = torch.linalg.qr(torch.randn(96, 96, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(96, 96, generator=g))
    s = torch.linalg.svdvals(newton_schulz(q1 @ torch.diag(torch.logspace(0, -1.5, 96)) @ q2))
    assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())


def test_parameter_split_by_name():
    from models.transformer import build_model
    from parallel.muon import split_parameters
    from pretrain.config import load_config

    for preset in ("moe_deepseek_tiny", "hybrid_tiny"):
        names = {k: {n for n, _ in v} for k, v in
                 split_parameters([build_model(load_config(preset).model)]).items()}
        muon, adam = names["muon"], names["adamw_decay"] | names["adamw_no_decay"]
        for n in muon:
            assert not any(x in n for x in ("tok_embeddings", "output", "router", "norm", "conv")), n
        assert {"tok_embeddings.weight", "output.weight", "norm.weight"} <= adam
        assert all(n.endswith(".weight") or n.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down") for n in muon)
    deepseek = {k: {n for n, _ in v} for k, v in
                split_parameters([build_model(load_config("moe_deepseek_tiny").model)]).items()}
    assert {"layers.1.mixer.w_gate", "layers.1.mixer.shared_expert.w_down.weight", "layers.0.mixer.wq.weight"} \
        <= deepseek["muon"]
    assert "layers.1.mixer.router.weight" in deepseek["adamw_decay"]
    hybrid = {k: {n for n, _ in v} for k, v in
              split_parameters([build_model(load_config("hybrid_tiny").model)]).items()}
    assert {"layers.0.mixer.x_proj.weight", "layers.0.mixer.out_proj.weight"} <= hybrid["muon"]
    assert {"layers.0.mixer.A_log", "layers.0.mixer.dt_bias"} <= hybrid["adamw_no_decay"]
    assert "layers.0.mixer.conv_x.weight" in hybrid["adamw_decay"]  # a depthwise filter, not a matrix


def test_muon_is_not_adamw(tiny_dataset, tmp_path):
    """The option changes the optimizer (same data, same init, different weights)."""
    from pretrain.config import load_config
    from pretrain.train import train

    runs = {}
    for name in ("adamw", "muon"):
        run = tmp_path / name
        train(load_config("tiny", _args(tiny_dataset, run, {**COMMON, "optim.name": name, "train.steps": 3})))
        runs[name] = _losses(run)
    assert runs["adamw"][0] == runs["muon"][0]  # same first forward
    assert abs(runs["adamw"][-1] - runs["muon"][-1]) > 1e-4


def _args(data, run: Path, ov: dict) -> list[str]:
    return tiny_overrides(data, run, **ov)


def _losses(run: Path) -> list[float]:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _weights(run: Path, preset: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    from models.transformer import build_model
    from pretrain.checkpoint import load_model_weights
    from pretrain.config import load_config

    model = build_model(load_config(preset).model)
    load_model_weights(run / "checkpoints" / f"step_{step}", model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# name -> (preset, world size, overrides of the layout)
LAYOUTS = {
    "dp_shard2": (DENSE, 2, {"parallel.dp_shard": 2}),
    "tp2": (DENSE, 2, {"parallel.tp": 2, "parallel.dp_shard": 1}),
    "pp2": (DENSE, 2, {"parallel.pp": 2, "parallel.dp_shard": 1, "model.n_layers": 2}),
    "ep2": (MOE, 2, {"parallel.ep": 2, "parallel.dp_shard": 2}),
    "dp_shard4": (DENSE, 4, {"parallel.dp_shard": 4}),
    "tp2_dp_shard2": (DENSE, 4, {"parallel.tp": 2, "parallel.dp_shard": 2, "parallel.sequence_parallel": True}),
    "hsdp2x2": (DENSE, 4, {"parallel.dp_replicate": 2, "parallel.dp_shard": 2}),
}


@pytest.fixture(scope="module")
def muon_runs(tiny_dataset, tmp_path_factory):
    """One-process references, every layout, and the cross-layout resumes."""
    from pretrain.config import load_config
    from pretrain.train import train

    root = tmp_path_factory.mktemp("muon")
    for (preset, extra) in (DENSE, MOE):
        train(load_config(preset, _args(tiny_dataset, root / f"ref_{preset}", {**COMMON, **extra})))
    jobs = {2: [], 4: []}
    for name, ((preset, extra), ws, layout) in LAYOUTS.items():
        ov = {**COMMON, **extra, **layout}
        jobs[ws].append({"name": name, "config": preset, "overrides": _args(tiny_dataset, root / name, ov)})
    # resume across layouts: dp_shard2's step-5 checkpoint continued under dp_shard4
    jobs[4].append({"name": "resume_dp2_to_dp4", "config": "tiny", "overrides": _args(
        tiny_dataset, root / "resume_dp2_to_dp4",
        {**COMMON, "parallel.dp_shard": 4, "checkpoint.resume": str(root / "dp_shard2" / "checkpoints" / "step_5")})})
    for ws in (2, 4):
        jobs[ws].insert(0, {"name": f"exchange{ws}", "kind": "exchange"})
        res = run_jobs("test_muon_worker.py", ws, jobs[ws], root, timeout=900)
        for name, r in res.items():
            assert "error" not in r, r.get("trace", r)
        (root / f"exchange{ws}.json").write_text(json.dumps(res[f"exchange{ws}"]))
    # exact resume in one process, from a tensor-parallel checkpoint
    train(load_config("tiny", _args(tiny_dataset, root / "resume_tp2_to_1", {
        **COMMON, "checkpoint.resume": str(root / "tp2" / "checkpoints" / "step_5")})))
    return root


def _compare(root: Path, name: str, preset: str, first_step: int = 1) -> tuple[float, float]:
    ref, got = _losses(root / f"ref_{preset}"), _losses(root / name)
    ref = ref[first_step - 1:]
    assert len(got) == len(ref), (name, len(got), len(ref))
    loss_rel = max(abs(g - r) / abs(r) for g, r in zip(got, ref))
    wr, wg = _weights(root / f"ref_{preset}", preset), _weights(root / name, preset)
    assert wr.keys() == wg.keys()
    w_abs = max(float((wr[k] - wg[k]).abs().max()) for k in wr)
    print(f"{name}: max loss rel diff {loss_rel:.2e}, max final weight abs diff {w_abs:.2e}")
    assert loss_rel <= LOSS_REL, (name, got, ref)
    assert w_abs <= WEIGHT_ABS, name
    return loss_rel, w_abs


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_muon_layout_equals_one_process(muon_runs, name):
    (preset, _), _, _ = LAYOUTS[name]
    _compare(muon_runs, name, preset)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("ws", [2, 4])
def test_sharded_orthogonalisation_is_whole_matrix(muon_runs, ws):
    """Gather-to-owner + scatter-back gives exactly Newton-Schulz of the whole matrix, on 1-D
    and 2-D meshes, uneven shards and several buckets; orthogonalising shards would not."""
    r = json.loads((muon_runs / f"exchange{ws}.json").read_text())
    print(f"world {ws}: sharded vs whole {r['max_diff']:.1e}, per-shard control {r['per_shard_diff']:.1e}")
    assert r["max_diff"] == 0.0
    assert r["per_shard_diff"] > 1e-2


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", ["resume_dp2_to_dp4", "resume_tp2_to_1"])
def test_muon_resume_across_layouts(muon_runs, name):
    _compare(muon_runs, name, "tiny", first_step=6)


def test_muon_refused_with_deepspeed(tiny_dataset, tmp_path):
    from pretrain.config import load_config
    from pretrain.errors import UserError

    with pytest.raises(UserError, match="optim.name: muon"):
        load_config("tiny", _args(tiny_dataset, tmp_path, {"optim.name": "muon", "parallel.dp_engine": "deepspeed"}))


def test_muon_flops_and_bytes():
    from parallel.muon import newton_schulz_flops

    assert newton_schulz_flops(64, 256) == 5 * (2 * 64 * 64 * 256 * 2 + 2 * 64 ** 3)
    assert newton_schulz_flops(256, 64) == newton_schulz_flops(64, 256)
    assert math.isfinite(newton_schulz_flops(1, 1))


def test_planner_counts_muon():
    """The planner adds Newton-Schulz work (spread over the sharding ranks) and the exchange."""
    from dataclasses import replace

    from pretrain.config import load_config
    from pretrain.planner import hardware as hw
    from pretrain.planner.layout import Layout, Recipe, Workload
    from pretrain.planner.muon import muon_matrices
    from pretrain.planner.timing import estimate

    cfg = load_config("mamba2_hybrid_8b").model
    dev = hw.get_device("h100")
    wl = Workload(4096, 256)
    one = Layout(tp=1, dp_shard=1, micro_batch=1)
    eight = Layout(tp=1, dp_shard=8, micro_batch=1)
    recipe = Recipe("project")
    adam = {lay: estimate(cfg, lay, wl, dev, recipe).parts["optimizer"] for lay in (one, eight)}
    muon = {lay: estimate(cfg, lay, replace(wl, optimizer="muon"), dev, recipe).parts["optimizer"]
            for lay in (one, eight)}
    assert muon[one] > adam[one] and muon[eight] > adam[eight]
    assert (muon[eight] - adam[eight]) < (muon[one] - adam[one]) / 4  # spread over 8 owners
    shapes = muon_matrices("mamba", cfg)
    assert (1, cfg.d_model, cfg.mamba.expand * cfg.d_model) in shapes  # out_proj
    moe = load_config("moe_mixtral_tiny").model
    assert (4, 64, 192) in muon_matrices("moe", moe, ep=2)  # 8 experts over ep 2


def test_gathered_matrices_stay_within_one_bucket():
    """The owner gathers whole matrices a bucket at a time: each bucket's full-matrix
    elements stay within ``bucket_numel`` (a matrix larger than it goes alone), so the extra
    memory per rank is at most one bucket; every parameter lands in exactly one bucket."""
    from parallel.muon import Muon

    params = [torch.nn.Parameter(torch.zeros(r, c)) for r, c in
              ((8, 8), (4, 16), (30, 30), (2, 3), (16, 16), (10, 10), (1, 50))]
    opt = Muon([{"params": params, "muon": True}], lr=1e-3, bucket_numel=300)
    buckets = list(opt._buckets(params))
    assert [id(p) for b in buckets for p in b] == [id(p) for p in params]
    for b in buckets:
        total = sum(p.numel() for p in b)
        assert total <= 300 or len(b) == 1, [tuple(p.shape) for p in b]
    assert any(len(b) > 1 for b in buckets) and any(p.numel() > 300 for b in buckets for p in b)
