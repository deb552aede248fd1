"""Tokenizers: the project's sentencepiece BPE (trained here so that decode(encode(s)) == s)
and, through the same interface, a Hugging Face ``tokenizer.json`` (``pretrain.data.hf_tokenizer``).

``load_tokenizer(path)`` is the one place that tells the kinds apart; everything else
(prepare, training, eval, generate, export) uses the interface: ``vocab_size``, ``bos_id``,
``eos_id``, ``pad_id`` (-1 when absent), ``encode``, ``encode_batch``, ``decode``,
``files()`` (what to copy into datasets and checkpoints) and ``write_hf`` (export files).

Sentencepiece ids follow the Llama convention the HF exporter relies on: pad=0, bos=1,
eos=2, unk=3, then 256 byte-fallback pieces, then learned merges.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from pretrain.data.sources import expand_inputs, iter_documents
from pretrain.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MIN_VOCAB = 4 + 256 + 16  # specials + byte fallback + a few merges
_CHUNK_CHARS = 2000  # training "sentences" are multi-line chunks so pieces can learn "\n" + indent


def _training_chunks(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents cut at line boundaries into chunks of about _CHUNK_CHARS, up to max_bytes."""
    seen = 0
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            if size + len(line) > _CHUNK_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
            seen += len(line.encode("utf-8"))
            if seen >= max_bytes:
                break
        if buf:
            yield "".join(buf)
        if seen >= max_bytes:
            return


def train_tokenizer(inputs: list[str] | str, out_prefix: str | os.PathLike, vocab_size: int = 4096,
                    text_field: str = "text", max_bytes: int = 32 * 1024 * 1024,
                    input_sentence_size: int = 100_000, num_threads: int = 2,
                    character_coverage: float = 0.9995) -> Path:
    """Train a byte-fallback BPE model on ``inputs`` and write ``<out_prefix>.model``.

    Whitespace is kept verbatim (identity normalization, no dummy prefix, whitespace-only
    pieces allowed), so indentation and newlines round-trip. At most ``max_bytes`` of text
    and ``input_sentence_size`` sampled chunks are used, which keeps training on ~8 MB of
    code to a few seconds.
    """
    if vocab_size < MIN_VOCAB:
        raise UserError(f"tokenizer vocab_size must be >= {MIN_VOCAB} (4 specials + 256 bytes + merges), "
                        f"got {vocab_size}")
    paths = expand_inputs(inputs)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    input_errors: list[UserError] = []

    def sentences() -> Iterator[str]:
        # sentencepiece turns exceptions raised by the iterator into a RuntimeError carrying
        # a traceback; keep ours to re-raise the one-line UserError.
        try:
            yield from _training_chunks(iter_documents(paths, text_field), max_bytes)
        except UserError as e:
            input_errors.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=character_coverage, max_sentence_length=4 * _CHUNK_CHARS + 64,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads, minloglevel=2)
    except (RuntimeError, UserError) as e:
        if input_errors:
            raise input_errors[0] from None
        # e.g. "Vocabulary size is too high": the corpus cannot support that many merges
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise UserError(f"tokenizer training failed on {names}: {msg}") from None
    path = out_prefix.with_name(out_prefix.name + ".model")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # what a dataset/checkpoint dir may hold


def find_tokenizer(directory: str | os.PathLike) -> Path | None:
    """The tokenizer file a dataset, checkpoint or export directory holds, if any."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_tokenizer(path: str | os.PathLike):
    """A sentencepiece ``.model``, a ``tokenizer.json``, or a directory holding either."""
    p = Path(path)
    if p.is_dir():
        found = find_tokenizer(p)
        if found is None:
            raise UserError(f"{p}: holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
        p = found
    if p.suffix == ".json":
        from pretrain.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(p)
    return Tokenizer(p)


def copy_tokenizer_files(path: str | os.PathLike, dest_dir: str | os.PathLike) -> list[str]:
    """Copy a tokenizer's files into ``dest_dir`` under their canonical names."""
    from pretrain.data.hf_tokenizer import copy_files

    files = load_tokenizer(path).files()
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    copy_files(files, Path(dest_dir))
    return sorted(files)


class Tokenizer:
    """A trained sentencepiece model: encode/decode without BOS/EOS (callers add them)."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(str(self.path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{self.path}: not a valid sentencepiece model ({str(e).strip()[:120]})") from None
        if ok is False or self.sp.get_piece_size() == 0:
            raise UserError(f"{self.path}: not a valid sentencepiece model")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def files(self) -> dict[str, Path]:
        """Canonical name -> source path of every file this tokenizer consists of."""
        return {"tokenizer.model": self.path}

    def write_hf(self, out_dir: Path, max_len: int) -> list[str]:
        """Files ``AutoTokenizer.from_pretrained(out_dir)`` loads as this tokenizer."""
        from pretrain.hf.tokenizer import write_tokenizer

        return write_tokenizer(self.path, out_dir, max_len)

    def save(self, path: str | os.PathLike) -> Path:
        """Copy the model file to ``path`` (no-op when it already is that file)."""
        dst = Path(path)
        if dst.resolve() != self.path.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path, dst)
        return dst

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
