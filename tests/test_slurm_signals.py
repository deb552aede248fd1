"""The generated SLURM script's signal handling, run under bash with fake ``srun`` and
``scontrol``: SIGUSR1 (time limit, preemption) is passed on and the job requeued after
training stops with status 3; SIGTERM (a cancellation) is passed on and never requeued."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

FAKE_SRUN = """#!/bin/bash
# training stand-in: record the signal it is handed, stop as training does (status 3)
trap 'echo USR1 >> "$FAKE_LOG"; exit 3' USR1
trap 'echo TERM >> "$FAKE_LOG"; exit 3' TERM
echo started >> "$FAKE_LOG"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "-o show") echo "NodeName=node1 NodeAddr=127.0.0.1" ;;
  "requeue "*) echo "scontrol $*" >> "$FAKE_LOG" ;;
esac
"""


def _script(tmp_path: Path, capsys) -> Path:
    from pretrain.cli import main

    capsys.readouterr()
    assert main(["launch", "slurm", "--nodes", "1", "--dry-run", "tiny", f"--logging.run_dir={tmp_path / 'run'}"]) == 0
    path = tmp_path / "job.sbatch"
    path.write_text(capsys.readouterr().out)
    return path


def _run_with_signal(tmp_path: Path, script: Path, sig: int) -> tuple[int, list[str], str]:
    bin_dir, log = tmp_path / "bin", tmp_path / "fake.log"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while "started" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the fake srun never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log.read_text().split("\n"), out


@pytest.mark.timeout(240)
def test_sigterm_is_passed_on_and_not_requeued(tmp_path, capsys):
    code, log, out = _run_with_signal(tmp_path, _script(tmp_path, capsys), signal.SIGTERM)
    assert "TERM" in log, (log, out)
    assert not any(line.startswith("scontrol requeue") for line in log), (log, out)
    assert code == 3, out  # training's own status: checkpointed and stopped


@pytest.mark.timeout(240)
def test_sigusr1_is_passed_on_and_requeued(tmp_path, capsys):
    code, log, out = _run_with_signal(tmp_path, _script(tmp_path, capsys), signal.SIGUSR1)
    assert "USR1" in log and "scontrol requeue 4242" in log, (log, out)
    assert code == 0 and "requeueing job 4242" in out, out
