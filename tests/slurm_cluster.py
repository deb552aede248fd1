"""A throw-away SLURM cluster on localhost for tests (Debian's slurm-wlm 22.05 and munge).

The cluster has ``nodes`` virtual nodes ``n1..nN`` (one slurmd each, all on this machine,
reached at 127.0.0.1 on their own ports), so a multi-node job really runs one task per
node, as on a cluster. Everything lives under one temporary directory: the munge key,
socket and pid file, the slurm.conf that clients find through ``SLURM_CONF``, the daemons'
state, spool and logs.
The daemons run as root with ``proctrack/linuxproc`` and ``task/none`` (cgroup plugins do
not work in sandboxed kernels) and short timers, so a requeued job restarts within seconds
(``cred_expire=5``). Two partitions share the nodes: ``batch`` and the higher
``PriorityTier`` ``urgent``, whose jobs preempt ``batch`` jobs: those get their ``--signal``
at once (``preempt_send_user_signal``), up to ``GraceTime=60`` seconds to finish, and are
requeued (``PreemptMode=REQUEUE``).

``stop()`` cancels the jobs, then ends exactly the processes this cluster started: the
daemons by the PIDs in their pid files and any leftover job processes (found by the
cluster's unique ``SLURM_CONF`` path in their environment).

Run ``python tests/slurm_cluster.py DIR`` to start one by hand (Ctrl-C stops it).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged", "mungekey"]


def install() -> str | None:
    """Install slurm and munge with apt-get when missing; returns why that is impossible, or None."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "slurm/munge are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm/munge are not installed and there is no apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Serialise concurrent test sessions (apt's own lock fails rather than waits).
    with open(os.path.join(tempfile.gettempdir(), "pretrain-slurm-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(shutil.which(b) for b in BINARIES):
            return None
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                return f"'{' '.join(cmd)}' timed out"
            if p.returncode != 0:
                return f"'{' '.join(cmd)}' failed: {(p.stderr or p.stdout).strip()[-500:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"still missing after apt-get: {', '.join(missing)}" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + one slurmd per virtual node, all state under ``root``."""

    def __init__(self, root: str | os.PathLike, nodes: int = 2):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.sock"
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.pid_files = {"munged": self.munge_dir / "munged.pid",
                          "slurmctld": self.root / "slurmctld.pid"}
        self.pid_files.update({f"slurmd.{n}": self.root / f"slurmd.pid.{n}" for n in self.nodes})

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def env(self) -> dict:
        """Environment for slurm clients (sbatch, squeue, ...) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            (self.root / "state").mkdir(exist_ok=True)
            self._run(["slurmctld", "-f", str(self.conf), "-i"], "slurmctld")
            for n in self.nodes:
                (self.root / f"spool.{n}").mkdir(exist_ok=True)
                self._run(["slurmd", "-f", str(self.conf), "-N", n], f"slurmd.{n}")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o711)  # munged checks the socket directory's permissions
        key = self.munge_dir / "munge.key"
        if not key.exists():
            self._run(["mungekey", "--create", f"--keyfile={key}"], "mungekey")
        os.chmod(key, 0o600)
        self._run(["munged", f"--socket={self.socket}", f"--key-file={key}",
                   f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir / 'munged.log'}",
                   f"--seed-file={self.munge_dir / 'munged.seed'}", "--force"], "munged")
        deadline = time.time() + 10
        while not self.socket.exists():
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create its socket; log:\n{self._log('munge/munged.log')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = max(1, (os.cpu_count() or 1) // len(self.nodes))
        r = self.root
        ports = [free_port() for _ in self.nodes]
        node_lines = [f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                      f"State=UNKNOWN" for n, p in zip(self.nodes, ports)]
        all_nodes = ",".join(self.nodes)
        self.conf.write_text("\n".join([
            "ClusterName=pretraintest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool.%n'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={r / 'slurmd.pid.%n'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log.%n'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "MessageTimeout=20",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            *node_lines,
            f"PartitionName=batch Nodes={all_nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60",
            f"PartitionName=urgent Nodes={all_nodes} MaxTime=INFINITE State=UP PriorityTier=10",
            "",
        ]))

    def _run(self, cmd: list[str], name: str) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self.env)
        if p.returncode != 0:
            raise RuntimeError(f"{name} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}\n"
                               f"{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            p = subprocess.run(["sinfo", "-h", "-N", "-p", "batch", "-o", "%T"], capture_output=True, text=True,
                               env=self.env, timeout=30)
            out = (p.stdout + p.stderr).strip()
            states = out.split()
            if p.returncode == 0 and len(states) == len(self.nodes) and all(s.startswith("idle") for s in states):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the nodes did not become idle ({out!r})\n{self.logs()}")

    def _log(self, name: str, lines: int = 30) -> str:
        p = self.root / name
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.is_file() else "(no log)"

    def stop(self) -> None:
        """Cancel jobs, stop the daemons by PID and end any leftover job processes."""
        if self.conf.is_file() and self._alive("slurmctld"):
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, env=self.env, timeout=30)
            deadline = time.time() + 15
            while time.time() < deadline and self.jobs():
                time.sleep(0.3)
        for name in [f"slurmd.{n}" for n in self.nodes] + ["slurmctld", "munged"]:
            pid = self._pid(name)
            if pid:
                _terminate([pid])
        _terminate(self._job_processes())

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _alive(self, name: str) -> bool:
        pid = self._pid(name)
        return bool(pid) and _running(pid)

    def _job_processes(self) -> list[int]:
        """PIDs of processes carrying this cluster's SLURM_CONF (job steps and their children)."""
        needle = f"SLURM_CONF={self.conf}".encode()
        me, out = os.getpid(), []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                out.append(int(d.name))
        return out

    # ---- queries -----------------------------------------------------------------------

    def jobs(self) -> list[str]:
        p = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                           env=self.env, timeout=30)
        return p.stdout.split()

    def job_info(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (empty once the job is forgotten)."""
        p = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                           text=True, env=self.env, timeout=30)
        info = {}
        # values may hold spaces (job names): split only before the next "Key="
        for item in re.split(r"\s+(?=[A-Za-z][\w/:]*=)", p.stdout.strip()):
            k, _, v = item.partition("=")
            info[k] = v
        return info

    def logs(self) -> str:
        """The daemons' log tails (for assertion messages)."""
        names = ["slurmctld.log"] + [f"slurmd.log.{n}" for n in self.nodes]
        return "\n".join(f"--- {n}\n{self._log(n, 40)}" for n in names)


def _terminate(pids: list[int], timeout: float = 10) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    for pid in pids:
        while _running(pid) and time.time() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap(pid)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


if __name__ == "__main__":
    reason = install()
    if reason:
        sys.exit(reason)
    c = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-"))
    c.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"export SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
