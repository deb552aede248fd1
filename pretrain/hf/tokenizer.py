"""The project's sentencepiece model as a Hugging Face ``LlamaTokenizerFast``.

Our tokenizers (pretrain/data/tokenizer.py) are byte-fallback BPE with identity
normalization and no dummy prefix, ids pad=0, bos=1, eos=2, unk=3. transformers'
own Llama converter assumes unk=0 and a dummy-prefix space, so the ``tokenizer.json``
is built here directly from the model proto: the same vocabulary, merges ordered by
piece score (sentencepiece BPE merges the highest-scoring pair first), spaces escaped
to U+2581 with no pre-splitting, byte fallback, and a decoder that undoes exactly that.
``add_bos_token`` is off: training packs documents as ``doc EOS doc EOS`` with no BOS.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.errors import UserError

SPACE = "\u2581"
_NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 1, 2, 3, 4, 6  # sentencepiece piece types


def _load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf raises its own DecodeError
        raise UserError(f"{path}: not a valid sentencepiece model") from None
    return proto


def _merges(vocab: dict[str, int], scores: dict[str, float], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every (left, right) split of a learned piece into two learned pieces, best score first."""
    ranked = []
    for piece in mergeable:
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[piece], vocab[piece], vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_fast_tokenizer(spm_path: str | Path, max_len: int = 2048):
    """A ``LlamaTokenizerFast`` that encodes and decodes as ``spm_path`` does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizerFast

    path = Path(spm_path)
    proto = _load_proto(path)
    ns = proto.normalizer_spec
    if proto.trainer_spec.model_type != 2:  # BPE
        raise UserError(f"{path}: only BPE sentencepiece models can be exported (this one is not)")
    if ns.add_dummy_prefix or ns.name not in ("identity", "") or ns.remove_extra_whitespaces:
        raise UserError(f"{path}: export needs identity normalization without dummy prefix or whitespace "
                        f"folding (as pretrain data tokenizers are trained); this model uses {ns.name!r}")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    scores = {p.piece: p.score for p in pieces}
    specials = {i: p.piece for i, p in enumerate(pieces) if p.type in (_CONTROL, _UNKNOWN, _USER)}
    mergeable = {p.piece for p in pieces if p.type == _NORMAL}
    unk = next((p.piece for p in pieces if p.type == _UNKNOWN), "<unk>")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(vocab, scores, mergeable), unk_token=unk,
                               fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    return LlamaTokenizerFast(
        tokenizer_object=tok, vocab_file=str(path), legacy=True,
        bos_token=piece(proto.trainer_spec.bos_id), eos_token=piece(proto.trainer_spec.eos_id),
        unk_token=unk, pad_token=piece(proto.trainer_spec.pad_id),
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=max_len)


def write_tokenizer(spm_path: str | Path, out_dir: Path, max_len: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model."""
    tok = build_fast_tokenizer(spm_path, max_len)
    files = tok.save_pretrained(str(out_dir))
    return sorted({Path(f).name for f in files})
