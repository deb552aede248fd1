"""Presets in configs/: every full-size one fits the hardware it names (``hardware:``) in its
own layout according to the planner, and the Gated DeltaNet tiny presets train on CPU."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, tiny_overrides
from pretrain.config import load_config
from pretrain.metrics import read_metrics
from pretrain.planner import hardware as hw
from pretrain.planner.layout import config_layout, project_recipe, workload
from pretrain.planner.model_stats import active_params, total_params
from pretrain.planner.search import evaluate

GIB = 2**30
CPU_PRESETS = {"tiny", "demo"}  # (with every *_tiny: CPU sizes, no GPU to fit)
FULL = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")
              if not p.stem.endswith("_tiny") and p.stem not in CPU_PRESETS)


def configured_plan(name: str):
    """The planner's verdict on the preset's own layout on its own hardware, as
    ``pretrain plan NAME --gpus N --gpu-type T`` prints it under "configured layout"."""
    cfg = load_config(name)
    gpus, kind = cfg.hardware.gpus, cfg.hardware.gpu_type
    assert gpus > 0, f"configs/{name}.yaml names no hardware: add `hardware: {{gpus: N, gpu_type: h100}}`"
    dev = hw.get_device(kind, gpus if kind == "cpu" else min(8, gpus))
    plan = evaluate(cfg.model, config_layout(cfg, gpus), workload(cfg), dev, project_recipe(cfg), cfg)
    return cfg, dev, plan


def test_the_walk_sees_the_known_presets():
    assert {"mamba2_hybrid_8b", "moe_mixtral", "moe_deepseek", "mamba2_moe", "gdn_hybrid",
            "qwen3_next"} <= set(FULL), FULL


@pytest.mark.parametrize("name", FULL)
def test_full_size_preset_fits_the_hardware_it_names(name):
    cfg, dev, plan = configured_plan(name)
    worst = max(plan.memory, key=lambda b: b.total) if plan.memory else None
    parts = {k: round(v / GIB, 2) for k, v in worst.parts.items() if v} if worst else {}
    print(f"{name}: {cfg.hardware.gpus} x {dev.name}, {plan.layout.name}: peak {plan.peak_bytes / GIB:.1f} "
          f"of {dev.usable_bytes / GIB:.1f} GiB per rank {parts}")
    assert plan.unsupported is None, f"{name}: the trainer refuses its own layout: {plan.unsupported}"
    assert plan.fits, f"{name}: {plan.problem}"
    assert plan.peak_bytes <= dev.usable_bytes


def test_gdn_presets_shapes():
    g = load_config("gdn_hybrid").model
    assert g.sublayer_kinds.count("gdn") == 3 * g.sublayer_kinds.count("attention") == 18
    assert 1e9 < total_params(g) < 3e9
    q = load_config("qwen3_next").model  # Qwen3-Next-80B-A3B: 80B total, 3B active (+0.6B embeddings)
    assert q.sublayer_kinds.count("gdn") == 36 and q.sublayer_kinds.count("moe") == 48
    assert total_params(q) == pytest.approx(80e9, rel=0.02)
    assert active_params(q) == pytest.approx(3.9e9, rel=0.05)
    from pretrain.hf.registry import QWEN3_NEXT

    assert QWEN3_NEXT.issues(g, {}) == [] and QWEN3_NEXT.issues(q, {}) == []  # both export exactly


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["gdn_hybrid_tiny", "qwen3_next_tiny"])
def test_tiny_gdn_presets_train(name, tiny_dataset, tmp_path):
    import torch

    from pretrain.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(name, tiny_overrides(tiny_dataset, tmp_path / "run", **{
            "train.steps": 12, "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint.every": 0})))
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    print(name, [round(v, 3) for v in losses])
    assert len(losses) == 12 and all(v == v for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4, losses
    # the trained run exports in one command to the standard class, which computes the same logits
    from transformers import AutoModelForCausalLM

    from pretrain.cli import main as cli
    from pretrain.evaluate import load_for_inference

    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3NextForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, model, _ = load_for_inference(str(tmp_path / "run"))
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = (model(x) - hf(x).logits).abs().max().item()
    print(f"{name}: exported, max |logit difference| {d:.1e}")
    assert d < 1e-4
