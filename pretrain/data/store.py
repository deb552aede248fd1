"""Opening prepared datasets (local directories or remote URLs) as random-access block stores.

A dataset is what ``pretrain data prepare`` writes: ``meta.json``, ``tokenizer.model`` and one
MDS directory per split. Blocks are read through mosaicml-streaming's ``StreamingDataset``
used purely as a sample store (no iteration, no shuffling of its own): ``store[i]`` downloads
the shard holding block ``i`` into the cache when needed and returns its tokens.

Distributed runs: ``StreamingDataset`` coordinates the processes of a node through shared
memory named after its local directory, and calls ``torch.distributed.barrier()`` while
opening (initializing a gloo group from the torchrun environment itself when none exists).
Opening a store is therefore collective: every rank must open the same datasets in the same
order. Each process opens a given (remote, local, split) once and then reuses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

_STORES: dict[tuple, object] = {}


def is_remote(path: str) -> bool:
    """URLs (s3://, gs://, file://, ...) are remote; anything else is a local directory."""
    scheme = urllib.parse.urlparse(path).scheme
    return len(scheme) > 1  # a one-letter "scheme" is a Windows drive


def _streaming_remote(url: str) -> str:
    # streaming copies from a plain filesystem path when the remote has no scheme, and knows
    # no "file" scheme: map file:///x to /x so a directory can act as a remote (tests, NFS).
    if url.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(url).path)
    return url


def default_cache_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "pretrain_data_cache")


