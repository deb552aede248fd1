"""``pretrain launch slurm`` against a real SLURM: a throw-away 2-node cluster on this machine
(tests/slurm_cluster.py; Debian's slurm and munge are installed when missing).

One 2-node CPU job (one srun task per node, each starting ``torchrun --nnodes 2`` with a
c10d rendezvous on the first node, one gloo process per node) trains a tiny model and is
preempted mid-run by a job of a higher-priority partition. The controller's SIGUSR1 to the
batch shell (``--signal=B:USR1@grace`` with ``preempt_send_user_signal``) must make training
checkpoint at the next step boundary and exit 3, the script requeue the job, and the
requeued job resume from that checkpoint and finish with the losses of an uninterrupted run.

The data is a Megatron-LM indexed dataset: on this machine the two "nodes" share one
/dev/shm, which mosaicml-streaming (MDS shards) coordinates per node, as if it were one.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT, tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain.metrics import read_metrics
from slurm_cluster import SlurmCluster, install

PY = sys.executable
STEPS = 160  # long enough that the preemption lands mid-run even on a fast machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install()
    if reason:
        msg = f"NO SLURM ON THIS MACHINE, SLURM TESTS NOT RUN: {reason}"
        print(f"\n{'!' * 20} {msg} {'!' * 20}", file=sys.stderr)
        warnings.warn(msg)
        pytest.skip(msg)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def megatron_data(tiny_dataset, tmp_path_factory):
    from megatron_data import write_megatron_dataset

    return write_megatron_dataset(tiny_dataset.parent / "corpus.jsonl", tiny_dataset / "tokenizer.model",
                                  tmp_path_factory.mktemp("megatron"))


def _overrides(data, run):
    return tiny_overrides(data, run, **{"train.steps": STEPS, "logging.progress": "plain",
                                        "train.preempt_grace_s": 30, "checkpoint.every": 0})


def _wait(what: str, cond, timeout: float, cluster, job: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {cluster.job_info(job)}\n{cluster.logs()}")


@pytest.mark.timeout(600)
def test_preempted_job_requeues_and_resumes_exactly(cluster, megatron_data, tmp_path, monkeypatch):
    # the uninterrupted run: same data and config, in one process (two processes reduce
    # gradients in another order, so losses agree to float rounding, not bit for bit)
    from pretrain.config import load_config
    from pretrain.train import train

    ref = tmp_path / "ref"
    train(load_config("tiny", _overrides(megatron_data, ref)))
    want = [r["loss"] for r in read_metrics(ref)]
    assert len(want) == STEPS

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SLURM_CONF": str(cluster.conf)}
    for k, v in env.items():  # sbatch hands the submitting environment to the job
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    p = subprocess.run([PY, "-m", "pretrain", "launch", "slurm", "--nodes", "2", "--grace", "60",
                        "--job-name", "tiny 'preempt' $(test)", "tiny", *_overrides(megatron_data, run)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    info = cluster.job_info(job)
    # (a job not started yet reports its node count as a range, "2-2")
    assert info["NumNodes"].split("-")[0] == "2" and info["JobName"] == "tiny 'preempt' $(test)", info

    def at_step(n):
        return lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= n

    _wait("step 3", at_step(3), 240, cluster, job)
    # a real preemption: a job of the higher-tier partition needs both nodes; the controller
    # sends our job its --signal (B:USR1) within the partition's GraceTime (what
    # `scancel --signal=USR1 --batch JOB` would do by hand)
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--nodes=2",
                             f"--output={tmp_path}/urgent-%j.out", "--wrap", "echo urgent ran"],
                            capture_output=True, text=True, env=cluster.env, timeout=30)
    assert urgent.returncode == 0, urgent.stderr
    urgent_job = urgent.stdout.strip()
    _wait("the requeued job to finish",
          lambda: cluster.job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
          and cluster.job_info(job).get("Restarts") == "1", 400, cluster, job)
    info = cluster.job_info(job)
    out = (run / "slurm" / f"tiny 'preempt' $(test)-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out[-4000:]
    assert cluster.job_info(urgent_job)["JobState"] == "COMPLETED"
    assert (tmp_path / f"urgent-{urgent_job}.out").read_text() == "urgent ran\n"

    # the first run stopped at a step boundary with a checkpoint and asked to be requeued ...
    saved = [s for s, _ in ckpt.list_checkpoints(run)]
    assert len(saved) == 2 and 3 <= saved[0] < STEPS and saved[1] == STEPS, saved
    assert "SIGUSR1: training will checkpoint" in out
    assert "training exited with status 3" in out and "checkpoint saved" in out
    assert f"requeueing job {job}" in out
    # ... and the requeued one resumed from it and finished
    assert f"restart 1: 2 node(s) x 1 process(es)" in out
    assert f"resumed from {run / 'checkpoints' / f'step_{saved[0]}'}: continuing at step {saved[0] + 1}" in out
    assert out.rstrip().endswith("training exited with status 0")
    got = [r["loss"] for r in read_metrics(run)]
    assert len(got) == STEPS and all(math.isclose(g, w, rel_tol=1e-5) for g, w in zip(got, want)), (got, want)

    # each attempt ran one torchrun per node, joined by the rendezvous into 2 ranks
    for attempt in ("0", "1"):
        nodes = sorted(p.name for p in (run / "logs" / f"{job}.{attempt}").iterdir())
        assert nodes == ["node0", "node1"], nodes
        for node in nodes:
            logs = list((run / "logs" / f"{job}.{attempt}" / node).glob("*/attempt_0/0/stderr.log"))
            assert len(logs) == 1, logs
    assert "[rank0]: " in out and "[rank1]: " in out
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
