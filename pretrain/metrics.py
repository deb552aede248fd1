"""Per-step metrics (``metrics.jsonl``, optional TensorBoard) and the progress display."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch


class MetricsWriter:
    """Appends one JSON object per optimizer step to ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop records past the checkpoint so the file reads as one run.
            keep = [l for l in self.path.read_text().splitlines()
                    if l.strip() and _step_of(l) <= truncate_after_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        self._f = open(self.path, "a")
        self.trackers: list = []  # e.g. pretrain.tracking.WandbTracker: log(record), close()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                print("warning: logging.tensorboard is on but tensorboard is not installed", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        for t in self.trackers:
            t.log(clean)
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, clean["step"])

    def close(self) -> None:
        self._f.close()
        for t in self.trackers:
            t.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> float:
    """A record's step; a line torn by a crash mid-write counts as past every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


class Progress:
    """A live bar on a terminal, plain lines otherwise (``logging.progress``)."""

    def __init__(self, total: int, initial: int, mode: str, enabled: bool, every: int = 1):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "off"
        self.every = max(every, 1)
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, total: int, rec: dict) -> None:
        if self.mode == "bar":
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                  tok_s=f"{rec['tokens_per_sec']:.0f}", refresh=False)
        elif self.mode == "plain" and (step % self.every == 0 or step == total):
            print(f"step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.3e} "
                  f"grad_norm {rec['grad_norm']:.3f} tok/s {rec['tokens_per_sec']:.0f}", flush=True)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        elif self.mode != "off":
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
