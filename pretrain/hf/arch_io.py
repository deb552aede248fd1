"""Shared pieces of the Hugging Face export/import: safetensors I/O, shard sizes, dtypes,
and the ``Arch`` interface every architecture mapping implements."""

from __future__ import annotations

import abc
import json
import re
from pathlib import Path

import torch

from models.config import ModelConfig
from pretrain.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# The token ids the project's sentencepiece tokenizers use (pretrain/data/tokenizer.py).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Arch(abc.ABC):
    """One target architecture: which of our configs it represents, and the two mappings.

    ``issues`` returns ``None`` when the model's stack is not of this family at all, ``[]``
    when the HF class computes exactly what our model computes, and otherwise the list of
    features (named by config key) the HF class cannot represent.
    """

    hf_class = ""  # e.g. LlamaForCausalLM
    model_types: tuple[str, ...] = ()  # config.json model_type values this mapping imports

    @abc.abstractmethod
    def issues(self, mc: ModelConfig, sd: dict[str, torch.Tensor]) -> list[str] | None:
        ...

    @abc.abstractmethod
    def export_config(self, mc: ModelConfig) -> dict:
        """HF config.json fields (without token ids, dtype, architectures)."""
        ...

    @abc.abstractmethod
    def export_weights(self, mc: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ...

    @abc.abstractmethod
    def import_config(self, hf: dict) -> ModelConfig:
        ...

    @abc.abstractmethod
    def import_weights(self, hf: dict, mc: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict:
        ...


# ---- config helpers ------------------------------------------------------------------

def base_issues(mc: ModelConfig, attention: bool = True) -> list[str]:
    """Features no standard HF decoder class has: Peri-LN, ladder/parallel residual,
    attention without positions (HF attention classes always apply RoPE)."""
    out = []
    if mc.norm != "pre":
        out.append(f"model.norm={mc.norm} (Peri-LN output norms)")
    if mc.residual == "parallel":
        out.append("model.residual=parallel (PaLM-style parallel attention+MLP)")
    if mc.residual == "ladder" and mc.ladder_from < mc.n_sublayers - 1:
        # ladder from the last sublayer on reads the same stream as standard would
        out.append("model.residual=ladder (ladder residual)")
    if attention and mc.position != "rope":
        out.append(f"model.position={mc.position} (attention without RoPE)")
    return out


def stack(mc: ModelConfig) -> str:
    """The sublayer symbols of the whole model, stage boundaries removed."""
    return mc.full_pattern.replace("|", "")


def blocks(mc: ModelConfig, size: int = 2) -> list[str] | None:
    """The stack cut into HF decoder layers of ``size`` sublayers (None if it does not divide)."""
    s = stack(mc)
    if len(s) % size:
        return None
    return [s[i:i + size] for i in range(0, len(s), size)]


def rope_issues(hf: dict, arch: str) -> None:
    """Reject HF configs whose positions our RoPE cannot reproduce."""
    scaling = hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default", "linear",
                                                                             "llama3", "yarn"):
        raise UserError(f"{arch}: rope_scaling {scaling.get('rope_type') or scaling.get('type')!r} "
                        "has no equivalent here (plain RoPE, linear, llama3 or yarn)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{arch}: partial_rotary_factor != 1 has no equivalent here")


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ---- tensors -------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KiB', '123' -> bytes (GB = 10**9 as in transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.I)
    if not m:
        raise UserError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """Write ``model.safetensors`` or, above ``max_shard_bytes``, numbered shards plus
    ``model.safetensors.index.json`` (transformers' layout). Returns the file names."""
    from safetensors.torch import save_file

    # own, contiguous storage per tensor: safetensors refuses shared or strided tensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(out / SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    return names + [SAFE_INDEX]


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model directory (safetensors, sharded or not; or pytorch .bin)."""
    from safetensors.torch import load_file

    if (model_dir / SAFE_INDEX).is_file():
        index = json.loads((model_dir / SAFE_INDEX).read_text())
        out = {}
        for fname in sorted(set(index["weight_map"].values())):
            if not (model_dir / fname).is_file():
                raise UserError(f"{model_dir}: shard {fname} named in {SAFE_INDEX} is missing")
            out.update(load_file(str(model_dir / fname)))
        return out
    if (model_dir / SAFE_SINGLE).is_file():
        return load_file(str(model_dir / SAFE_SINGLE))
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for b in bins:
            out.update(torch.load(b, map_location="cpu", weights_only=True))
        return out
    raise UserError(f"{model_dir}: no model.safetensors, {SAFE_INDEX} or pytorch_model*.bin")


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def take(tensors: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"{where}: weight {name} is missing")
    return tensors[name]
