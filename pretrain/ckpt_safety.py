"""Loading a checkpoint never runs code from it.

Every file of a checkpoint is read as data: JSON (``meta.json``, ``trainer_state.json``),
YAML through the safe loader (``config.yaml``), tensors with ``torch.load(weights_only=True)``
(``rng_rank<r>.pt``). DCP itself unpickles two things with plain ``pickle``: its ``.metadata``
file and non-tensor values (optimizer hyper-parameters) stored as bytes. Here the first goes
through an unpickler that only builds DCP's own metadata records (dataclasses of names,
shapes, dtypes and file offsets), and the second through ``torch.load(weights_only=True)``.
Anything else in those files is refused with a ``UserError`` before it is constructed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pretrain.errors import UserError

_DCP_METADATA = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to the torch.layout
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafePickle(Exception):
    """The pickle names something other than plain data records."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" and name in _DCP_METADATA:
            return super().find_class(module, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickle(f"{module}.{name}")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` of ``path``, built only from DCP's metadata records."""
    meta_file = Path(path) / ".metadata"
    try:
        with open(meta_file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except UnsafePickle as e:
        raise UserError(f"checkpoint {path}: .metadata refers to {e}, which a DCP checkpoint never "
                        f"holds (refused to load it: it could run code)") from None
    except Exception as e:  # truncated or garbled files raise anything from EOFError to TypeError
        raise UserError(f"checkpoint {path}: .metadata is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise UserError(f"checkpoint {path}: .metadata holds a {type(md).__name__}, not DCP metadata")
    return md


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata (use_collectives=False) is not used here
            raise UserError(f"checkpoint {self.path}: per-rank DCP metadata is not supported")
        md = read_dcp_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyper-parameters) are loaded with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"checkpoint value {read_item.dest_index.fqn} is not plain data "
                            f"(refused: {str(e).splitlines()[0][:200]})") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the safe object
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_tensors(path: Path, what: str):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{what}: {path.name} holds more than tensors (refused to unpickle it: "
                        f"{str(e).strip().splitlines()[0][:200]})") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise UserError(f"{what}: {path.name} is unreadable ({type(e).__name__})") from None
