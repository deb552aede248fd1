"""``pretrain launch deepspeed --hostfile FILE CONFIG [overrides]``: DeepSpeed's launcher.

For clusters without SLURM: the hostfile lists ``<host> slots=<processes>`` per line
(MPI style). DeepSpeed's runner starts the processes on every host (over pdsh/ssh when
there are several hosts, directly on this machine when there is one) with
RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR/MASTER_PORT set, which is all training needs;
the engine is still chosen by the config (``parallel.dp_engine: deepspeed`` for ZeRO, or
FSDP2). Each rank's output goes to ``<run_dir>/logs/deepspeed-<time>/``.

Unlike torchrun, DeepSpeed's launcher kills its workers on SIGTERM without waiting for a
checkpoint; signal the training processes themselves (or use SLURM) on preemptible machines.
Its exit status is the first failing worker's, so 3 still means "stopped after checkpointing".
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from launch.jobs import TrainJob, describe_status, env_with, python, shell_join
from pretrain.errors import UserError

_HOST_LINE = re.compile(r"^([A-Za-z0-9_.:\-\[\]]+)\s+slots=(\d+)\s*$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pretrain.cliargs import integer, name, path

    p.add_argument("--hostfile", required=True, type=path(exists=True), help="lines of '<host> slots=<processes>'")
    p.add_argument("--include", type=name(), help="DeepSpeed resource filter, e.g. 'worker-0@worker-1:0,2'")
    p.add_argument("--exclude", type=name(), help="DeepSpeed resource filter")
    p.add_argument("--master-addr", type=name(), help="address of the first host (default: DeepSpeed's choice)")
    p.add_argument("--master-port", type=integer(ge=1, le=65535), default=29500)
    p.add_argument("--dry-run", action="store_true", help="print the command; run nothing")


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, slots) pairs; a UserError names the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--hostfile: {path} not found")
    hosts = []
    for i, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise UserError(f"--hostfile {path}:{i}: expected '<host> slots=<n>' with n >= 1, got {raw!r}")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise UserError(f"--hostfile {path}: lists no hosts")
    return hosts


def command(args, job: TrainJob, log_dir: str | None = None) -> list[str]:
    hosts = read_hostfile(args.hostfile)
    if args.include and args.exclude:
        raise UserError("--include and --exclude are mutually exclusive")
    cmd = [python(), "-m", "deepspeed.launcher.runner", f"--hostfile={Path(args.hostfile).resolve()}",
           f"--master_port={args.master_port}"]
    master = args.master_addr
    if len(hosts) == 1:
        # one host: DeepSpeed runs it locally, so its ssh reachability checks only get in the way
        cmd.append("--no_ssh_check")
        master = master or "127.0.0.1"
    if master:
        cmd.append(f"--master_addr={master}")
    if log_dir:
        cmd.append(f"--enable_each_rank_log={log_dir}")
    if args.include:
        cmd.append(f"--include={args.include}")
    if args.exclude:
        cmd.append(f"--exclude={args.exclude}")
    # --no_local_rank: training reads LOCAL_RANK from the environment, it takes no --local_rank
    cmd += ["--no_local_rank", "--module", "pretrain", *job.train_args()]
    return cmd


def run(args, job: TrainJob) -> int:
    log_dir = job.run_dir / "logs" / time.strftime("deepspeed-%Y%m%d-%H%M%S")
    cmd = command(args, job, str(log_dir))
    if args.dry_run:
        print(shell_join(cmd))
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    status = subprocess.call(cmd, env=env_with(), cwd=job.workdir)
    print(f"launch: {describe_status(status)}; per-rank logs in {log_dir}", file=sys.stderr)
    return status
