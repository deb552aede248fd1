"""Running every part of ``pretrain data prepare --shards N``: as local processes, or as a
SLURM job array (one task per unfinished part) followed by a merge job that waits for it.

Each part runs ``pretrain data prepare ... --shard I/N``; finished parts are skipped (by the
job array's index list, and again by prepare itself), so a rerun only does what is left.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pretrain.data.parts import merge_parts, part_status
from pretrain.errors import UserError


def part_command(args, index: int | str, n: int) -> list[str]:
    """The ``pretrain data prepare`` command line of one part (``index`` may be a shell word)."""
    cmd = [sys.executable, "-m", "pretrain", "data", "prepare", "--input", *args.input,
           "--out", str(Path(args.out).resolve()), "--tokenizer", str(Path(args.tokenizer).resolve()),
           "--text-field", args.text_field, "--sample-len", str(args.sample_len),
           "--val-fraction", str(args.val_fraction), "--workers", str(args.workers),
           "--group-bytes", str(args.group_bytes), "--no-progress", "--shard", f"{index}/{n}"]
    return cmd


def run_local(args, n: int, timeout: float | None = None) -> dict:
    """Run the unfinished parts as concurrent local processes, then merge."""
    pending = part_status(Path(args.out), n)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [(i, subprocess.Popen(part_command(args, i, n), env=env, stderr=subprocess.PIPE, text=True))
             for i in pending]
    failed = []
    for i, p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            failed.append((i, (err.strip().splitlines() or ["(no output)"])[-1]))
    if failed:
        raise UserError(f"part {failed[0][0]}/{n} failed: {failed[0][1]}")
    return merge_parts(args.out)


def _sbatch_lines(args, name: str, log: str) -> list[str]:
    from pretrain.cliargs import sbatch_extra, sbatch_value

    lines = [f"#SBATCH --job-name={sbatch_value('--job-name', name)}",
             f"#SBATCH --output={sbatch_value('--out', log)}",
             f"#SBATCH --chdir={sbatch_value('working directory', os.getcwd())}",
             "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={max(args.workers, 1)}"]
    for key in ("partition", "account", "time", "mem"):
        value = getattr(args, key)
        if value:
            lines.append(f"#SBATCH --{key}={sbatch_value('--' + key, value)}")
    lines += [f"#SBATCH {sbatch_extra(extra)}" for extra in args.sbatch]
    return lines


def render_scripts(args, n: int, pending: list[int]) -> tuple[str, str]:
    """(array script over the pending parts, merge script)."""
    out = Path(args.out).resolve()
    logs = str(out / "slurm").replace("%", "%%")
    base = f"prepare-{out.name}"
    array = ["#!/bin/bash", f"# Written by `pretrain data prepare --runner slurm`: parts {pending} of {n}.",
             f"#SBATCH --array={','.join(map(str, pending))}"]
    array += _sbatch_lines(args, base, logs + "/%x-%A_%a.out")
    cmd = part_command(args, "@@", n)
    line = " ".join(shlex.quote(c) for c in cmd).replace("@@/", '"$SLURM_ARRAY_TASK_ID"/')
    array += ["", "export OMP_NUM_THREADS=1", f"exec {line}", ""]
    merge = ["#!/bin/bash", "# Written by `pretrain data prepare --runner slurm`: merges the parts."]
    merge += _sbatch_lines(args, base + "-merge", logs + "/%x-%j.out")
    merge += ["", "exec " + " ".join(shlex.quote(c) for c in
                                      [sys.executable, "-m", "pretrain", "data", "merge", "--out", str(out)]), ""]
    return "\n".join(array), "\n".join(merge)


def submit_slurm(args, n: int) -> str:
    """Write (and unless --dry-run submit) the array and merge scripts; returns a summary."""
    out = Path(args.out)
    pending = part_status(out, n)
    if not pending:
        meta = merge_parts(out)
        return f"all {n} parts were finished; merged {out} ({meta['splits']['train']['samples']} train samples)"
    array, merge = render_scripts(args, n, pending)
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    paths = out / "slurm" / "prepare-array.sbatch", out / "slurm" / "prepare-merge.sbatch"
    for path, text in zip(paths, (array, merge)):
        path.write_text(text)
    if args.dry_run:
        return f"wrote {paths[0]} ({len(pending)} of {n} parts) and {paths[1]}; not submitted (--dry-run)"
    job = _sbatch([str(paths[0])])
    merge_job = _sbatch([f"--dependency=afterok:{job}", str(paths[1])])
    return f"submitted array job {job} ({len(pending)} of {n} parts) and merge job {merge_job}"


def _sbatch(argv: list[str]) -> str:
    try:
        p = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError(f"sbatch not found (is this a SLURM login node?); the script is {argv[-1]}") from None
    if p.returncode != 0:
        raise UserError(f"sbatch rejected {argv[-1]}: {(p.stderr or p.stdout).strip()[-300:]}")
    return p.stdout.strip().split(";")[0]
