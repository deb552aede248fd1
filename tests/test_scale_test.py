"""``pretrain scale-test``: sweep resume, the report's table and plots, SLURM arrays, ``plot``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from pretrain import cli

COMMON = {"train.steps": 4, "train.eval_batches": 1, "checkpoint.every": 0, "logging.progress": "off",
          "optim.warmup_steps": 1}


def write_sweep(tmp_path: Path, data: Path, axes: dict, **extra) -> Path:
    sweep = {"base": "tiny", "overrides": {"data.path": str(data), **COMMON},
             "out": str(tmp_path / "sweep"), "axes": axes}
    sweep.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _png_ok(path: Path) -> bool:
    head = path.read_bytes()[:24]
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return head[:8] == b"\x89PNG\r\n\x1a\n" and width >= 400 and height >= 300 and path.stat().st_size > 15_000


def test_sweep_runs_each_point_once_and_resumes(tiny_dataset, tmp_path, capsys):
    path = write_sweep(tmp_path, tiny_dataset, {"tokens": [768, 1024]},  # 3 and 4 steps of 256 tokens
                       overrides={"data.path": str(tiny_dataset), **COMMON, "checkpoint.every": 2})
    assert cli.main(["scale-test", str(path), "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "2 points, 0 finished, 2 to run" in out
    runs = tmp_path / "sweep" / "runs"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["t1024", "t768"]
    steps = {p: json.loads((runs / p / "summary.json").read_text())["steps"] for p in ("t768", "t1024")}
    assert steps == {"t768": 3, "t1024": 4}
    stamp = {p: (runs / p / "metrics.jsonl").stat().st_mtime_ns for p in steps}

    assert cli.main(["scale-test", str(path), "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "2 points, 2 finished, 0 to run" in out and "training" not in out
    assert stamp == {p: (runs / p / "metrics.jsonl").stat().st_mtime_ns for p in steps}

    # an interrupted point (killed after its step-2 checkpoint) resumes from that checkpoint
    import shutil

    (runs / "t1024" / "summary.json").unlink()
    shutil.rmtree(runs / "t1024" / "checkpoints" / "step_4")
    assert cli.main(["scale-test", str(path), "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "1 to run" in out and "t1024: training" in out and "t768: training" not in out
    assert json.loads((runs / "t1024" / "summary.json").read_text())["steps"] == 4
    recs = [json.loads(line) for line in (runs / "t1024" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["name"] for p in manifest["points"]] == ["t768", "t1024"]


def test_report_compares_two_architectures(tiny_dataset, tmp_path, capsys):
    axes = {"size": {"rule": {"width": [32, 64], "aspect": 32, "head_dim": 16, "kv_ratio": 2}},
            "arch": {"dense": {"model.pattern": "*-"},
                     "moe": {"model.pattern": "*E", "model.moe.n_experts": 4, "model.moe.top_k": 2}}}
    path = write_sweep(tmp_path, tiny_dataset, axes)
    assert cli.main(["scale-test", str(path), "--in-process"]) == 0
    report = tmp_path / "sweep" / "report"
    rows = list(csv.DictReader(open(report / "table.csv")))
    assert [r["point"] for r in rows] == ["w32_dense", "w32_moe", "w64_dense", "w64_moe"]
    for col in ("params", "active_params", "flops_per_token", "tokens", "tokens_per_s", "mfu",
                "peak_memory_mb", "val_loss", "arch", "size", "layout"):
        assert col in rows[0], col
    for r in rows:
        assert float(r["val_loss"]) > 0 and float(r["tokens_per_s"]) > 0 and int(r["tokens"]) == 4 * 256
        assert r["mfu"] == ""  # CPU: no known peak
    moe = next(r for r in rows if r["point"] == "w64_moe")
    assert int(moe["active_params"]) < int(moe["params"])  # top-2 of 4 experts
    md = (report / "table.md").read_text().splitlines()
    assert md[0].startswith("| point |") and "val_loss" in md[0] and len(md) == 2 + len(rows)
    for png in ("loss_vs_tokens.png", "loss_vs_flops.png", "throughput_memory.png"):
        assert _png_ok(report / png), png
    fits = json.loads((report / "fits.json").read_text())
    assert set(fits) == {"dense", "moe"} and all(f["a"] > 0 for f in fits.values())


def test_slurm_runner_writes_job_arrays(tmp_path, capsys):
    axes = {"arch": {"dense": {}, "ladder": {"model.residual": "ladder"}},
            "layout": {"one": {}, "fsdp2": {"nproc": 2, "parallel.dp_shard": 2}}}
    path = write_sweep(tmp_path, tmp_path / "data", axes,
                       slurm=["--partition=gpu", "--gpus-per-node=2", "--time=01:00:00"])
    assert cli.main(["scale-test", str(path), "--runner", "slurm", "--dry-run"]) == 0
    slurm_dir = tmp_path / "sweep" / "slurm"
    arrays = sorted(p.name for p in slurm_dir.glob("array-*.sbatch"))
    assert arrays == ["array-n1x1.sbatch", "array-n1x2.sbatch"]
    text = (slurm_dir / "array-n1x2.sbatch").read_text()
    assert "#SBATCH --array=0-1" in text and '#SBATCH --partition="gpu"' in text
    assert "--nodes=1" in text
    for point in ("dense_fsdp2", "ladder_fsdp2"):
        script = tmp_path / "sweep" / "runs" / point / "slurm" / "point.sbatch"
        assert f"exec bash {script.resolve()}" in text
        body = script.read_text()
        assert "PRETRAIN_NPROC_PER_NODE=2" in body and "--checkpoint.resume=auto" in body


def test_plot_cli(tiny_dataset, tmp_path, capsys):
    from pretrain.config import load_config
    from pretrain.train import train

    from conftest import tiny_overrides

    runs = []
    for name, residual in (("standard", "standard"), ("ladder", "ladder")):
        run = tmp_path / name
        train(load_config("tiny", tiny_overrides(tiny_dataset, run, **{
            "train.steps": 3, "train.eval_batches": 1, "model.residual": residual})))
        runs.append(str(run))
    out = tmp_path / "plots"
    assert cli.main(["plot", *runs, "--out", str(out)]) == 0
    assert _png_ok(out / "loss.png") and _png_ok(out / "throughput.png")
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("text,needle", [
    ("base: tiny\naxes: {size: {rule: {width: [30]}}}\n", "multiple of head_dim"),
    ("base: tiny\nmodels: 3\n", "unknown key 'models'"),
    ("axes: {}\n", "missing 'base'"),
])
def test_bad_sweep_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["scale-test", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.timeout(300)
def test_two_sweeps_on_one_directory_never_run_a_point_twice(tiny_dataset, tmp_path, capsys):
    """Sweep A (a process) pauses in its first point; sweep B skips that point (locked) and
    trains the other; A then finds the other finished. Every point ran once, metrics unique."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from pretrain import run_lock

    path = write_sweep(tmp_path, tiny_dataset, {"tokens": [768, 1024]})
    runs = tmp_path / "sweep" / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PRETRAIN_FAULT="hang_at_step:2",
               PRETRAIN_FAULT_HANG_S="8")
    a = subprocess.Popen([sys.executable, "-m", "pretrain", "scale-test", str(path), "--in-process"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not run_lock.is_locked(runs / "t768"):
            assert a.poll() is None and time.time() < deadline, a.communicate()[0][-2000:]
            time.sleep(0.2)
        assert cli.main(["scale-test", str(path), "--in-process"]) == 0
        out_b = capsys.readouterr().out
        out_a = a.communicate(timeout=200)[0]
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, out_a[-2000:]
    assert "t768: skipped" in out_b and "in use by another run" in out_b and "t1024: training" in out_b
    assert "t768: training" in out_a and "t1024: training" not in out_a, out_a[-2000:]
    assert "t1024: skipped" in out_a or "t1024: finished meanwhile" in out_a, out_a[-2000:]
    for name, steps in (("t768", 3), ("t1024", 4)):
        recs = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, steps + 1)), name
        assert json.loads((runs / name / "summary.json").read_text())["steps"] == steps
