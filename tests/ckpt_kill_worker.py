"""Crash, signal and straggler runs for tests/test_ckpt_async.py.

``python tests/ckpt_kill_worker.py DATA OUT NPROC TRIALS SEED MODES``: imports the trainer once,
then forks every training run (``NPROC`` ranks on a fresh gloo port), so ten crash trials
cost ten forks, not ten interpreter start-ups. Each trial resumes the run, lets a random
number of background writes complete, then SIGKILLs every rank at a random moment inside
the next write (slowed by ``PRETRAIN_FAULT_SLOW_SAVE_S`` so the window is wide) and records
which checkpoints are complete. A last run finishes training; its ``metrics.jsonl`` and an
uninterrupted run's are written to OUT/result.json.

Other MODES (comma-separated): ``signal`` sends SIGUSR1 to every rank while a background
write is in flight; ``straggler`` makes rank 1 sleep in every step (and writes
checkpoints and Hugging Face weights every 2 steps).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_overrides  # noqa: E402
from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.metrics import read_metrics  # noqa: E402

STEPS = 24
SLOW_S = 1.5
# rank 1 sleeps this long in every step; the warning threshold stays below the ratio that
# sleep gives on a loaded 2-core machine (steps of ~1 s: 2 * 2.0 / 3.0 = 1.33 for 2 ranks)
STRAGGLER_SLEEP_S, STRAGGLER_RATIO = 1.0, 1.2


def overrides(data: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, run, **{"train.steps": STEPS, "optim.schedule": "wsd", "optim.warmup_steps": 3,
                                        "optim.decay_fraction": 0.5, "train.eval_batches": 1, **extra})


def fork_run(nproc: int, ov: list[str], env: dict) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for r in range(nproc):
        pid = os.fork()
        if pid == 0:  # child: one rank
            code = 1
            try:
                os.environ.update(env, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                                  LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                import torch

                torch.set_num_threads(1)
                from pretrain.train import train_main

                code = train_main(load_config("tiny", ov))
            except BaseException as e:  # noqa: BLE001 - reported through the exit status
                print(f"rank {r}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def n_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def clean_streaming_shm() -> None:
    """Drop the shared memory of killed ranks' data loaders: mosaicml-streaming registers it
    machine-wide, and a SIGKILLed leader never unlinks it, so the next run's loader would find
    a stale registry ("prefix was not registered by local leader")."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()


def run_to_end(nproc: int, ov: list[str], env: dict, run: Path, retries: list) -> list[int]:
    """Fork the ranks and wait for them; relaunch (at most twice, recorded in ``retries``) when
    they failed before logging a step: mosaicml-streaming's shared-memory registry is
    machine-wide, and its start-up can race with other jobs' data loaders on the same machine."""
    for _ in range(3):
        before = n_logged(run)
        codes = wait_all(fork_run(nproc, ov, env))
        if codes == [0] * nproc or n_logged(run) > before:
            return codes
        retries.append(codes)
        clean_streaming_shm()
    return codes


def exited(pids: list[int], status: dict) -> bool:
    """True if any rank has exited (reaped into ``status``)."""
    for p in pids:
        if p not in status:
            done, st = os.waitpid(p, os.WNOHANG)
            if done:
                status[p] = os.waitstatus_to_exitcode(st)
    return bool(status)


def wait_all(pids: list[int], timeout: float = 400, status: dict | None = None) -> list[int]:
    status = dict(status or {})
    deadline = time.time() + timeout
    while not all(p in status for p in pids):
        exited(pids, status)
        if time.time() > deadline:
            for p in pids:
                if p not in status:
                    os.kill(p, signal.SIGKILL)
                    os.waitpid(p, 0)
                    status[p] = -9
        time.sleep(0.02)
    return [status[p] for p in pids]


def in_flight(run: Path) -> list[int]:
    root = ckpt.checkpoint_root(run)
    if not root.is_dir():
        return []
    return sorted(int(p.name[len(".tmp_step_"):]) for p in root.iterdir() if p.name.startswith(".tmp_step_"))


def latest_step(run: Path) -> int:
    latest = ckpt.latest_checkpoint(run)
    return int(latest.name[5:]) if latest else 0


