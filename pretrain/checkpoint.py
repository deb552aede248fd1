"""Checkpoints: torch.distributed.checkpoint (DCP) sharded format, written atomically.

Layout of ``<run_dir>/checkpoints/step_<N>/``:
- DCP files holding ``model.*`` and ``optim.*`` (resharded on load to any layout);
- ``trainer_state.json``: step, tokens, scheduler and data-loader state (rank-independent);
- ``rng_rank<r>.pt``: each rank's RNG state (tensors only: loaded with ``weights_only=True``);
- ``config.yaml`` (the resolved run config) and ``tokenizer.model`` when known;
- ``meta.json``: written last, before the rename; its presence marks a complete checkpoint.

A save goes to ``.tmp_step_<N>`` and is renamed only when every rank has finished,
so an interrupted save never becomes the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from parallel.pipeline import as_one_module
from pretrain.ckpt_safety import SafeLoadPlanner, SafeReader, load_tensors, read_dcp_metadata
from pretrain.errors import UserError
from pretrain.faults import maybe_kill

# DCP warns when used without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / ".metadata").is_file()


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _model_state(parts) -> dict:
    sd = {}
    for part in parts:
        sd.update(get_model_state_dict(part))
    return sd


def _optim_state(parts, optimizer) -> dict:
    return get_optimizer_state_dict(as_one_module(parts), optimizer)


def save_checkpoint(run_dir, step: int, parts, optimizer, trainer_state: dict, world,
                    config_text: str, tokenizer: str | None = None, keep: int = 0,
                    extra=None) -> Path:
    """Write ``step_<step>`` atomically on every rank; returns its path.

    ``extra(tmp_dir)``, if given, runs on every rank after the DCP write and adds files of
    its own (e.g. a DeepSpeed engine's state) before the checkpoint is completed.
    """
    tmp = begin_save(run_dir, step, world)
    dcp.save(collect_state(parts, optimizer), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{world.rank}.pt")
    if extra is not None:
        extra(tmp)
    return finish_save(tmp, step, world, world.barrier, trainer_state, config_text, tokenizer, keep)


def collect_state(parts, optimizer) -> dict:
    """What DCP saves: this rank's shards of the model and optimizer state."""
    state = {"model": _model_state(parts)}
    if optimizer is not None:
        state["optim"] = _optim_state(parts, optimizer)
    return state


def begin_save(run_dir, step: int, world, barrier=None) -> Path:
    """Collective (``barrier``, default the world's): an empty ``.tmp_step_<step>`` for every
    rank to write into."""
    root = checkpoint_root(run_dir)
    tmp = root / f".tmp_step_{step}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    (barrier or world.barrier)()
    return tmp


def finish_save(tmp: Path, step: int, world, barrier, trainer_state: dict, config_text: str,
                tokenizer: str | None, keep: int) -> Path:
    """Complete a save once every rank has written its files into ``tmp``.

    The one rule for "complete", for synchronous and background saves alike: rank 0 writes
    ``meta.json`` (fsynced) only after ``barrier()`` saw every rank's shards and RNG file,
    then renames ``.tmp_step_N`` to ``step_N``; only renamed directories holding
    ``meta.json`` count, so a crash at any earlier moment leaves the previous one the latest.
    """
    root, final = tmp.parent, tmp.parent / f"step_{step}"
    maybe_kill("kill_in_save", step)
    barrier()
    if world.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "config.yaml").write_text(config_text)
        if tokenizer and Path(tokenizer).is_file():
            from pretrain.data.tokenizer import copy_tokenizer_files

            copy_tokenizer_files(tokenizer, tmp)  # tokenizer.model, or tokenizer.json + config
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world.world_size}
        _write_synced(tmp / "meta.json", json.dumps(meta))
        if final.exists():  # re-save of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep > 0:
            for _, old in list_checkpoints(root.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, parts, optimizer, world) -> dict:
    """Load model/optimizer (resharded to this layout) and RNG; returns the trainer state."""
    path = Path(path)
    check_checkpoint_dir(path)
    rng, rng_state = path / f"rng_rank{world.rank}.pt", None
    if rng.is_file() and saved_world_size(path) == world.world_size:  # read (safely) before any weights
        rng_state = load_tensors(rng, f"checkpoint {path}")
    state = collect_state(parts, optimizer)
    try:
        _dcp_load(state, path)
    except UserError:
        raise
    except Exception as e:  # DCP raises many types; the user needs one line
        raise UserError(f"checkpoint {path} does not fit this model/optimizer: {_first_line(e)}") from None
    for part in parts:
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(as_one_module(parts), optimizer, state["optim"])
    if rng_state is not None:
        _set_rng_state(rng_state)
    return read_trainer_state(path)


def saved_world_size(path: Path) -> int | None:
    """How many processes wrote the (complete) checkpoint at ``path``."""
    return json.loads((Path(path) / "meta.json").read_text()).get("world_size")


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Weights only, in one process, whatever layout saved them (export, eval, init_from)."""
    path = Path(path)
    check_checkpoint_dir(path)
    sd = {"model": model.state_dict()}
    try:
        _dcp_load(sd, path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"checkpoint {path} does not fit this model: {_first_line(e)}") from None
    model.load_state_dict(sd["model"])


def _dcp_load(state: dict, path: Path) -> None:
    """``dcp.load`` that unpickles nothing but DCP's metadata records and plain values."""
    read_dcp_metadata(path)  # refuse here, in one line, rather than inside DCP's exception wrapping
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())


def check_checkpoint_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    if not is_complete(path):
        raise UserError(f"checkpoint {path} is incomplete or corrupt (no meta.json/.metadata)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint {path}: meta.json is unreadable") from None
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path}: format {meta.get('format')} not supported (expected {FORMAT_VERSION})")
    for name in ("trainer_state.json", "config.yaml"):
        if not (path / name).is_file():
            raise UserError(f"checkpoint {path} is missing {name}")


def read_trainer_state(path: Path) -> dict:
    check_checkpoint_dir(Path(path))
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text())
    except json.JSONDecodeError:
        raise UserError(f"checkpoint {path}: trainer_state.json is corrupt") from None


def resolve_checkpoint_arg(arg: str) -> Path:
    """A ``step_N`` directory, or a run directory (its newest complete checkpoint)."""
    p = Path(arg)
    if (p / "meta.json").exists() or STEP_RE.match(p.name):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(f"no complete checkpoint under {p}")
    return latest


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    if not (isinstance(st, dict) and isinstance(st.get("torch"), torch.Tensor)):
        raise UserError("checkpoint: an rng_rank<r>.pt file does not hold an RNG state")
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
