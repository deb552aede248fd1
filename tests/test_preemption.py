"""Preemption in the training process itself: the grace deadline, no partial checkpoints,
the NaN stop policy. (Multi-process signal handling: test_launch.py and test_slurm.py.)"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.errors import EXIT_PREEMPTED, UserError
from pretrain.metrics import read_metrics

PY = sys.executable


@pytest.mark.timeout(120)
def test_grace_deadline_fires_while_blocked_in_c():
    """The main thread waits inside C++ (a process-group rendezvous whose peer never comes),
    where Python signal handlers cannot run; the deadline still ends the process with 3."""
    code = textwrap.dedent("""
        import datetime, os, signal, socket, threading, time
        import torch.distributed as dist
        from pretrain.resilience import PreemptionFlag
        flag = PreemptionFlag(grace_s=1.0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        t0 = time.time()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        print("rendezvous returned after", time.time() - t0)
    """)
    t0 = time.time()
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=100, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == EXIT_PREEMPTED, (p.stdout, p.stderr[-2000:])
    assert "no step boundary within train.preempt_grace_s=1s of SIGUSR1" in p.stderr
    assert "rendezvous returned" not in p.stdout
    assert time.time() - t0 < 50


@pytest.mark.timeout(180)
def test_signal_in_a_slow_step_exits_after_grace_without_checkpoint(tiny_dataset, tmp_path):
    """SIGTERM while step 3 hangs: after train.preempt_grace_s the process exits with 3 and
    leaves only the complete checkpoints it had (no partial step_3)."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PRETRAIN_FAULT="hang_at_step:3",
               PRETRAIN_FAULT_HANG_S="600")
    args = ["train", "tiny", *tiny_overrides(tiny_dataset, run, **{"train.steps": 10, "checkpoint.every": 1,
                                                                   "train.preempt_grace_s": 2})]
    proc = subprocess.Popen([PY, "-m", "pretrain", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 150
        while not ckpt.list_checkpoints(run) or ckpt.latest_checkpoint(run).name != "step_2":
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        time.sleep(0.5)  # now inside the hanging step 3
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "no step boundary within train.preempt_grace_s=2s of SIGTERM" in err
    assert 1.5 < waited < 30, waited
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 2]
    assert not (ckpt.checkpoint_root(run) / ".tmp_step_3").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_nan_stop_policy_names_the_step(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_FAULT", "nan_at_step:2")
    from pretrain.train import train

    cfg = load_config("tiny", tiny_overrides(tiny_dataset, tmp_path / "run", **{"train.steps": 4}))
    with pytest.raises(UserError, match=r"non-finite loss \(nan\).* at step 2; set train.nan_policy=skip"):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
