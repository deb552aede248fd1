"""Parallel layout configuration (``parallel.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from models.fields import spec


@dataclass
class ParallelConfig:
    dp_replicate: int = spec(1, ge=1)
    dp_shard: int = spec(-1, ge=1, also=(-1,), note="-1: the rest of the world")  # -1: whatever is left of the world
    tp: int = spec(1, ge=1)
    pp: int = spec(1, ge=1)
    cp: int = spec(1, ge=1)
    cp_mode: str = spec("ring", choices=("ring", "alltoall"))  # context-parallel attention (parallel/ring_attention.py)
    ep: int = spec(1, ge=1)
    sequence_parallel: bool = False
    pp_schedule: str = spec("1f1b", choices=("gpipe", "1f1b", "interleaved_1f1b", "zbv"))
    pp_microbatches: int = spec(0, ge=0, note="0: = pp")  # 0: = pp
    pp_virtual_stages: int = spec(1, ge=1)  # stages per rank for interleaved schedules
    dp_engine: str = spec("fsdp", choices=("fsdp", "deepspeed"))
    zero_stage: int = spec(2, choices=(1, 2, 3))  # deepspeed
    offload_optimizer: bool = False
    mixed_precision: str = spec("fp32", choices=("fp32", "bf16"))  # (FSDP param dtype; reduce stays fp32)
    reshard_after_forward: bool = True
    backend: str = spec("auto", choices=("auto", "gloo", "nccl"))
    timeout_s: float = spec(300.0, gt=0)  # watchdog: no progress for this long ends the run
    straggler_ratio: float = spec(1.5, gt=1)  # warn when a rank's step compute time exceeds this x the median
