"""What every launcher shares: the training command line, the run directory, the exit status.

Launchers talk to training only through its CLI contract: ``python -m pretrain train CONFIG
[--section.key=value ...]``, exit status 0 (done), 2 (bad input) or 3 (stopped by
SIGTERM/SIGUSR1 after checkpointing: requeue it), and ``PRETRAIN_EXIT_STATUS_FILE``, where
rank 0 records that status (torchrun itself exits 1 whenever a worker did not exit 0, so
the status would otherwise be lost). The config is loaded here only to reject bad input
before anything is started or submitted, and to find ``logging.run_dir``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import EXIT_PREEMPTED, STATUS_FILE_ENV, UserError

# torchrun handles (and forwards to its workers) these; SIGUSR1 is what SLURM sends before
# a time limit or a preemption, so it must be forwarded rather than kill torchrun.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
_OVERRIDE_RE = re.compile(r"^--[A-Za-z_][\w.\[\]]*=", re.S)
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class TrainJob:
    """A validated ``pretrain train`` invocation."""

    config: str  # absolute path of the YAML file
    overrides: list[str]
    run_dir: Path  # absolute
    workdir: Path  # relative paths in the config and overrides are relative to this
    preempt_grace_s: float
    dp_engine: str
    parallel: object = None  # the config's ParallelConfig, to check the layout against a world size
    resume: str = "off"  # checkpoint.resume
    lock_wait_s: float = 0.0  # checkpoint.lock_wait_s

    def check_run_dir_free(self, wait: bool = True) -> None:
        """Refuse, before anything is written, to start on a run dir a live run holds;
        with resume=auto (and ``wait``) first wait up to checkpoint.lock_wait_s for it to exit."""
        from pretrain.run_lock import wait_until_free

        wait_until_free(self.run_dir, self.lock_wait_s if wait and self.resume == "auto" else 0.0)

    def check_world(self, world_size: int) -> None:
        """Reject a ``parallel.*`` layout that cannot fill ``world_size`` processes, before launching."""
        if self.parallel is None:
            return
        from parallel.world import resolve_layout

        try:
            resolve_layout(self.parallel, world_size)
        except UserError as e:
            raise UserError(f"{e} (this launch starts {world_size} processes)") from None

    def train_args(self, extra: list[str] = ()) -> list[str]:
        """Arguments after ``python -m pretrain``."""
        return ["train", self.config, *self.overrides, *extra]


def parse_train_args(config: str | None, overrides: list[str]) -> TrainJob:
    """Check CONFIG and the overrides the way ``pretrain train`` will, before launching."""
    from pretrain.config import load_config, resolve_config_path

    if not config:
        raise UserError("missing CONFIG (a YAML file or a preset name from configs/)")
    if config.startswith("-"):
        raise UserError(f"unexpected option '{config}' where CONFIG was expected")
    for ov in overrides:
        if not _OVERRIDE_RE.match(ov):
            raise UserError(f"'{ov}': neither an option of this launcher nor a "
                            f"--section.key=value override")
    path = resolve_config_path(config).resolve()
    cfg = load_config(str(path), overrides)
    workdir = Path.cwd()
    run_dir = Path(cfg.logging.run_dir)
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    return TrainJob(str(path), list(overrides), run_dir, workdir, cfg.train.preempt_grace_s,
                    cfg.parallel.dp_engine, cfg.parallel, cfg.checkpoint.resume, cfg.checkpoint.lock_wait_s)


def parse_env(items: list[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` options."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY_RE.match(key):
            raise UserError(f"--env '{item}': expected NAME=VALUE with NAME a shell variable name")
        out[key] = value
    return out


def python() -> str:
    """The interpreter running this launcher (the one that has ``pretrain`` installed)."""
    return sys.executable or "python3"


def torchrun_cmd(*, nnodes: str, nproc_per_node: int | str, rdzv: list[str], shutdown_timeout: float,
                 log_dir: str | None = None) -> list[str]:
    """``python -m torch.distributed.run ...`` up to (excluding) ``-m pretrain train ...``."""
    cmd = [python(), "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={nproc_per_node}", *rdzv, "--max-restarts=0",
           f"--signals-to-handle={TORCHRUN_SIGNALS}",
           # keep workers alive through their checkpoint after a forwarded signal
           f"--shutdown-timeout={max(int(shutdown_timeout), 30)}"]
    if log_dir:
        cmd += [f"--log-dir={log_dir}", "--redirects=3", "--tee=3",
                "--log-line-prefix-template=[rank${rank}]: "]
    return cmd


def final_status(launcher_code: int, status_file: Path) -> int:
    """Training's exit status from torchrun's code and what rank 0 recorded.

    torchrun's 0 is final; otherwise rank 0's nonzero record (2: bad input, 3: preempted)
    says why, and torchrun's code stands when rank 0 recorded nothing or success.
    """
    if launcher_code == 0:
        return 0
    try:
        recorded = int(status_file.read_text().strip())
    except (OSError, ValueError):
        recorded = 0
    return recorded or launcher_code


def shell_join(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def describe_status(status: int) -> str:
    if status == 0:
        return "training finished"
    if status == EXIT_PREEMPTED:
        return "training stopped after a preemption signal (checkpoint saved; resume with --checkpoint.resume=auto)"
    if status == 2:
        return "training rejected its input"
    return f"training failed (status {status})"


def env_with(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    e.update(extra or {})
    return e
