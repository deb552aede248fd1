"""What a run reads, checked before it creates anything (its ``run_dir`` included).

The config's own values are checked by their declarations; this checks that the local
inputs they name exist, so a typo costs one error line and leaves no half-made run behind.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.config import Config
from pretrain.errors import UserError


def check_inputs(cfg: Config) -> None:
    """Raise UserError naming the key whose local dataset, tokenizer or checkpoint is missing."""
    from pretrain import checkpoint as ckpt
    from pretrain.data.megatron import megatron_prefix
    from pretrain.data.store import is_remote, open_dataset

    sources = [("data.path", cfg.data.path)] if cfg.data.path or not cfg.data.mixture else []
    sources += [(f"data.mixture[{i}].path", s.path) for i, s in enumerate(cfg.data.mixture)]
    if cfg.data.task == "mqar":  # generated sequences: no dataset is read
        sources = []
    for key, path in sources:
        if is_remote(path) or (path and megatron_prefix(path)):
            continue
        try:
            open_dataset(path)  # local: reads meta.json only
        except UserError as e:
            raise UserError(str(e) if str(e).startswith(key) else f"{key}: {e}") from None
    if cfg.data.tokenizer and not is_remote(cfg.data.tokenizer) and not Path(cfg.data.tokenizer).is_file():
        raise UserError(f"data.tokenizer: {cfg.data.tokenizer} not found")
    for key, arg in (("checkpoint.resume", cfg.checkpoint.resume), ("checkpoint.init_from", cfg.checkpoint.init_from)):
        if arg and arg not in ("off", "auto"):
            try:
                ckpt.resolve_checkpoint_arg(arg)
            except UserError as e:
                raise UserError(f"{key}: {e}") from None


def check_run_dir(cfg: Config) -> None:
    """Refuse a ``logging.run_dir`` that is, or lies under, a file (before anything is made)."""
    path = Path(cfg.logging.run_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"logging.run_dir: {p} exists and is not a directory")
            return
