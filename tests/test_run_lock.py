"""One live run per run directory (pretrain/run_lock.py): concurrent starts, kill -9 and
resume, a requeued run waiting for the holder, torchrun, launchers and sweeps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain import run_lock
from pretrain.config import load_config
from pretrain.metrics import read_metrics
from pretrain.train import train

PY = sys.executable


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _popen(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", *args], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _snapshot(d: Path) -> dict:
    """Every path under ``d`` with its size and modification time."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run)]


def _read_until(stream, needle: str, timeout: float) -> str:
    """Lines of ``stream`` up to the one holding ``needle`` (read in a thread: no deadlock)."""
    seen, found = [], threading.Event()

    def reader():
        for line in stream:
            seen.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), "".join(seen)[-3000:]
    return "".join(seen)


def _hold(run: Path) -> run_lock.RunLock:
    lock = run_lock.try_acquire(run)
    assert lock is not None and run_lock.is_locked(run)
    return lock


def _trained(data: Path, run: Path, steps: int) -> None:
    train(load_config("tiny", tiny_overrides(data, run, **{"train.steps": steps, "checkpoint.every": 0,
                                                           "train.eval_batches": 1})))


@pytest.mark.timeout(600)
def test_two_concurrent_starts_one_refused(tiny_dataset, tmp_path):
    """Both started at once (each pauses 6 s at step 2): one finishes, the other exits 2 with
    one line naming the directory and the holder; the metrics are complete and unique."""
    run = tmp_path / "run"
    args = ["pretrain", "train", "tiny", *tiny_overrides(tiny_dataset, run, **{
        "train.steps": 6, "checkpoint.every": 0, "train.eval_batches": 1})]
    procs = [_popen(args, PRETRAIN_FAULT="hang_at_step:2", PRETRAIN_FAULT_HANG_S="6") for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [o[1][-2000:] for o in outs])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = _error_lines(outs[loser][1])
    assert len(err) == 1, outs[loser][1]
    assert str(run) in err[0] and f"pid {procs[winner].pid}" in err[0] and socket.gethostname() in err[0]
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6]


