"""Weights & Biases tracking (``logging.wandb: true``): every ``metrics.jsonl`` record and the
resolved config, logged by rank 0 only (the one process that writes metrics.jsonl).

The W&B run id is kept in ``<run_dir>/wandb_run_id``, so a resumed training run continues
the same W&B run (``resume="allow"``). ``logging.wandb_mode: auto`` logs online when an API
key is configured and the W&B host answers, else offline into ``<run_dir>/wandb/``
(``wandb sync`` uploads it later). Install with ``pip install 'pretrain[wandb]'``.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from pathlib import Path

from pretrain.errors import UserError


def _online_possible() -> bool:
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
        return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return os.environ.get("WANDB_MODE") or ("online" if _online_possible() else "offline")
    return mode


class WandbTracker:
    """One W&B run per training run directory; ``log(record)`` per optimizer step."""

    def __init__(self, logging_cfg, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("logging.wandb: the wandb package is not installed "
                            "(pip install 'pretrain[wandb]', or set logging.wandb: false)") from None
        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.mode = resolve_mode(logging_cfg.wandb_mode)
        self.run = wandb.init(
            project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity or None,
            name=logging_cfg.wandb_name or Path(run_dir).resolve().name,
            tags=list(logging_cfg.wandb_tags) or None, config=config, id=run_id, resume="allow",
            dir=str(run_dir), mode=self.mode, settings=wandb.Settings(console="off", silent=True))

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
        self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
