"""Corpus and tokenizer: stdlib corpus, sentencepiece training, exact round trips, errors."""

import json
import time

import pytest

from pretrain.data.cli import main as data_main
from pretrain.data.corpus import stdlib_corpus, stdlib_files
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory.mktemp("corpus") / "code.jsonl", max_bytes=300_000)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return Tokenizer(train_tokenizer([str(corpus)], tmp_path_factory.mktemp("tok") / "t", vocab_size=512))


def _docs(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def test_corpus_is_capped_deterministic_stdlib_source(corpus, tmp_path):
    docs = _docs(corpus)
    assert len(docs) > 5
    assert sum(len(d.encode()) for d in docs) <= 300_000
    assert sum(len(d.encode()) for d in docs) > 250_000  # smaller files fill the remaining room
    again = stdlib_corpus(tmp_path / "again.jsonl", max_bytes=300_000)
    assert again.read_bytes() == corpus.read_bytes()
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    assert docs[0] in {p.read_text(encoding="utf-8") for p in files[:50]}


def test_special_ids_follow_llama_convention(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    assert tok.id_to_piece(4) == "<0x00>"  # byte fallback pieces follow the specials


def test_round_trip_source_files_and_awkward_whitespace(tok, corpus):
    docs = _docs(corpus)
    for d in docs:
        assert tok.decode(tok.encode(d)) == d
    awkward = [
        "", " ", "  leading spaces", "trailing  \n", "\tdef f():\r\n\t\treturn  1\r\n",
        "x = 1\n\n\n\n        y = 2\n", "naïve café – ünïcode ✓ 🚀 中文\n", "1234567890 3.14159e-10",
        "\x00\x01 control \x7f", "\u00a0nbsp and \u2028 separators",
    ]
    for s in awkward:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert tok.encode_batch(awkward) == [tok.encode(s) for s in awkward]
    # Merges pay off even with only ~250 of them (512 minus specials and bytes).
    text = "".join(docs)
    assert len(text.encode()) / len(tok.encode(text)) > 1.6
    assert tok.decode(__import__("numpy").array(tok.encode("a b"))) == "a b"


def test_indentation_pieces_are_learned(tok):
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "▁▁▁▁" in pieces  # four-space indentation is one piece
    assert any("\n" in p for p in pieces)  # newlines merge with neighbours


def test_tokenizer_errors_name_the_path(tmp_path, corpus):
    with pytest.raises(UserError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="bad.model"):
        Tokenizer(bad)
    with pytest.raises(UserError, match="vocab_size must be"):
        train_tokenizer([str(corpus)], tmp_path / "t", vocab_size=100)
    with pytest.raises(UserError, match="Vocabulary size too high"):
        train_tokenizer([str(corpus)], tmp_path / "t", vocab_size=60000)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match=r"broken.jsonl:2: record has no field 'text'"):
        train_tokenizer([str(broken)], tmp_path / "t", vocab_size=300)


def test_training_two_megabytes_is_fast(tmp_path):
    corpus = stdlib_corpus(tmp_path / "c.jsonl", max_bytes=2_000_000)
    t0 = time.perf_counter()
    path = train_tokenizer([str(corpus)], tmp_path / "t", vocab_size=2048)
    took = time.perf_counter() - t0
    assert took < 30, took
    tok = Tokenizer(path)
    docs = _docs(corpus)
    assert all(tok.decode(ids) == d for ids, d in zip(tok.encode_batch(docs), docs))


def test_cli_corpus_and_tokenizer(tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert data_main(["corpus", "--out", str(out), "--max-bytes", "100000"]) == 0
    assert data_main(["tokenizer", "--input", str(out), "--out", str(tmp_path / "tk"),
                      "--vocab-size", "400"]) == 0
    assert Tokenizer(tmp_path / "tk.model").vocab_size == 400
    assert data_main(["tokenizer", "--input", str(tmp_path / "none*.txt"), "--out",
                      str(tmp_path / "tk2"), "--vocab-size", "300"]) == 2
    assert "pattern matches no files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        data_main(["tokenizer", "--help"])
    assert e.value.code == 0
