"""``pretrain launch``: generated SLURM scripts (quoting), the local torchrun launcher with
signals and the NaN policy, and a failing rank taking the whole job down."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain.metrics import read_metrics

PY = sys.executable
EVIL = "x'; rm -rf / #\"$(reboot)`id`\\\n; echo pwned"


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """``pretrain ARGS`` in this process (the launcher's own work needs no subprocess)."""
    from pretrain.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def dry_run_script(capsys, tmp_path, *launcher, overrides=()):
    run = tmp_path / "run"
    return cli(capsys, "launch", "slurm", *launcher, "--dry-run", "tiny", f"--logging.run_dir={run}",
               *overrides)


def test_slurm_script_quotes_hostile_values(capsys, tmp_path):
    """Job names, overrides and --env values that try to inject shell stay literal."""
    name = "job $(touch pwned) `id` 'q; ls && echo $HOME"
    ov = [f"--data.path={EVIL}", "--model.n_layers=2", f"--logging.tensorboard=false"]
    p = dry_run_script(capsys, tmp_path, "--nodes", "2", "--gpus-per-node", "4", "--job-name", name,
                       "--partition", "gpu", "--account", "acct-1", "--time", "2-00:00:00", "--qos", "high",
                       "--constraint", "a100&ib", "--exclusive", "--env", f"MY_VAR={EVIL}",
                       overrides=ov)
    assert p.returncode == 0, p.stderr
    script = p.stdout
    # sbatch reads double-quoted #SBATCH values literally
    assert f'#SBATCH --job-name="{name}"' in script
    for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=4',
                 '#SBATCH --partition="gpu"', '#SBATCH --account="acct-1"', '#SBATCH --time="2-00:00:00"',
                 '#SBATCH --qos="high"', '#SBATCH --constraint="a100&ib"', '#SBATCH --exclusive',
                 '#SBATCH --requeue', '#SBATCH --signal=B:USR1@180'):
        assert line in script.splitlines(), line
    assert f"export MY_VAR={shlex.quote(EVIL)}" in script
    assert "PRETRAIN_NPROC_PER_NODE=4" in script
    # the training arguments: one shell line whose words are exactly the intended argv
    srun = script.index("srun --kill-on-bad-exit=1")
    args_at = script.index(" \\\n  train ", srun)
    words = shlex.split(script[srun:args_at]) + shlex.split(script[args_at + 3:script.index(" &\n", srun)])
    assert words[:7] == ["srun", "--kill-on-bad-exit=1", '--nodes=$SLURM_JOB_NUM_NODES',
                         "--ntasks-per-node=1", '--cpus-per-task=$cpus', "bash", "-c"]
    assert words[8] == "pretrain-node"
    assert words[9:] == ["train", str(ROOT / "configs" / "tiny.yaml"), f"--logging.run_dir={tmp_path / 'run'}",
                         *ov, "--checkpoint.resume=auto"]
    assert "rm -rf" not in words[7] and "reboot" not in words[7]  # user values never enter bash -c's program
    # and bash agrees: the script parses, and evaluating the argv line gives the same words
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    line = script[script.index("  train ", srun):script.index(" &\n", srun)]
    echo = subprocess.run(["bash", "-c", f'printf "%s\\0" {line}'], capture_output=True, text=True)
    assert echo.stdout.split("\0")[:-1] == words[9:]


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "1", "--job-name", 'a"b'], "--job-name"),
    (["--nodes", "1", "--partition", "p\nq"], "--partition"),
    (["--nodes", "1", "--job-name", "a/b"], "--job-name"),
    (["--nodes", "0"], "--nodes"),
    (["--nodes", "1", "--grace", "60"], "preempt_grace_s"),  # tiny keeps the default 120 s
    (["--nodes", "1", "--env", "1BAD=x"], "--env"),
])
def test_slurm_bad_values_are_refused(capsys, tmp_path, args, needle):
    p = dry_run_script(capsys, tmp_path, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr


@pytest.mark.parametrize("args,needle", [
    (["launch"], "usage"),
    (["launch", "local", "--nproc", "2"], "CONFIG"),
    (["launch", "local", "tiny", "--model.n_heads=5"], "model.n_heads"),
    (["launch", "local", "tiny", "oops"], "oops"),
    (["launch", "slurm", "--nodes", "1", "tiny", "--checkpoint.resume=/x"], "checkpoint.resume"),
    (["launch", "deepspeed", "--hostfile", "/no/such/hostfile", "tiny"], "hostfile"),
    (["launch", "local", "--nproc", "3", "tiny", "--parallel.tp=2"], "3 processes"),
    (["launch", "slurm", "--nodes", "2", "--gpus-per-node", "4", "tiny", "--parallel.dp_shard=3"],
     "8 processes"),
])
def test_launch_cli_errors(capsys, args, needle):
    p = cli(capsys, *args)
    if needle == "usage":
        assert p.returncode == 0 and "local" in p.stdout and "slurm" in p.stdout
        return
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_deepspeed_hostfile_command(capsys, tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two workers\nworker-0 slots=8\nworker-1 slots=8\n")
    p = cli(capsys, "launch", "deepspeed", "--hostfile", str(hosts), "--dry-run", "tiny",
            "--parallel.dp_engine=deepspeed", f"--logging.run_dir={tmp_path}/r")
    # refused before launching, as the trainer would refuse it (pretrain.layout_check.check_run)
    assert p.returncode == 2 and "train.global_batch=8" in p.stderr and "16 processes" in p.stderr, p.stderr
    p = cli(capsys, "launch", "deepspeed", "--hostfile", str(hosts), "--dry-run", "tiny",
            "--parallel.dp_engine=deepspeed", "--train.global_batch=16", f"--logging.run_dir={tmp_path}/r")
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout)
    assert words[1:4] == ["-m", "deepspeed.launcher.runner", f"--hostfile={hosts}"]
    assert words[words.index("--module"):][:3] == ["--module", "pretrain", "train"]
    assert "--no_local_rank" in words
    hosts.write_text("worker-0 slots=eight\n")
    p = cli(capsys, "launch", "deepspeed", "--hostfile", str(hosts), "--dry-run", "tiny")
    assert p.returncode == 2 and "hostfile" in p.stderr and ":1:" in p.stderr


def _wait_for_step(run: Path, step: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited early ({proc.returncode})")
        recs = read_metrics(run) if (run / "metrics.jsonl").exists() else []
        if recs and recs[-1]["step"] >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.timeout(300)
def test_local_launch_signal_checkpoints_and_nan_skip(tiny_dataset, tmp_path):
    """2 processes under torchrun: a NaN step is skipped and counted; SIGUSR1 to the launcher
    reaches the workers, which checkpoint at the next step boundary; the launcher exits 3."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PRETRAIN_FAULT="nan_at_step:2")
    args = ["launch", "local", "--nproc", "2", "tiny",
            *tiny_overrides(tiny_dataset, run, **{"train.steps": 200, "train.nan_policy": "skip",
                                                  "checkpoint.every": 0})]
    proc = subprocess.Popen([PY, "-m", "pretrain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run, 3, proc)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out[-3000:]
    recs = read_metrics(run)
    saved = [s for s, _ in ckpt.list_checkpoints(run)]
    assert len(saved) == 1 and 3 <= saved[0] < 200 and saved[0] == recs[-1]["step"], (saved, out[-2000:])
    assert recs[1]["loss"] == "nan" and recs[1]["nan_skipped"] == 1 and recs[-1]["nan_skipped"] == 1
    assert all(isinstance(r["loss"], float) for r in recs[2:])
    state = ckpt.read_trainer_state(ckpt.latest_checkpoint(run))
    assert state["nan_skipped"] == 1 and state["step"] == saved[0]
    logs = list((run / "logs").glob("local-*/*/attempt_0/*/stderr.log"))
    assert len(logs) == 2, logs  # one log per rank
    assert "training stopped after a preemption signal" in out


def _spawn_ranks(run: Path, data: Path, fault: str, extra: list[str], n: int = 2):
    """``n`` ranks started directly (no torchrun to tear the group down): only training's own
    mechanisms (closed connections, process-group timeouts, the watchdog) end them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT), PRETRAIN_FAULT=fault, PRETRAIN_FAULT_RANK="1",
                   PRETRAIN_FAULT_HANG_S="600")
        procs.append(subprocess.Popen(
            [PY, "-m", "pretrain", "train", "tiny",
             *tiny_overrides(data, run, **{"train.steps": 50, "logging.progress": "plain"}), *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _finish(procs, timeout: float) -> tuple[list[int], list[str], float]:
    t0 = time.time()
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(timeout - (time.time() - t0), 1))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], outs, time.time() - t0


@pytest.mark.timeout(240)
def test_raising_rank_brings_all_ranks_down(tiny_dataset, tmp_path):
    """Rank 1 raises at step 4; rank 0, in a collective with it, exits too, well within the
    process-group timeout."""
    procs = _spawn_ranks(tmp_path / "run", tiny_dataset, "raise_at_step:4", ["--parallel.timeout_s=60"])
    codes, outs, _ = _finish(procs, 200)
    assert codes[1] == 1 and "injected fault at step 4" in outs[1], outs[1][-2000:]
    assert codes[0] not in (0, None), outs[0][-2000:]
    assert "step 50/50" not in outs[0]
    # rank 0 did not wait out the 60 s timeout: it saw the peer's connection close
    assert "Timed out" not in outs[0], outs[0][-2000:]


@pytest.mark.timeout(240)
def test_hung_rank_is_ended_by_the_watchdog(tiny_dataset, tmp_path):
    """Rank 1 hangs in step 4: rank 0's collective times out (parallel.timeout_s) and rank
    1's watchdog ends it (status 4) after dumping its stack: no rank waits forever."""
    from pretrain.errors import EXIT_HANG

    procs = _spawn_ranks(tmp_path / "run", tiny_dataset, "hang_at_step:4", ["--parallel.timeout_s=12"])
    t0 = time.time()
    codes, outs, _ = _finish(procs, 200)
    elapsed = time.time() - t0
    assert codes[1] == EXIT_HANG and "watchdog: rank 1 made no progress" in outs[1], outs[1][-2000:]
    assert "maybe_hang" in outs[1]  # the stack dump shows where it hung
    assert codes[0] not in (0, None) and "step 4/50" not in outs[0], outs[0][-2000:]
    assert elapsed < 120, elapsed
