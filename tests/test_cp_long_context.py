"""README's long-context recipe at a tiny scale, through the real CLI: train at 256 tokens
in one process, extend to 1024 with YaRN under ``torchrun ... --parallel.cp=2`` (rows of
1024 assembled from stored blocks of 132 tokens, each cp rank reading only its chunks),
resume that cp run mid-way, export, and load in transformers.

Checked: the cp2 run's per-step loss and gradient norm equal the same continuation in one
process (so the rank-local batches are the one-process batches split), a cp2 run resumed
from its step-2 checkpoint repeats the uninterrupted steps 3-4, and transformers' logits of
the exported model equal ours past the original 256 positions; the held-out loss (also read
rank-locally) equals one process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT, tiny_overrides

STEPS, SAVE = 4, 2
YARN = {"model.rope_scaling.type": "yarn", "model.rope_scaling.factor": 4.0,
        "model.rope_scaling.original_max_seq_len": 256}
LONG = {"data.seq_len": 1024, "model.max_seq_len": 1024, "train.steps": STEPS, "train.global_batch": 2,
        "checkpoint.every": SAVE, "train.eval_batches": 1, "optim.warmup_steps": 1, **YARN,
        "data.val_split": "train"}  # the tiny val split holds no 1024-token row: evaluate on train rows


def _cp2(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pretrain", "train", "tiny", *args, "--parallel.cp=2", "--train.activation_checkpointing=full"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]


def _steps(run) -> list[dict]:
    from pretrain.metrics import read_metrics

    return read_metrics(run)


@pytest.mark.timeout(900)
def test_long_context_recipe_under_cp(tiny_dataset, tmp_path):
    import torch

    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.train import train

    torch.set_num_threads(1)
    short = tmp_path / "short"
    train(load_config("tiny", tiny_overrides(tiny_dataset, short, **{
        "data.seq_len": 256, "model.max_seq_len": 256, "train.steps": 4, "train.global_batch": 2,
        "checkpoint.every": 4, "train.eval_batches": 1})))
    long = {**LONG, "checkpoint.init_from": str(short)}
    one = tmp_path / "one"
    train(load_config("tiny", tiny_overrides(tiny_dataset, one, **long)))
    cp2 = tmp_path / "cp2"
    _cp2(tiny_overrides(tiny_dataset, cp2, **long))
    want, got = _steps(one), _steps(cp2)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        print(f"step {a['step']}: loss cp2 {a['loss']:.7f} one process {b['loss']:.7f} "
              f"(diff {abs(a['loss'] - b['loss']):.1e}); grad norm diff {abs(a['grad_norm'] - b['grad_norm']):.1e}")
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]

    held_out = [json.loads((run / "summary.json").read_text())["val_loss"] for run in (cp2, one)]
    print(f"held-out loss cp2 {held_out[0]:.7f} one process {held_out[1]:.7f}")
    assert held_out[1] is not None and abs(held_out[0] - held_out[1]) <= 1e-5

    resumed = tmp_path / "resumed"
    _cp2(tiny_overrides(tiny_dataset, resumed, **{**long, "checkpoint.resume": str(cp2 / "checkpoints" / f"step_{SAVE}")}))
    again = _steps(resumed)
    assert [r["step"] for r in again] == list(range(SAVE + 1, STEPS + 1))
    for a, b in zip(again, got[SAVE:]):
        print(f"resumed step {a['step']}: loss {a['loss']:.7f} uninterrupted {b['loss']:.7f}")
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]

    from pretrain.evaluate import load_for_inference
    from pretrain.hf.export import export_checkpoint

    last = ckpt.latest_checkpoint(cp2)
    cfg, model, _ = load_for_inference(str(last))
    out = tmp_path / "hf"
    export_checkpoint(str(last), str(out))
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "yarn"
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
    from pretrain.data.loader import TokenBatches

    x = TokenBatches(cfg.data, "train", 1, 0, 1, seed=0, shuffle=False).batch_at(5)["input_ids"]
    with torch.no_grad():
        diff = (model(x)[:, 256:] - hf(x).logits[:, 256:]).abs().max().item()
    print(f"exported cp2 run: logits past 256, max |ours - transformers| {diff:.2e}")
    assert diff < 1e-5