@dataclass
class Dataset:
    """One prepared dataset: where it lives and its meta.json."""

    path: str  # as configured
    local: str  # directory holding meta.json and the split dirs (a cache dir for remotes)
    remote: str | None  # streaming remote root, or None for a local dataset
    meta: dict

    def store(self, split: str):
        """The split's StreamingDataset (opened once per process; collective when distributed)."""
        split_stats = self.meta["splits"].get(split)
        if not split_stats or not split_stats.get("samples"):
            raise UserError(f"{self.path}: split '{split}' holds no samples "
                            f"(prepared with --val-fraction 0, or too little data)")
        if self.remote is None and not (Path(self.local) / split / "index.json").is_file():
            raise UserError(f"{self.path}: split '{split}' is missing ({split}/index.json not found)")
        # Keyed by content too: a dataset re-prepared in place within one process gets a fresh store.
        digest = hashlib.sha1(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()
        key = (self.remote, os.path.abspath(self.local), split, digest)
        if key not in _STORES:
            _STORES[key] = _open_streaming(self, split)
        return _STORES[key]

    def tokenizer_path(self) -> str:
        """Local path of the dataset's tokenizer (fetched into the cache for remotes):
        tokenizer.model, or tokenizer.json with its config files beside it."""
        names = self.meta.get("tokenizer_files") or ["tokenizer.model"]
        for name in names:
            local = Path(self.local) / name
            if not local.is_file():
                if self.remote is None:
                    raise UserError(f"{self.path}: has no {name}")
                _fetch(self.remote, name, local, self.path)
        return str(Path(self.local) / ("tokenizer.json" if "tokenizer.json" in names else names[0]))


@contextmanager
def _one_registration_per_node():
    """Make ``StreamingDataset``'s shared-memory registration safe beside other jobs on the node.

    streaming picks a node-wide shared-memory prefix by scanning for the first free one; the
    local leader registers it between two barriers and the other ranks look it up with the
    prefix *they* scanned. Two jobs opening at once scan the same free prefix, and memory
    another job frees between two ranks' scans gives them different ones: either way a rank
    fails ("File exists: '/000004_locals'", "prefix=85 was not registered by local leader").
    So the local leader holds a node-wide file lock until its registration is done, and every
    rank uses its node leader's scan (an all-gather) instead of its own."""
    import torch.distributed as dist
    from streaming.base.shared import prefix as shm_prefix

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = dist.is_available() and dist.is_initialized()
    lock = None
    if local_rank == 0:
        lock = open(os.path.join(tempfile.gettempdir(), "pretrain_streaming_prefix.lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    scan = shm_prefix._check_and_find_retrying

    def leaders_scan(*args, **kwargs):
        mine = None
        if local_rank == 0:
            try:
                mine = ("prefix", scan(*args, **kwargs))
            except ValueError as e:  # a reused local directory: every rank raises it
                mine = ("error", e)
        got = [None] * dist.get_world_size()
        dist.all_gather_object(got, mine)
        kind, value = got[dist.get_rank() - local_rank]  # torchrun numbers a node's ranks contiguously
        if kind == "error":
            raise value
        return value

    if distributed:
        shm_prefix._check_and_find_retrying = leaders_scan
    try:
        if distributed:
            dist.barrier()
        yield
    finally:
        shm_prefix._check_and_find_retrying = scan
        if lock is not None:
            lock.close()  # releases the lock


def _open_streaming(ds: Dataset, split: str):
    from streaming import StreamingDataset

    try:
        with _one_registration_per_node():
            sd = StreamingDataset(remote=ds.remote, local=ds.local, split=split, shuffle=False,
                                  predownload=None, batch_size=None)
    except ValueError as e:
        if "Reused local directory" in str(e):
            raise UserError(
                f"{ds.path}: cache dir {ds.local} is registered by another live reader, or by a "
                f"crashed one; use another data.cache_dir or run streaming.base.util."
                f"clean_stale_shared_memory() when no other training runs on this node") from None
        raise UserError(f"{ds.path}: cannot open split '{split}' ({e})") from None
    except (OSError, RuntimeError, TimeoutError, json.JSONDecodeError) as e:
        raise UserError(f"{ds.path}: cannot open split '{split}' ({str(e).splitlines()[0]})") from None
    expected = ds.meta["splits"][split]["samples"]
    if sd.num_samples != expected:
        raise UserError(f"{ds.path}: split '{split}' has {sd.num_samples} samples but meta.json "
                        f"says {expected} (a partial or mixed-up dataset)")
    return sd


def _fetch(remote: str, name: str, dest: Path, label: str) -> None:
    """Download remote/name to dest atomically (each process via its own temporary file)."""
    from streaming.base.storage.download import CloudDownloader

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        CloudDownloader.direct_download(os.path.join(remote, name), str(tmp))
    except Exception as e:  # every backend raises its own types; all mean "cannot fetch"
        raise UserError(f"{label}: cannot fetch {name} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    os.replace(tmp, dest)


def _check_meta(meta: object, label: str) -> dict:
    need = ("vocab_size", "eos_id", "pad_id", "sample_len", "dtype", "splits")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise UserError(f"{label}: meta.json lacks {', '.join(need)}; re-run `pretrain data prepare`")
    return meta


def open_dataset(path: str, cache_dir: str | None = None) -> Dataset:
    """Resolve a configured dataset path (local directory or URL) and read its meta.json."""
    if not path:
        raise UserError("data.path (or data.mixture) must name a prepared dataset")
    from pretrain.data.megatron import megatron_prefix, open_megatron

    prefix = None if is_remote(path) else megatron_prefix(path)
    if prefix:  # a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx)
        return open_megatron(path, prefix)
    if not is_remote(path):
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"dataset directory not found: {path}")
        meta_file = root / "meta.json"
        if not meta_file.is_file():
            raise UserError(f"{path}: no meta.json (not written by `pretrain data prepare`, "
                            f"or preparation did not finish)")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{meta_file}: unreadable ({e})") from None
        return Dataset(path, str(root), None, _check_meta(meta, path))

    remote = _streaming_remote(path)
    cache = Path(cache_dir or default_cache_dir())
    url_key = hashlib.sha1(path.encode()).hexdigest()[:10]
    staged = cache / ".meta" / f"{url_key}.json"
    _fetch(remote, "meta.json", staged, path)
    raw = staged.read_bytes()
    try:
        meta = _check_meta(json.loads(raw), path)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: meta.json is not valid JSON ({e})") from None
    # The cache directory is keyed by URL *and* meta content, so re-preparing the remote
    # dataset can never mix its new shards with stale cached ones.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rstrip("/").split("/")[-1])[:40] or "dataset"
    local = cache / f"{name}-{hashlib.sha1(path.encode() + raw).hexdigest()[:12]}"
    local.mkdir(parents=True, exist_ok=True)
    if not (local / "meta.json").is_file():
        tmp = local / f".meta.json.{os.getpid()}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, local / "meta.json")
    return Dataset(path, str(local), remote, meta)


def read_block(store, index: int) -> np.ndarray:
    """Tokens of stored block ``index``."""
    return store[index]["tokens"]
