"""Launchers for `pretrain launch`: torchrun on this machine, SLURM jobs, DeepSpeed hostfiles."""
