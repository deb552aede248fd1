"""A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) behind the project's tokenizer
interface (see ``pretrain.data.tokenizer.load_tokenizer``).

Special tokens come from the ``tokenizer_config.json`` (or ``special_tokens_map.json``) next to
``tokenizer.json``: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, as strings or
``{"content": ...}`` objects, as transformers writes them. Encoding never adds special tokens
(training packs documents as ``doc EOS doc EOS``) nor parses special-token strings in
the text (a literal ``</s>`` stays text, as with sentencepiece); decoding skips them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pretrain.errors import UserError

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_ROLES = ("bos", "eos", "pad", "unk")


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _read_specials(directory: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in reversed(CONFIG_FILES):  # tokenizer_config.json wins
        f = directory / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{f}: not valid JSON ({e})") from None
        for role in _ROLES:
            text = _token_text(cfg.get(f"{role}_token")) if isinstance(cfg, dict) else None
            if text:
                found[role] = text
    return found


class HFTokenizer:
    """``tokenizer.json`` plus its config: encode/decode without special tokens."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"tokenizer not found: {self.path}")
        try:
            self.tok = _Tok.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception for bad files
            raise UserError(f"{self.path}: not a valid tokenizer.json ({str(e).strip()[:120]})") from None
        # A literal "</s>" in a document is text, not a document end (sentencepiece agrees).
        self.tok.encode_special_tokens = True
        self.specials = _read_specials(self.path.parent)
        self._ids = {}
        for role in _ROLES:
            text = self.specials.get(role)
            i = self.tok.token_to_id(text) if text else None
            if text and i is None:
                raise UserError(f"{self.path.parent}: {role}_token {text!r} is not in the vocabulary")
            self._ids[role] = -1 if i is None else i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i))

    def files(self) -> dict[str, Path]:
        """Canonical name -> source path of every file this tokenizer consists of."""
        out = {"tokenizer.json": self.path}
        for name in CONFIG_FILES:
            if (self.path.parent / name).is_file():
                out[name] = self.path.parent / name
        return out

    def write_hf(self, out_dir: Path, max_len: int) -> list[str]:
        """Files ``AutoTokenizer.from_pretrained(out_dir)`` loads as this tokenizer."""
        from transformers import PreTrainedTokenizerFast

        kw = {f"{r}_token": t for r, t in self.specials.items()}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(self.path), model_max_length=max_len,
                                      clean_up_tokenization_spaces=False, **kw)
        files = tok.save_pretrained(str(out_dir))
        return sorted({Path(f).name for f in files})

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def copy_files(files: dict[str, Path], dest_dir: Path) -> None:
    for name, src in files.items():
        dst = dest_dir / name
        if not dst.exists() or dst.resolve() != src.resolve():
            shutil.copyfile(src, dst)


def train_hf_bpe(docs, out_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE ``tokenizer.json`` with Llama-style specials and config.

    ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3; the post-processor prepends ``<s>`` as
    Llama's does (``pretrain`` itself never adds specials). Byte-level, so every string
    round-trips. Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json.
    """
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = _Tok(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2) + "\n")
    return out / "tokenizer.json"