def trial(nproc: int, data: Path, run: Path, rng: random.Random, retries: list) -> dict:
    """Resume, let ``completed`` writes finish, SIGKILL every rank inside the next one."""
    before = latest_step(run)
    completed = rng.randint(0, 2)
    target = before + completed + 1  # the step whose background write gets killed
    ov = overrides(data, run, **{"checkpoint.every": 1, "checkpoint.async": "true", "checkpoint.keep": 2,
                                 "checkpoint.resume": "auto"})
    for attempt in range(3):
        logged, status = n_logged(run), {}
        pids = fork_run(nproc, ov, {"PRETRAIN_FAULT_SLOW_SAVE_S": str(SLOW_S)})
        deadline = time.time() + 300
        while target not in in_flight(run) and not exited(pids, status) and time.time() < deadline:
            time.sleep(0.005)
        if target in in_flight(run) and not status:
            break
        codes = wait_all(pids, 60, status)
        if n_logged(run) > logged or attempt == 2:
            raise RuntimeError(f"the write of step {target} never started (exit codes {codes})")
        retries.append(codes)  # died while starting up (see run_to_end)
        clean_streaming_shm()
    delay = rng.uniform(0.0, 0.6 * SLOW_S)
    time.sleep(delay)
    for p in pids:
        os.kill(p, signal.SIGKILL)
    codes = wait_all(pids, status=status)
    clean_streaming_shm()
    return {"before": before, "killed_write_of": target, "delay_s": round(delay, 3), "codes": codes,
            "latest_after": latest_step(run), "in_flight_after": in_flight(run)}


def signal_run(nproc: int, data: Path, run: Path) -> dict:
    """SIGUSR1 to every rank while the write of step 4 is in flight."""
    ov = overrides(data, run, **{"checkpoint.every": 4, "checkpoint.async": "true", "train.steps": 200})
    pids = fork_run(nproc, ov, {"PRETRAIN_FAULT_SLOW_SAVE_S": "3"})
    deadline = time.time() + 180
    while 4 not in in_flight(run) or _last_step(run) < 5:  # training went on past the save
        if time.time() > deadline:
            raise RuntimeError("the write of step 4 never started")
        time.sleep(0.005)
    for p in pids:
        os.kill(p, signal.SIGUSR1)
    flight = in_flight(run)
    codes = wait_all(pids)
    return {"codes": codes, "in_flight_at_signal": flight, "complete": [s for s, _ in ckpt.list_checkpoints(run)],
            "in_flight_after": in_flight(run), "last_logged": read_metrics(run)[-1]["step"]}


def _last_step(run: Path) -> int:
    try:
        recs = read_metrics(run)
    except ValueError:  # a line being written
        return 0
    return recs[-1]["step"] if recs else 0


def straggler_run(nproc: int, data: Path, run: Path, retries: list) -> dict:
    ov = overrides(data, run, **{"train.steps": 6, "logging.log_every": 2, "checkpoint.every": 2,
                                 "checkpoint.hf_every": 2, "parallel.straggler_ratio": STRAGGLER_RATIO})
    env = {"PRETRAIN_FAULT_SLOW_STEP_S": str(STRAGGLER_SLEEP_S), "PRETRAIN_FAULT_RANK": "1"}
    codes = run_to_end(nproc, ov, env, run, retries)
    return {"codes": codes, "metrics": read_metrics(run)}


def main() -> None:
    data, out, nproc, trials, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5])
    modes = sys.argv[6].split(",")
    rng = random.Random(seed)
    result = {"startup_retries": []}
    retries = result["startup_retries"]
    if "straggler" in modes:
        result["straggler"] = straggler_run(nproc, data, out / "straggler", retries)
    if "signal" in modes:
        result["signal"] = signal_run(nproc, data, out / "signal")
    if "kill" in modes:
        ref, run = out / "ref", out / "run"
        codes = run_to_end(nproc, overrides(data, ref), {}, ref, retries)
        assert codes == [0] * nproc, codes
        result["trials"] = [trial(nproc, data, run, rng, retries) for _ in range(trials)]
        ov = overrides(data, run, **{"checkpoint.every": 1, "checkpoint.async": "true", "checkpoint.resume": "auto"})
        result["final_codes"] = run_to_end(nproc, ov, {}, run, retries)
        result.update(ref=[r["loss"] for r in read_metrics(ref)], got=[r["loss"] for r in read_metrics(run)],
                      got_steps=[r["step"] for r in read_metrics(run)])
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
