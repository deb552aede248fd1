"""``pretrain launch slurm``: write an sbatch script into the run directory and submit it.

The job runs one ``srun`` task per node; each starts torchrun with a c10d rendezvous on
the first node's address (its SLURM ``NodeAddr``), so ranks are assigned by the
rendezvous, as on any multi-node torchrun job. Per-rank logs: torchrun writes each
worker's output under ``<run_dir>/logs/<job>.<restart>/node<N>/`` and tees it,
rank-prefixed, into ``<run_dir>/slurm/<job name>-<job id>.out``.

Preemption and time limits: ``#SBATCH --signal=B:USR1@<grace>`` sends SIGUSR1 to the batch
shell ``<grace>`` seconds before the end (or at preemption, with the controller's
``preempt_send_user_signal``). The script traps it and hands it to ``srun``, which signals
every process of the step: torchrun forwards it to its workers (``--signals-to-handle``)
and waits for them; training checkpoints at the next step boundary and exits with status
3, recorded by rank 0 in a status file (torchrun's own exit status is always 1 when a
worker did not exit 0). The script then runs ``scontrol requeue`` (after SIGUSR1 it does
for any status but 0, done, and 2, bad input: a signal during start-up may end processes
before they can checkpoint); the requeued job passes ``--checkpoint.resume=auto`` and
continues from the newest complete checkpoint. SIGTERM (cancellation, or preemption
without a user signal) is passed on the same way, without a requeue.

Every user-supplied value is quoted: ``#SBATCH`` values in double quotes (sbatch reads
them literally; values holding a double quote, backslash or line break are refused) and
everything in the shell body with ``shlex.quote``. User values never reach the inner
``bash -c`` program, which receives them as positional arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import time

from launch.jobs import STATUS_FILE_ENV, TORCHRUN_SIGNALS, TrainJob, python
from pretrain.cliargs import sbatch_extra, sbatch_value
from pretrain.errors import UserError

# Documented defaults; each can be overridden by exporting the variable before submitting
# (sbatch passes the submitting environment through) or with --env NAME=VALUE.
DEFAULT_ENV = {
    "PYTHONUNBUFFERED": "1",  # logs appear as they are written
    "PYTHONFAULTHANDLER": "1",  # stack traces on fatal signals
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or timed-out collective aborts the process
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # flight-recorder dump of a hung NCCL collective
    "TORCH_FR_BUFFER_SIZE": "2000",
    "NCCL_DEBUG": "WARN",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # less fragmentation
}
TASK_NAME = "pretrain-node"
# The program each srun task runs (bash -c): only fixed text and environment variables;
# the training arguments arrive as "$@".
NODE_PROGRAM = (
    'log_dir="$PRETRAIN_LOG_ROOT/node$SLURM_NODEID"; mkdir -p "$log_dir"; '
    'exec "$PRETRAIN_PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" '
    '--nproc-per-node="$PRETRAIN_NPROC_PER_NODE" --rdzv-backend=c10d '
    '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 '
    '--signals-to-handle="$PRETRAIN_TORCHRUN_SIGNALS" --shutdown-timeout="$PRETRAIN_SHUTDOWN_TIMEOUT" '
    '--log-dir="$log_dir" --redirects=3 --tee=3 --log-line-prefix-template="[rank\\${rank}]: " '
    '-m pretrain "$@"')


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pretrain.cliargs import integer, name

    p.add_argument("--nodes", type=integer(ge=1), required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=integer(ge=0), default=0,
                   help="GPUs per node (one training process per GPU); 0 for CPU nodes")
    p.add_argument("--nproc-per-node", type=integer(ge=0), default=0,
                   help="training processes per node (default: --gpus-per-node, or 1 on CPU nodes)")
    p.add_argument("--partition", type=name())
    p.add_argument("--account", type=name())
    p.add_argument("--time", type=name(), help="time limit, e.g. 2-00:00:00")
    p.add_argument("--qos", type=name())
    p.add_argument("--constraint", type=name())
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--cpus-per-task", type=integer(ge=0), default=0, help="CPUs for each node's task")
    p.add_argument("--mem", type=name(), help="memory per node, e.g. 0 (all) or 500G")
    p.add_argument("--job-name", type=name(), help="default: pretrain-<run directory name>")
    p.add_argument("--grace", type=integer(ge=1), default=180,
                   help="seconds before the time limit (or at preemption) that SIGUSR1 asks "
                        "training to checkpoint and stop (default 180)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--reservation=big (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")


def sbatch_options(args, job: TrainJob) -> list[str]:
    """The ``#SBATCH`` lines."""
    if args.nodes < 1:
        raise UserError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0 or args.nproc_per_node < 0 or args.cpus_per_task < 0:
        raise UserError("--gpus-per-node, --nproc-per-node and --cpus-per-task must be >= 0")
    if args.grace < 1:
        raise UserError(f"--grace: must be >= 1 second, got {args.grace}")
    if job.preempt_grace_s >= args.grace:
        raise UserError(f"train.preempt_grace_s={job.preempt_grace_s:g} must be below --grace="
                        f"{args.grace} (SIGUSR1's lead time) to leave time for the checkpoint")
    name = args.job_name or f"pretrain-{job.run_dir.name}"
    if "/" in name:
        raise UserError(f"--job-name: {name!r} must not contain '/' (it names the log file)")
    out = str(job.run_dir / "slurm").replace("%", "%%") + "/%x-%j.out"
    opts = [f"--job-name={sbatch_value('--job-name', name)}",
            f"--nodes={args.nodes}",
            "--ntasks-per-node=1"]
    if args.gpus_per_node:
        opts.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        opts.append(f"--cpus-per-task={args.cpus_per_task}")
    for key in ("partition", "account", "time", "qos", "constraint", "mem"):
        value = getattr(args, key)
        if value is not None:
            opts.append(f"--{key}={sbatch_value('--' + key, value)}")
    if args.exclusive:
        opts.append("--exclusive")
    opts += ["--requeue", f"--signal=B:USR1@{args.grace}", "--open-mode=append",
             f"--output={sbatch_value('run directory', out)}",
             f"--chdir={sbatch_value('working directory', str(job.workdir))}"]
    opts += [sbatch_extra(extra) for extra in args.sbatch]
    return opts


