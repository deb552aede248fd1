"""Hugging Face weights written during training (``checkpoint.hf_every``), from the sharded state.

No rank ever holds the whole model: the safetensors layout (header, offsets, shards) is
computed from shapes alone (the export mapping runs on meta tensors), then the model is
gathered one sublayer at a time (``DTensor.full_tensor`` over its mesh; under pipeline
parallel the owning stage sends it to rank 0), mapped to HF names and written by rank 0 at
its offset. The files equal, byte for byte, what ``pretrain export`` writes for the
checkpoint of the same step (the same mapping, dtype, shard plan and safetensors layout);
config, generation config and tokenizer files come from the same functions. The directory
``<run_dir>/hf/step_N`` appears atomically (written as ``.tmp_step_N``, then renamed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pretrain.hf.arch_io import DTYPES, SAFE_INDEX, SAFE_SINGLE, cast, parse_size

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_GROUP = re.compile(r"^(layers\.\d+)\.")


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per file, exactly as ``write_safetensors`` splits them (insertion order)."""
    if sum(sizes.values()) <= max_bytes:
        return [list(sizes)]
    shards, size = [[]], 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def safetensors_header(entries: dict[str, tuple[torch.dtype, tuple, int]]) -> tuple[bytes, dict]:
    """The bytes before the data of a safetensors file, as the safetensors library writes them
    (tensors ordered by dtype, then name; metadata first; header padded with spaces to 8
    bytes), and each tensor's absolute byte offset."""
    order = sorted(entries, key=lambda n: (-_dtype_rank(entries[n][0]), n))
    header, offsets, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for name in order:
        dtype, shape, nbytes = entries[name]
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: start + o for n, o in offsets.items()}


def _dtype_rank(dtype: torch.dtype) -> int:
    # safetensors' Dtype enum order (BOOL < ... < F16 < BF16 < I32 < U32 < F32 < F64 < I64 < U64)
    return ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"].index(
        ST_DTYPES[dtype])


def export_live(run_dir, step: int, parts, cfg, world, tokenizer: str | None, dtype: str = "fp32",
                max_shard_size: str | int = "5GB") -> Path:
    """Collective: write ``<run_dir>/hf/step_<step>`` from this run's sharded model parts."""
    from pretrain.checkpoint import _model_state
    from pretrain.hf.registry import choose

    mc, torch_dtype = cfg.model, DTYPES[dtype]
    local = _model_state(parts)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in local.items()}
    owners = _all_gather_object(world, shapes)  # per rank: the names it holds (pipeline stages differ)
    every = {k: v for d in owners for k, v in d.items()}
    meta = {k: torch.empty(s, dtype=dt, device="meta") for k, (s, dt) in every.items()}
    for k in sorted(k for k in every if k.endswith("expert_bias")):  # choose() reads these values
        meta[k] = _gather(k, local.get(k), every[k], owners, world)
    if world.is_main:
        arch, _, notes = choose(mc, meta, "auto")
        out_meta = cast(arch.export_weights(mc, meta), torch_dtype)
        sizes = {n: t.numel() * t.element_size() for n, t in out_meta.items()}
        plan = shard_plan(sizes, parse_size(max_shard_size))
        hf_root = Path(run_dir) / "hf"
        tmp = hf_root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        where = _open_files(tmp, plan, out_meta)
    groups: dict[str, list[str]] = {}
    for k in every:  # model order: embeddings, then one sublayer at a time, then the head
        m = _GROUP.match(k)
        groups.setdefault(m.group(1) if m else "", []).append(k)
    for names in groups.values():
        full = {k: _gather(k, local.get(k), every[k], owners, world) for k in names}
        if world.is_main:
            sd = dict(meta, **full)
            for name, t in cast(arch.export_weights(mc, sd), torch_dtype).items():
                if t.device.type != "meta":
                    f, off = where[name]
                    f.seek(off)
                    f.write(_raw(t))
            del sd, full
    if not world.is_main:
        return Path(run_dir) / "hf" / f"step_{step}"
    for f, _ in {id(f): (f, 0) for f, _ in where.values()}.values():
        f.flush()
        os.fsync(f.fileno())
        f.close()
    return _finish(arch, mc, tmp, hf_root / f"step_{step}", plan, sizes, torch_dtype, tokenizer, notes)


def _open_files(tmp: Path, plan: list[list[str]], out_meta: dict) -> dict:
    where = {}
    for i, names in enumerate(plan):
        fname = SAFE_SINGLE if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        entries = {n: (out_meta[n].dtype, tuple(out_meta[n].shape), out_meta[n].numel() * out_meta[n].element_size())
                   for n in names}
        head, offsets = safetensors_header(entries)
        f = open(tmp / fname, "wb")
        f.write(head)
        f.truncate(len(head) + sum(e[2] for e in entries.values()))
        where.update({n: (f, offsets[n]) for n in names})
    return where


def _finish(arch, mc, tmp: Path, final: Path, plan, sizes, torch_dtype, tokenizer, notes) -> Path:
    from pretrain.hf.export import _token_ids, _write_config, _write_generation_config
    from pretrain.hf.registry import REMOTE

    if len(plan) > 1:
        weight_map = {n: f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                      for i, names in enumerate(plan) for n in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    tok = Path(tokenizer) if tokenizer else Path("/nonexistent")
    tok_ids = _token_ids(tok, mc.vocab_size)
    _write_config(arch, mc, tmp, torch_dtype, tok_ids)
    if arch is REMOTE:
        arch.write_code(tmp)
    _write_generation_config(tmp, tok_ids, use_cache=arch is not REMOTE)
    if tok_ids["source"]:
        from pretrain.hf.tokenizer import write_tokenizer

        write_tokenizer(tok, tmp, mc.max_seq_len)
    if notes:
        (tmp / "NOTES.txt").write_text("\n".join(notes) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _all_gather_object(world, obj) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def _gather(name: str, t, spec, owners: list[dict], world) -> torch.Tensor | None:
    """The full tensor ``name`` on rank 0 (None elsewhere); every rank holding it takes part."""
    if t is not None:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        full = full.detach().to("cpu")
    holders = [r for r, d in enumerate(owners) if name in d]
    if not world.distributed or 0 in holders:
        return full if world.is_main else None
    src = holders[0]  # pipeline parallel: the first rank of the owning stage sends it
    if world.rank == src:
        dist.send(full.contiguous(), dst=0)
    elif world.is_main:
        buf = torch.empty(spec[0], dtype=spec[1])
        dist.recv(buf, src=src)
        return buf
    return None