@pytest.mark.timeout(600)
def test_kill9_holder_then_immediate_resume(tiny_dataset, tmp_path):
    """SIGKILL of the holder leaves no stale lock: a resume right after, with no wait, runs."""
    run = tmp_path / "run"
    args = ["pretrain", "train", "tiny", *tiny_overrides(tiny_dataset, run, **{
        "train.steps": 6, "checkpoint.every": 2, "train.eval_batches": 1})]
    holder = _popen(args, PRETRAIN_FAULT="hang_at_step:4", PRETRAIN_FAULT_HANG_S="600")
    try:
        deadline = time.time() + 180
        while not ((run / "metrics.jsonl").exists() and read_metrics(run) and _steps(run)[-1] >= 3):
            assert holder.poll() is None and time.time() < deadline, holder.communicate()[1][-2000:]
            time.sleep(0.2)
        assert run_lock.is_locked(run)
        assert run_lock.read_holder(run)["pid"] == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not run_lock.is_locked(run)
    p = _run([*args, "--checkpoint.resume=auto", "--checkpoint.lock_wait_s=0", "--logging.progress=plain"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stderr and "step_2" in p.stderr
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(600)
def test_refused_runs_write_nothing(tiny_dataset, tmp_path):
    """While a live process holds the run dir: `pretrain train` (resume off, or auto after a
    bounded wait) and `pretrain launch local` each exit 2 with one line and change nothing."""
    run = tmp_path / "run"
    _trained(tiny_dataset, run, 2)
    lock = _hold(run)
    try:
        before = _snapshot(run)
        base = ["pretrain", "train", "tiny", *tiny_overrides(tiny_dataset, run, **{"train.steps": 4})]
        cases = {"off": base,
                 "auto": [*base, "--checkpoint.resume=auto", "--checkpoint.lock_wait_s=1.5"],
                 "launch": ["pretrain", "launch", "local", "--nproc", "2", "tiny",
                            *tiny_overrides(tiny_dataset, run, **{"parallel.dp_shard": 2})]}
        for name, args in cases.items():
            t0 = time.time()
            p = _run(args)
            err = _error_lines(p.stderr)
            assert p.returncode == 2 and len(err) == 1, (name, p.stderr[-2000:])
            assert str(run) in err[0] and f"pid {os.getpid()}" in err[0], (name, err)
            if name == "auto":
                assert "waited 1.5s" in err[0] and "waiting up to 1.5s" in p.stderr
                assert time.time() - t0 >= 1.5
            assert _snapshot(run) == before, name
    finally:
        lock.release()
    assert not run_lock.is_locked(run)
    missing = tmp_path / "never"
    assert not run_lock.is_locked(missing) and not missing.exists()  # probing creates nothing


@pytest.mark.timeout(600)
def test_requeued_resume_waits_for_the_holder(tiny_dataset, tmp_path):
    """resume=auto on a held run dir waits (writing nothing) and continues once the holder exits."""
    run = tmp_path / "run"
    _trained(tiny_dataset, run, 3)
    lock = _hold(run)
    p = _popen(["pretrain", "train", "tiny", *tiny_overrides(tiny_dataset, run, **{
        "train.steps": 5, "train.eval_batches": 1, "checkpoint.resume": "auto",
        "checkpoint.lock_wait_s": 120, "logging.progress": "plain"})])
    try:
        before = _snapshot(run)
        _read_until(p.stderr, "waiting up to 120s", 120)
        time.sleep(1.0)
        assert _snapshot(run) == before and p.poll() is None
        lock.release()
        out, err = p.communicate(timeout=180)
    finally:
        lock.release()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    assert "resumed from" in err and "step_3" in err
    assert _steps(run) == [1, 2, 3, 4, 5]


@pytest.mark.timeout(600)
def test_torchrun_ranks_all_learn_the_refusal_and_the_wait(tiny_dataset, tmp_path):
    """Under torchrun with 2 processes: a refused run ends on every rank with status 2 and one
    error line (no hang, nothing written); a resume=auto run waits, then trains to the end."""
    run = tmp_path / "run"
    _trained(tiny_dataset, run, 2)
    status = tmp_path / "status"
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pretrain", "train",
                "tiny", *tiny_overrides(tiny_dataset, run, **{"train.steps": 4, "parallel.dp_shard": 2,
                                                              "train.eval_batches": 1})]
    lock = _hold(run)
    try:
        before = _snapshot(run)
        # a rank left waiting in a collective would sit out the 900 s process-group timeout:
        # the 240 s limit here would fail the test
        p = _run([*torchrun, "--parallel.timeout_s=900"], timeout=240, PRETRAIN_EXIT_STATUS_FILE=str(status))
        assert p.returncode != 0 and status.read_text().strip() == "2", p.stderr[-3000:]
        err = _error_lines(p.stderr)
        assert len(err) == 1 and "[rank 0]" in err[0] and f"pid {os.getpid()}" in err[0], p.stderr[-3000:]
        assert _snapshot(run) == before
        w = _popen([*torchrun, "--checkpoint.resume=auto", "--checkpoint.lock_wait_s=120",
                    "--logging.progress=plain"])
        try:
            _read_until(w.stderr, "waiting up to 120s", 240)
            time.sleep(1.5)  # several polls: every rank stays in step with rank 0's attempts
            assert _snapshot(run) == before and w.poll() is None
            lock.release()
            out, err = w.communicate(timeout=180)
        finally:
            if w.poll() is None:
                w.kill()
    finally:
        lock.release()
    assert w.returncode == 0, err[-3000:]
    assert "resumed from" in err and "step_2" in err
    assert _steps(run) == [1, 2, 3, 4]


def test_lock_wait_s_is_validated(tmp_path):
    from pretrain.errors import UserError

    for bad in ("-1", "inf", "nan"):
        with pytest.raises(UserError, match="checkpoint.lock_wait_s"):
            load_config("tiny", [f"--checkpoint.lock_wait_s={bad}"])


def test_unsupported_filesystem_warns_and_runs(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock = run_lock.try_acquire(tmp_path / "run")
    assert lock is not None and "no POSIX locks" in capsys.readouterr().err
    lock.release()


def test_one_process_cannot_lock_twice_and_keeps_its_lock(tmp_path):
    """POSIX locks belong to the process: this module answers for the locks it holds without
    opening the file (closing any descriptor of it would drop the lock)."""
    run = tmp_path / "run"
    lock = _hold(run)
    try:
        assert run_lock.try_acquire(run) is None
        assert run_lock.read_holder(run)["pid"] == os.getpid()
        # another process sees the lock as held, with this process's details in the file
        probe = ("import sys; from pretrain import run_lock; r = sys.argv[1]; "
                 "print(run_lock.is_locked(r), run_lock.try_acquire(r), run_lock.read_holder(r)['pid'])")
        out = subprocess.run([PY, "-c", probe, str(run)], env=_env(), capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        assert out.stdout.split() == ["True", "None", str(os.getpid())], out.stderr
        assert run_lock.is_locked(run)
    finally:
        lock.release()
    assert not run_lock.is_locked(run)


def test_slurm_submit_and_sweep_arrays_skip_a_held_directory(tmp_path, capsys):
    """`launch slurm` refuses to submit onto a held run dir (writing nothing) unless a
    --dependency orders the jobs; a SLURM sweep leaves a held point out of its arrays."""
    import yaml

    from pretrain import cli

    run = tmp_path / "run"
    lock = _hold(run)
    try:
        before = _snapshot(run)
        argv = ["launch", "slurm", "--nodes=1", "tiny", f"--logging.run_dir={run}"]
        assert cli.main(argv) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and str(run) in err[0] and f"pid {os.getpid()}" in err[0]
        assert _snapshot(run) == before
        # ordered after the holder: accepted (here it then fails for want of sbatch)
        assert cli.main([*argv[:3], "--sbatch=--dependency=afterany:1", *argv[3:]]) == 2
        assert "in use" not in capsys.readouterr().err

        out = tmp_path / "sweep"
        sweep = {"base": "tiny", "out": str(out), "axes": {"arch": {"a": {}, "b": {}}},
                 "slurm": ["--partition=gpu"]}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
        lock_b = _hold(out / "runs" / "b")
        try:
            assert cli.main(["scale-test", str(tmp_path / "s.yaml"), "--runner", "slurm", "--dry-run"]) == 0
        finally:
            lock_b.release()
        text = capsys.readouterr().out
        assert "b: skipped" in text and "in use by another run" in text
        assert (out / "runs" / "a" / "slurm" / "point.sbatch").is_file()
        assert not (out / "runs" / "b" / "slurm").exists()
        assert "--array=0-0" in (out / "slurm" / "array-n1x1.sbatch").read_text()
    finally:
        lock.release()
