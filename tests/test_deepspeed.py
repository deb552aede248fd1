"""DeepSpeed ZeRO 1/2/3 as the data-parallel engine: loss parity with FSDP2 on 2 processes,
checkpoints through the trainer's resume path, and ``pretrain launch deepspeed``.

One torchrun job (the ``__main__`` block below) runs several trainings in sequence on 2
processes; the tests compare their metrics.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
STEPS = 6
COMMON = {"train.steps": STEPS, "optim.warmup_steps": 2, "train.micro_batch": 2}
ZERO3 = {"parallel.dp_engine": "deepspeed", "parallel.zero_stage": 3, "checkpoint.every": 3}
SKIP = {"train.nan_policy": "skip"}
RUNS = [  # (run directory, overrides, PRETRAIN_FAULT), in order
    ("fsdp", {}, ""),
    # step 3's loss is NaN: both engines skip that update
    ("fsdp_nan", SKIP, "nan_at_step:3"),
    ("zero1_nan", {**SKIP, "parallel.dp_engine": "deepspeed", "parallel.zero_stage": 1}, "nan_at_step:3"),
    # an exception at step 5 ends the first ZeRO-3 run after its step-3 checkpoint ...
    ("zero3", ZERO3, "raise_at_step:5"),
    # ... and the second continues it from there
    ("zero3", {**ZERO3, "checkpoint.resume": "auto"}, ""),
    # new runs starting from the FSDP run's final weights
    ("fsdp_init", {"checkpoint.init_from": "{out}/fsdp", "train.steps": 3}, ""),
    ("zero2_init", {"checkpoint.init_from": "{out}/fsdp", "train.steps": 3,
                    "parallel.dp_engine": "deepspeed", "parallel.zero_stage": 2}, ""),
    # the fused LM-head loss (the head's weight is gathered inside its forward under ZeRO-3)
    ("fsdp_fused", {"train.fused_loss": "true", "train.steps": 3}, ""),
    ("zero3_fused", {"train.fused_loss": "true", "train.steps": 3, "parallel.dp_engine": "deepspeed",
                     "parallel.zero_stage": 3}, ""),
]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: list[float], b: list[float], rtol: float = 2e-5, n: int = STEPS) -> None:
    assert len(a) == len(b) == n, (a, b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rtol), (a, b)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """Train every RUNS entry on 2 processes (gloo); returns the directory holding the runs."""
    out = tmp_path_factory.mktemp("deepspeed_runs")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"data": str(tiny_dataset), "out": str(out), "runs": RUNS}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(Path(__file__)), str(spec)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out


@pytest.mark.timeout(900)
def test_zero1_matches_fsdp_and_skips_a_nan_step(runs):
    got, ref = losses(runs / "zero1_nan"), losses(runs / "fsdp_nan")
    assert got[2] == ref[2] == "nan"
    assert_close(got[:2] + got[3:], ref[:2] + ref[3:], n=STEPS - 1)
    assert losses(runs / "fsdp")[3] != ref[3]  # the skipped update changed the rest of the run
    recs = [json.loads(l) for l in (runs / "zero1_nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nan_skipped"] for r in recs] == [0, 0, 1, 1, 1, 1]


@pytest.mark.timeout(900)
def test_zero3_interrupted_and_resumed_matches_fsdp(runs):
    """ZeRO-3 killed at step 5 (an exception) resumes from its step-3 checkpoint through the
    trainer's resume path; the curve equals the uninterrupted FSDP2 one."""
    run = runs / "zero3"
    assert_close(losses(run), losses(runs / "fsdp"))
    step3 = run / "checkpoints" / "step_3"
    assert (step3 / "deepspeed" / "state").is_dir() and (step3 / "meta.json").is_file()
    assert json.loads((step3 / "trainer_state.json").read_text())["step"] == 3


@pytest.mark.timeout(900)
def test_zero2_starts_from_init_weights(runs):
    """checkpoint.init_from weights reach the engine's fp32 master copy (not just the module)."""
    got, ref = losses(runs / "zero2_init"), losses(runs / "fsdp_init")
    assert_close(got, ref, n=3)
    assert ref[0] < losses(runs / "fsdp")[0] - 0.01  # it really started from trained weights


@pytest.mark.timeout(900)
def test_zero3_fused_loss_matches_fsdp(runs):
    assert_close(losses(runs / "zero3_fused"), losses(runs / "fsdp_fused"), n=3)


@pytest.mark.timeout(900)
def test_deepspeed_checkpoint_weights_load_anywhere(runs):
    """The DCP copy of the weights in a ZeRO-3 checkpoint loads into a plain model (eval,
    export and init_from read it) and reproduces the run's held-out loss."""
    import torch

    from models.transformer import build_model
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config

    last = ckpt.latest_checkpoint(runs / "zero3")
    cfg = load_config(str(last / "config.yaml"))
    model = build_model(cfg.model, seed=123)
    before = model.output.weight.detach().clone()
    ckpt.load_model_weights(last, model)
    assert not torch.equal(before, model.output.weight)
    summary = json.loads((runs / "zero3" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["val_loss"] is not None


@pytest.mark.timeout(600)
def test_launch_deepspeed_hostfile_zero2_offload(runs, tiny_dataset, tmp_path):
    """``pretrain launch deepspeed --hostfile`` (DeepSpeed's own launcher, 2 slots on this
    host) trains with ZeRO-2 and CPU-offloaded optimizer state, matching FSDP2."""
    from conftest import tiny_overrides

    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    ov = tiny_overrides(tiny_dataset, run, **COMMON, **{"parallel.dp_engine": "deepspeed",
                                                        "parallel.zero_stage": 2,
                                                        "parallel.offload_optimizer": "true"})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([PY, "-m", "pretrain", "launch", "deepspeed", "--hostfile", str(hosts),
                        "--master-port", "29731", "tiny", *ov], capture_output=True, text=True,
                       timeout=500, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert_close(losses(run), losses(runs / "fsdp"))


def _worker(spec_path: str) -> None:
    """Run every job of the spec in sequence under torchrun, all on one process group."""
    sys.path.insert(0, str(HERE))
    import pretrain.train as trainer
    from conftest import tiny_overrides
    from pretrain.config import load_config
    from pretrain.train import train

    # train() would destroy the default group at its end; the next train() reuses it instead
    # (re-creating it in the same processes is not something training needs to support)
    trainer.parallel.shutdown_world = lambda world: None

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for name, overrides, fault in spec["runs"]:
        run_dir = out / name
        os.environ["PRETRAIN_FAULT"] = fault
        overrides = {k: v.format(out=out) if isinstance(v, str) else v for k, v in overrides.items()}
        cfg = load_config("tiny", tiny_overrides(Path(spec["data"]), run_dir, **{**COMMON, **overrides}))
        try:
            train(cfg)
        except RuntimeError as e:
            if not fault or "injected fault" not in str(e):
                raise
        os.environ["PRETRAIN_FAULT"] = ""


if __name__ == "__main__":
    _worker(sys.argv[1])
