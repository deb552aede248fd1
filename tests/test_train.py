"""End-to-end trainer: metrics, checkpoints, exact resume, atomic saves, eval, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.metrics import read_metrics
from pretrain.train import train

PY = sys.executable


def run_cli(*args, timeout=300, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([PY, "-m", "pretrain", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=e)


def test_train_writes_metrics_checkpoints_and_eval(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("tiny", tiny_overrides(tiny_dataset, run, **{"train.steps": 12, "checkpoint.every": 5,
                                                                   "checkpoint.keep": 2}))
    summary = train(cfg)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu", "memory_mb"):
        assert key in recs[0]
    assert recs[-1]["tokens"] == 12 * 8 * 32
    assert recs[-1]["loss"] < recs[0]["loss"]
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert steps == [10, 12]  # keep=2 pruned step 5
    assert (run / "config.yaml").is_file()
    assert summary["val_loss"] is not None and summary["val_loss"] < 7.0
    last = ckpt.latest_checkpoint(run)
    for f in ("config.yaml", "trainer_state.json", "meta.json", "tokenizer.model", "rng_rank0.pt"):
        assert (last / f).is_file(), f


def test_killed_run_resumes_exactly(tiny_dataset, tmp_path):
    """Kill the process after the step-6 checkpoint; resume reproduces the uninterrupted losses."""
    common = {"train.steps": 10, "checkpoint.every": 3, "optim.schedule": "wsd", "optim.decay_fraction": 0.5}
    ref_dir = tmp_path / "ref"
    train(load_config("tiny", tiny_overrides(tiny_dataset, ref_dir, **common)))
    ref = [r["loss"] for r in read_metrics(ref_dir)]

    run = tmp_path / "run"
    args = ["train", "tiny", *tiny_overrides(tiny_dataset, run, **common)]
    # A child that dies hard (SIGKILL from inside) right after step 7 is logged.
    env = {"PRETRAIN_FAULT": "kill_after_step:7"}
    p = run_cli(*args, env=env)
    assert p.returncode != 0
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 6]
    p = run_cli(*args, "--checkpoint.resume=auto")
    assert p.returncode == 0, p.stderr
    got = [r["loss"] for r in read_metrics(run)]
    assert len(got) == 10
    assert got == ref  # bit-exact on CPU


def test_interrupted_save_keeps_previous_latest(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(tiny_dataset, run, **{"train.steps": 4, "checkpoint.every": 2})))
    latest = ckpt.latest_checkpoint(run)
    assert latest.name == "step_4"
    # A save killed half-way leaves a .tmp directory (or a step dir without meta.json).
    partial = ckpt.checkpoint_root(run) / ".tmp_step_6"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"garbage")
    broken = ckpt.checkpoint_root(run) / "step_8"
    broken.mkdir()
    (broken / ".metadata").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(run).name == "step_4"
    # and a resume continues from step 4, replacing the partial state
    cfg = load_config("tiny", tiny_overrides(tiny_dataset, run, **{"train.steps": 6, "checkpoint.every": 2,
                                                                   "checkpoint.resume": "auto"}))
    summary = train(cfg)
    assert summary["steps"] == 6 and ckpt.latest_checkpoint(run).name == "step_6"


def test_interrupted_save_via_kill(tiny_dataset, tmp_path):
    """SIGKILL during the DCP write of step 4: step 2 stays the newest complete checkpoint."""
    run = tmp_path / "run"
    args = ["train", "tiny", *tiny_overrides(tiny_dataset, run, **{"train.steps": 6, "checkpoint.every": 2})]
    p = run_cli(*args, env={"PRETRAIN_FAULT": "kill_in_save:4"})
    assert p.returncode != 0
    assert ckpt.latest_checkpoint(run).name == "step_2"
    assert (ckpt.checkpoint_root(run) / ".tmp_step_4").exists()


def test_eval_and_generate_cli(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(tiny_dataset, run, **{"train.steps": 3})))
    p = run_cli("eval", "--checkpoint", str(run), "--batches", "2")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["loss"] > 0 and abs(res["perplexity"] - 2.718281828 ** res["loss"]) < 1e-3 * res["perplexity"]
    assert (ckpt.latest_checkpoint(run) / "eval.json").is_file()
    p = run_cli("generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--greedy")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("def ")


@pytest.mark.parametrize("args,needle", [
    (["train", "/no/such.yaml"], "config file not found"),
    (["train", "tiny", "--model.n_heads=5"], "model.n_heads"),
    (["train", "tiny", "--data.path=/no/such/data", "--logging.run_dir={tmp}/r"], "/no/such/data"),
    # (a seq_len longer than the stored blocks is valid: samples span consecutive blocks)
    (["train", "tiny", "--data.path={data}", "--data.seq_len=300", "--model.max_seq_len=256",
      "--logging.run_dir={tmp}/r"], "data.seq_len"),
    (["train", "tiny", "--data.path={data}", "--model.vocab_size=100", "--logging.run_dir={tmp}/r"], "vocab"),
    (["eval", "--checkpoint", "{tmp}/nothing"], "no complete checkpoint"),
    (["train", "tiny", "--data.path={data}", "--checkpoint.resume={tmp}/bad/step_3",
      "--logging.run_dir={tmp}/r2"], "checkpoint"),
])
def test_bad_input_one_line_exit_2(tiny_dataset, tmp_path, args, needle):
    bad = tmp_path / "bad" / "step_3"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text("{not json")
    (bad / ".metadata").write_text("x")
    args = [a.format(tmp=tmp_path, data=tiny_dataset) for a in args]
    p = run_cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_existing_run_dir_is_not_clobbered(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(tiny_dataset, run, **{"train.steps": 2})))
    before = sorted(p.name for p in ckpt.checkpoint_root(run).iterdir())
    p = run_cli("train", "tiny", *tiny_overrides(tiny_dataset, run, **{"train.steps": 2}))
    assert p.returncode == 2 and "already holds checkpoints" in p.stderr
    assert sorted(p.name for p in ckpt.checkpoint_root(run).iterdir()) == before
