"""Shared harness for multi-process tests: run a list of jobs in one torchrun group.

A worker script reads a JSON list of jobs, runs them all on one process group (so a
test module pays the start-up once) and writes a JSON dict of results by job name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_jobs(worker: str, nproc: int, jobs: list[dict], tmp: Path, timeout: float,
             steps: int | None = None, partial: bool = False, fork: bool = False) -> dict:
    """Run ``jobs`` with ``tests/<worker>`` under ``torchrun --nproc_per_node nproc``.

    A failed launch raises, naming the failures the ranks reported (the whole stderr is
    kept in ``tmp``); with ``partial`` it returns the jobs that finished instead, and an
    error for each of the others. ``fork``: start the ranks with tests/fork_run.py instead
    (the imports paid once, not per rank; the worker defines ``main(spec, out)``)."""
    spec, out = tmp / f"jobs{nproc}.json", tmp / f"results{nproc}.json"
    if steps is not None:
        jobs = [{"steps": steps, **j} for j in jobs]
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PG_TIMEOUT=os.environ.get("PG_TIMEOUT", "60"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / worker), str(spec), str(out)]
    if fork:
        cmd = [sys.executable, str(ROOT / "tests" / "fork_run.py"), str(nproc), worker, str(spec), str(out)]
    log = tmp / f"stderr{nproc}.log"
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=f, timeout=timeout, env=env,
                                  cwd=ROOT).returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout:.0f} s"
    # the launch's cost (start-up included) beside the per-job ``seconds`` / ``cpu_seconds``
    (tmp / f"launch{nproc}.json").write_text(json.dumps(
        {"wall": round(time.perf_counter() - t0, 2), "cpu": round(_children_cpu() - cpu0, 2)}))
    if code == 0 and out.is_file():
        return json.loads(out.read_text())
    why = f"{'fork_run' if fork else 'torchrun'} exited with {code} ({log}):\n{failures(log.read_text())}"
    if not partial:
        raise AssertionError(why)
    done = Path(f"{out}.partial")
    results = json.loads(done.read_text()) if done.is_file() else {}
    return {j["name"]: results.get(j["name"], {"error": why, "trace": why}) for j in jobs}


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def failures(stderr: str, limit: int = 6000) -> str:
    """The lines of a worker's stderr that say what failed (its tracebacks, the first rank
    error), not torchrun's teardown noise."""
    lines = stderr.splitlines()
    keep = [i for i, l in enumerate(lines) if "failed" in l or "Error" in l or "Traceback" in l]
    picked = sorted({k for i in keep[:40] for k in range(i, min(i + 12, len(lines)))})
    text = "\n".join(lines[k] for k in picked if "elastic" not in lines[k])
    return text[:limit] or stderr[-limit:]


def job_result(results: dict, name: str) -> dict:
    res = results[name]
    assert "error" not in res, res.get("trace", res)
    return res


def assert_steps_close(got, want, rel):
    """Per-step values equal the single-process ones within ``rel`` relative."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= rel * abs(w), f"step {i + 1}: {g} vs single-process {w}"


def serve_jobs(run_job, spec_path: str, out_path: str, combine=None) -> None:
    """Worker side of :func:`run_jobs`: run every job of SPEC with ``run_job(job) -> dict``
    on one gloo process group; a failing job is reported (not raised) so the group lives on
    for the next. ``combine(per_rank_results) -> dict`` merges the ranks' results (default:
    rank 0's); rank 0 writes them all to OUT."""
    import datetime
    import time
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("PG_TIMEOUT", "90")))
    # tests/fork_run.py's ranks meet through a FileStore; torchrun's through its env
    dist.init_process_group("gloo", init_method=os.environ.get("JOBS_INIT_METHOD"), timeout=timeout)
    rank = dist.get_rank()
    results = {}
    for job in json.loads(Path(spec_path).read_text()):
        print(f"[rank {rank}] {job['name']}", file=sys.stderr, flush=True)
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            res = run_job(job)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(f"[rank {rank}] {job['name']} failed:\n{res['trace']}", file=sys.stderr, flush=True)
        cpu = time.process_time() - cpu0
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        errors = [r for r in gathered if "error" in r]
        results[job["name"]] = errors[0] if errors else (combine or (lambda rs: rs[0]))(gathered)
        results[job["name"]]["seconds"] = round(time.perf_counter() - t0, 2)  # the CI budget
        cpus = [None] * dist.get_world_size()  # CPU of all ranks: wall alone misleads on a shared machine
        dist.all_gather_object(cpus, cpu)
        results[job["name"]]["cpu_seconds"] = round(sum(cpus), 2)
        if rank == 0:  # after every job: a launch that times out still shows how far it got
            tmp = Path(f"{out_path}.partial")
            tmp.write_text(json.dumps(results))
        dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()
