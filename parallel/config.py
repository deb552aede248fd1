"""Parallel layout configuration (``parallel.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world
    tp: int = 1
    pp: int = 1
    cp: int = 1
    cp_mode: str = "ring"  # ring | alltoall: context-parallel attention (parallel/ring_attention.py)
    ep: int = 1
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zbv
    pp_microbatches: int = 0  # 0: = pp
    pp_virtual_stages: int = 1  # stages per rank for interleaved schedules
    dp_engine: str = "fsdp"  # fsdp | deepspeed
    zero_stage: int = 2  # deepspeed
    offload_optimizer: bool = False
    mixed_precision: str = "fp32"  # fp32 | bf16 (FSDP param dtype; reduce stays fp32)
    reshard_after_forward: bool = True
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 300.0