def render(args, job: TrainJob, env: dict[str, str]) -> str:
    """The sbatch script's text."""
    q = shlex.quote
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    threads = max(args.cpus_per_task // nproc, 1) if args.cpus_per_task else 1
    defaults = {**DEFAULT_ENV, "OMP_NUM_THREADS": str(threads)}
    train = [*job.train_args(["--checkpoint.resume=auto"])]
    lines = ["#!/bin/bash",
             f"# Written by `pretrain launch slurm` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
             "# Resubmit (it resumes from the newest checkpoint) with: sbatch <this file>"]
    lines += [f"#SBATCH {o}" for o in sbatch_options(args, job)]
    lines += ["", "set -u", "",
              "# Defaults; export the variable before submitting (or use --env) to change one."]
    lines += [f'export {k}="${{{k}:-{v}}}"' for k, v in defaults.items()]
    if env:
        lines.append("# --env")
        lines += [f"export {k}={q(v)}" for k, v in env.items()]
    lines += [
        "",
        "preempted=0",
        'srun_pid=""',
        "on_usr1() {  # --signal=B:USR1 (time limit or preemption): checkpoint, stop, requeue",
        "  preempted=1",
        '  echo "$(date +%FT%T) SIGUSR1: training will checkpoint at the next step boundary and stop"',
        '  if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null; fi',
        "}",
        "on_term() {  # cancellation: pass it on, no requeue",
        '  echo "$(date +%FT%T) SIGTERM: stopping training"',
        '  if [ -n "$srun_pid" ]; then kill -TERM "$srun_pid" 2>/dev/null; fi',
        "}",
        "trap on_usr1 USR1",
        "trap on_term TERM",
        "",
        f"run_dir={q(str(job.run_dir))}",
        'restart="${SLURM_RESTART_COUNT:-0}"',
        f"export PRETRAIN_PYTHON={q(python())}",
        f"export PRETRAIN_NPROC_PER_NODE={nproc}",
        f"export PRETRAIN_TORCHRUN_SIGNALS={q(TORCHRUN_SIGNALS)}",
        f"export PRETRAIN_SHUTDOWN_TIMEOUT={args.grace}",
        'export PRETRAIN_LOG_ROOT="$run_dir/logs/$SLURM_JOB_ID.$restart"',
        f'export {STATUS_FILE_ENV}="$run_dir/slurm/status.$SLURM_JOB_ID.$restart"',
        f'rm -f "${STATUS_FILE_ENV}"',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "head_addr=$(scontrol -o show node \"$head_node\" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')",
        'export MASTER_ADDR="${head_addr:-$head_node}"',
        'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
        'echo "$(date +%FT%T) job $SLURM_JOB_ID restart $restart: $SLURM_JOB_NUM_NODES node(s) x '
        '$PRETRAIN_NPROC_PER_NODE process(es), rendezvous at $MASTER_ADDR:$MASTER_PORT"',
        "",
        # --kill-on-bad-exit: a node whose training failed takes the others down at once
        # srun does not inherit --cpus-per-task: without it torchrun and all its workers would
        # share the step's default single CPU wherever SLURM binds tasks to CPUs
        'cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"',
        f"srun --kill-on-bad-exit=1 --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks-per-node=1 "
        f"--cpus-per-task=\"$cpus\" bash -c {q(NODE_PROGRAM)} {TASK_NAME} \\",
        "  " + " ".join(q(a) for a in train) + " &",
        "srun_pid=$!",
        'if [ "$preempted" = 1 ]; then kill -USR1 "$srun_pid" 2>/dev/null; fi  # signal came first',
        "# a trapped signal interrupts wait; keep waiting while srun runs",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done',
        'wait "$srun_pid"; status=$?',
        f'recorded=$(cat "${STATUS_FILE_ENV}" 2>/dev/null || true)',
        '[ "$status" -ne 0 ] && [ -n "$recorded" ] && [ "$recorded" != 0 ] && status=$recorded',
        'echo "$(date +%FT%T) training exited with status $status"',
        # 3: stopped at a step boundary with a checkpoint. Any other failure after SIGUSR1
        # (e.g. the signal came while processes were still starting) is requeued too: the
        # job resumes from its newest complete checkpoint. Done (0) or bad input (2) is final.
        'if [ "$preempted" = 1 ] && [ "$status" != 0 ] && [ "$status" != 2 ]; then',
        '  [ "$status" = 3 ] && echo "$(date +%FT%T) checkpoint saved"',
        '  echo "$(date +%FT%T) requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'exit "$status"',
        ""]
    return "\n".join(lines)


def run(args, job: TrainJob, env: dict[str, str]) -> int:
    script = render(args, job, env)
    if args.dry_run:
        print(script, end="")
        return 0
    slurm_dir = job.run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    path = slurm_dir / time.strftime("job-%Y%m%d-%H%M%S.sbatch")
    path.write_text(script)
    os.chmod(path, 0o755)
    try:
        p = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                           cwd=job.workdir, timeout=120)
    except FileNotFoundError:
        raise UserError(f"sbatch not found (is this a SLURM login node?); the script is {path}") from None
    if p.returncode != 0:
        raise UserError(f"sbatch rejected {path}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    job_id = p.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}\n  script: {path}\n  log:    {slurm_dir}/<job name>-{job_id}.out\n"
          f"  ranks:  {job.run_dir}/logs/{job_id}.<restart>/")
    return 0
