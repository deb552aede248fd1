"""Background checkpoint writes (``checkpoint.async: true``).

A save stages this rank's shards of the model and optimizer state into host memory (pinned
on CUDA; the staging buffers are reused from one save to the next, so host memory holds one
extra copy of the rank's state, not one per save) and returns: that copy is the whole
training stall. A background thread then writes the staged copy with DCP and completes the
checkpoint by the same rule as a synchronous save (:func:`pretrain.checkpoint.finish_save`:
``meta.json`` and the rename come last, after every rank's files), so a crash during the
background write leaves the previous checkpoint the latest.

At most one save is in flight: the next save, a preemption exit and the end of training
wait for it (:meth:`AsyncSaver.wait`). The writer's collectives (DCP's plan exchange, the
completion barriers) run on a process group of their own, created once at start-up, so they
never interleave with the training loop's collectives on the default group (gloo matches
collectives by order per group).
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from pretrain import checkpoint as ckpt
from pretrain.errors import UserError
from pretrain.faults import slow_save_s


class AsyncSaver:
    """Writes checkpoints in a background thread; one in flight at most."""

    def __init__(self, world, timeout_s: float):
        self.world = world
        self.group = None
        if world.distributed:  # collective: every rank creates it, in the same order
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._stager = HostStager(pinned=world.device.type == "cuda")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0  # the training stall of the latest save (wait + staging)
        self.last_write_s = 0.0  # how long the latest background write took
        self.last_phases: dict = {}  # where the latest stall went

    def save(self, run_dir, step: int, parts, optimizer, trainer_state: dict, config_text: str,
             tokenizer: str | None, keep: int) -> Path:
        """Stage ``step`` and start writing it; returns the path it will have once complete."""
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        state = ckpt.collect_state(parts, optimizer)
        t2 = time.perf_counter()
        staged = self._stager.stage(state)
        self.last_phases = {"wait_s": t1 - t0, "state_dict_s": t2 - t1,
                            "copy_s": time.perf_counter() - t2}
        rng = {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v])
               for k, v in ckpt._rng_state().items()}
        args = (run_dir, step, staged, rng, json.loads(json.dumps(trainer_state)), config_text, tokenizer, keep)
        self._thread = threading.Thread(target=self._write, args=args, name=f"ckpt-write-{step}", daemon=True)
        self._thread.start()
        self.last_stall_s = time.perf_counter() - t0
        return ckpt.checkpoint_root(run_dir) / f"step_{step}"

    def _write(self, run_dir, step: int, staged: dict, rng: dict, trainer_state: dict, config_text: str,
               tokenizer: str | None, keep: int) -> None:
        t0 = time.perf_counter()
        try:
            tmp = ckpt.begin_save(run_dir, step, self.world, self._barrier)
            delay = slow_save_s()  # test-only: widens the window a crash can hit
            time.sleep(delay / 2)
            dcp.save(staged, checkpoint_id=str(tmp), process_group=self.group)
            torch.save(rng, tmp / f"rng_rank{self.world.rank}.pt")
            time.sleep(delay / 2)
            ckpt.finish_save(tmp, step, self.world, self._barrier, trainer_state, config_text, tokenizer, keep)
        except BaseException as e:  # reported on the training thread by wait()
            self._error = e
        self.last_write_s = time.perf_counter() - t0

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, UserError):
                raise e
            raise RuntimeError(f"background checkpoint write failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.wait()
        self._stager.buffers.clear()


class HostStager:
    """Copies a state dict into host buffers allocated once and reused by every later save
    (so an async save costs one memcpy of the rank's state and one extra copy of host memory).
    DTensors are staged as DTensors over the same mesh and placements, so DCP writes each
    rank's shard with its global offsets exactly as from the live state."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: dict[tuple, torch.Tensor] = {}

    def stage(self, obj, key: tuple = ()):
        if isinstance(obj, DTensor):
            local = self._copy(obj.to_local(), key)
            return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                      shape=obj.shape, stride=obj.stride())
        if isinstance(obj, torch.Tensor):
            return self._copy(obj, key)
        if isinstance(obj, dict):
            return {k: self.stage(v, key + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.stage(v, key + (i,)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)  # plain values (optimizer hyper-parameters)

    def _copy(self, t: torch.Tensor, key: tuple) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pinned)
            self.buffers[key] = buf
        buf.copy_(t.detach())
        return buf
