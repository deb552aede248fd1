"""``pretrain launch {local,slurm,deepspeed} [launcher options] CONFIG [--section.key=value ...]``."""

from __future__ import annotations

import argparse

from launch import jobs
from pretrain import cliargs
from pretrain.cliargs import Parser, integer
from pretrain.errors import UserError

EPILOG = """The --section.key=value overrides are passed to `pretrain train` unchanged. Exit
status: training's (0 done, 2 bad input, 3 stopped after a preemption signal, with a
checkpoint saved when a step boundary came within train.preempt_grace_s)."""


_Parser = Parser  # one line, exit 2, like every other verb


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain launch", description=__doc__, epilog=EPILOG, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="launcher", metavar="{local,slurm,deepspeed}")

    def add(name, help_text, add_args):
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                            allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.error = p.error
        add_args(sp)
        sp.add_argument("config", metavar="CONFIG", nargs="?", type=cliargs.name(), help="YAML file or preset name")
        return sp

    def local_args(sp):
        sp.add_argument("--nproc", type=integer(ge=0, note="0: the number of GPUs, or 1"), default=0,
                        help="processes on this machine (default: the number of GPUs, or 1)")
        sp.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the workers (repeatable)")
        sp.add_argument("--dry-run", action="store_true", help="print the torchrun command; run nothing")

    from launch import deepspeed, slurm

    add("local", "torchrun on this machine (gloo on CPU, NCCL on GPU)", local_args)
    add("slurm", "write an sbatch script into the run directory and submit it", slurm.add_arguments)
    add("deepspeed", "DeepSpeed's launcher over the hosts of a hostfile", deepspeed.add_arguments)
    return p


def main(argv: list[str]) -> int:
    p = parser()
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    # the training overrides (--section.key=value) are the options no launcher knows
    args, overrides = p.parse_known_args(argv)
    if args.launcher is None:
        raise UserError("pretrain launch: choose a launcher: local, slurm or deepspeed")
    job = jobs.parse_train_args(args.config, overrides)
    if args.launcher == "local":
        from launch import local

        nproc = args.nproc or local.default_nproc()
        if nproc < 1:
            raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
        job.check_world(nproc)
        if not args.dry_run:
            job.check_run_dir_free()
        return local.run(job, nproc, args.dry_run, jobs.parse_env(args.env))
    if args.launcher == "slurm":
        from launch import slurm

        if any(o.startswith("--checkpoint.resume=") and o != "--checkpoint.resume=auto"
               for o in job.overrides):
            raise UserError("checkpoint.resume: SLURM jobs always resume from their own newest "
                            "checkpoint (auto); use --checkpoint.init_from=PATH to start from other weights")
        if args.nodes >= 1:
            job.check_world(args.nodes * (args.nproc_per_node or args.gpus_per_node or 1))
        if not args.dry_run and not any(o.startswith("--dependency") for o in args.sbatch):
            job.check_run_dir_free(wait=False)  # a double submit; --dependency orders the jobs
        return slurm.run(args, job, jobs.parse_env(args.env))
    from launch import deepspeed

    if not (args.include or args.exclude):
        job.check_world(sum(slots for _, slots in deepspeed.read_hostfile(args.hostfile)))
    if not args.dry_run:
        job.check_run_dir_free()
    return deepspeed.run(args, job)
