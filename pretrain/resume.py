"""Where a run starts: a resume never silently becomes a fresh start.

``checkpoint.resume=auto`` takes the newest *readable* ``step_N`` of the run (a newer
unreadable one is named in a warning); if the run has ``step_N`` directories but none is
readable, that is an error, not a start from scratch. ``.tmp_step_N`` directories are
saves that never completed and are not checkpoints. ``checkpoint.init_from`` and an explicit
``checkpoint.resume=<path>`` must exist. Before any weights are read, the checkpoint's
tensor shapes are compared with this run's model, and a mismatch names the differing
``model.*`` config keys (or the first differing tensor).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

from pretrain import checkpoint as ckpt
from pretrain.ckpt_safety import read_dcp_metadata
from pretrain.config import _plain
from pretrain.errors import UserError


def readable(path: Path) -> str | None:
    """None if ``path`` is a checkpoint this code can read, else why not (one line)."""
    try:
        ckpt.check_checkpoint_dir(path)
        ckpt.read_trainer_state(path)
        read_dcp_metadata(path)
    except UserError as e:
        return str(e)
    return None


def newest_readable(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest readable ``step_N`` of ``run_dir``; None if it has no ``step_N`` at all."""
    root = ckpt.checkpoint_root(run_dir)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := ckpt.STEP_RE.match(p.name)) and p.is_dir()) if root.is_dir() else []
    reasons = []
    for _, path in reversed(steps):
        why = readable(path)
        if why is None:
            if reasons and warn:
                print(f"warning: skipped unreadable newer checkpoints: {'; '.join(reasons)}",
                      file=sys.stderr, flush=True)
            return path
        reasons.append(why)
    if steps:
        raise UserError(f"checkpoint.resume=auto: none of the {len(steps)} checkpoints under {root} is "
                        f"readable (newest: {reasons[0]}); refusing to start over: fix or move them, "
                        f"or set checkpoint.resume=off in a new run directory")
    return None


def resolve_start(cfg, run_dir: Path) -> tuple[Path | None, Path | None]:
    """``(resume_from, init_weights)`` for this run, per the module docstring."""
    resume_from, init_weights = None, None
    if cfg.checkpoint.resume == "auto":
        resume_from = newest_readable(run_dir)
    elif cfg.checkpoint.resume not in ("off", ""):
        resume_from = _explicit("checkpoint.resume", cfg.checkpoint.resume)
    if resume_from is not None and ckpt.read_trainer_state(resume_from).get("weights_only"):
        # A converted/imported checkpoint (step 0, no optimizer state): start from its weights.
        init_weights, resume_from = resume_from, None
    elif resume_from is None and cfg.checkpoint.init_from:
        init_weights = _explicit("checkpoint.init_from", cfg.checkpoint.init_from)
    for path in (resume_from, init_weights):
        if path is not None:
            check_model_fits(path, cfg.model)
    return resume_from, init_weights


def _explicit(key: str, arg: str) -> Path:
    p = Path(arg)
    if not p.exists():
        raise UserError(f"{key}: {p} does not exist")
    try:
        path = ckpt.resolve_checkpoint_arg(arg)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    why = readable(path)
    if why is not None:
        raise UserError(f"{key}: {why}")
    return path


def check_model_fits(path: Path, mc) -> None:
    """Compare the checkpoint's ``model.*`` config and tensor shapes with this run's model."""
    try:
        saved = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model") or {}
    except yaml.YAMLError:
        raise UserError(f"checkpoint {path}: config.yaml is not valid YAML") from None
    from models.transformer import build_model

    shapes = {f"model.{k}": tuple(v.shape) for k, v in build_model(mc, init=False).state_dict().items()}
    md = read_dcp_metadata(path)
    theirs = {k: tuple(v.size) for k, v in md.state_dict_metadata.items()
              if k.startswith("model.") and hasattr(v, "size")}
    missing = sorted(set(shapes) - set(theirs))
    extra = sorted(set(theirs) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(theirs) if shapes[k] != theirs[k])
    ours = _plain(dataclasses.asdict(mc))
    diff = [f"model.{k}={saved[k]!r} in the checkpoint, {ours[k]!r} here" for k in sorted(saved)
            if k in ours and ours[k] != saved[k]]
    if not (missing or wrong or (extra and diff)):
        return  # extra tensors alone (buffers some layouts save) are ignored on load
    if wrong:
        k = wrong[0]
        what = f"{k[6:]} is {list(theirs[k])} in the checkpoint, {list(shapes[k])} in this model"
    elif missing:
        what = f"{len(missing)} tensors of this model are not in it (first: {missing[0][6:]})"
    else:
        what = f"it holds {len(extra)} tensors this model does not have (first: {extra[0][6:]})"
    raise UserError(f"checkpoint {path} does not fit this model: {what}"
                    + (f" ({'; '.join(diff[:3])})" if diff else ""))
