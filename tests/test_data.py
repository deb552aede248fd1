"""Data pipeline: prepare (MDS shards + meta) and the deterministic, resumable loader."""

import gzip
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import DataConfig, DatasetSource
from pretrain.data.cli import main as data_main
from pretrain.data.corpus import stdlib_corpus
from pretrain.data.loader import IGNORE_INDEX, MIX_CHUNK, TokenBatches, doc_ids_of, eval_batches, resolve_tokenizer
from pretrain.data.prepare import held_out_mask, prepare, token_dtype, unigram_entropy
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.errors import UserError

SAMPLE_LEN = 256


def _docs(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory.mktemp("corpus") / "code.jsonl", max_bytes=300_000)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return Tokenizer(train_tokenizer([str(corpus)], tmp_path_factory.mktemp("tok") / "t", vocab_size=512))


@pytest.fixture(scope="module")
def dataset(corpus, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "code"
    # Small shards so reads cross shard files; two worker processes as in real use.
    prepare([str(corpus)], out, tok.path, sample_len=SAMPLE_LEN, val_fraction=0.1, workers=2,
            progress=False, shard_bytes=1 << 14)
    return out


@pytest.fixture(scope="module")
def dataset2(corpus, tok, tmp_path_factory):
    """A second source: the corpus reversed, gzipped, under another field, other block size."""
    d = tmp_path_factory.mktemp("ds2")
    src = d / "rev.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for text in reversed(_docs(corpus)):
            f.write(json.dumps({"body": text}) + "\n")
    prepare([str(src)], d / "rev", tok.path, text_field="body", sample_len=300, workers=1,
            progress=False)
    return d / "rev"


def _streams(docs, tok, val_fraction=0.1):
    mask = held_out_mask(len(docs), val_fraction)
    out = {}
    for name, keep in (("train", ~mask), ("val", mask)):
        ids = [tok.encode(d) + [tok.eos_id] for d, k in zip(docs, keep) if k]
        out[name] = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
    return out


def _blocks(path, split):
    from streaming import StreamingDataset

    sd = StreamingDataset(local=str(path), split=split, shuffle=False)
    return [sd[i]["tokens"] for i in range(sd.num_samples)]


def _cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


# ---- prepare --------------------------------------------------------------------------------

def test_prepare_writes_splits_meta_and_exact_token_stream(dataset, corpus, tok):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["sample_len"] == SAMPLE_LEN
    assert (meta["eos_id"], meta["pad_id"]) == (2, 0)
    assert (dataset / "tokenizer.model").read_bytes() == Path(tok.path).read_bytes()
    assert len(list((dataset / "train").rglob("shard.*.mds"))) > 3
    docs = _docs(corpus)
    streams = _streams(docs, tok)
    assert meta["splits"]["val"]["documents"] == max(1, round(0.1 * len(docs)))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
    for split, stream in streams.items():
        s = meta["splits"][split]
        assert s["tokens"] == len(stream)
        assert s["samples"] == math.ceil(len(stream) / SAMPLE_LEN)
        assert s["padded_tokens"] == s["samples"] * SAMPLE_LEN - len(stream)
        blocks = _blocks(dataset, split)
        assert all(b.dtype == np.uint16 and b.shape == (SAMPLE_LEN,) for b in blocks)
        flat = np.concatenate(blocks).astype(np.int64)
        assert (flat[: len(stream)] == stream).all()
        assert (flat[len(stream):] == tok.pad_id).all()
    counts = np.bincount(streams["train"], minlength=512)
    assert meta["unigram_entropy"] == pytest.approx(unigram_entropy(counts))
    assert 3.0 < meta["unigram_entropy"] < math.log(512)


def test_prepare_is_deterministic_whatever_the_workers(dataset, corpus, tok, tmp_path):
    prepare([str(corpus)], tmp_path / "w1", tok.path, sample_len=SAMPLE_LEN, val_fraction=0.1,
            workers=1, progress=False, shard_bytes=1 << 14)
    for split in ("train", "val"):
        a = sorted(p for p in (dataset / split).rglob("*") if p.is_file())
        b = sorted(p for p in (tmp_path / "w1" / split).rglob("*") if p.is_file())
        assert [p.relative_to(dataset) for p in a] == [p.relative_to(tmp_path / "w1") for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    m1, m2 = (json.loads((d / "meta.json").read_text()) for d in (dataset, tmp_path / "w1"))
    assert {k: v for k, v in m1.items() if k != "inputs"} == {k: v for k, v in m2.items() if k != "inputs"}


def test_prepare_reads_text_files_globs_and_gzip_jsonl(tok, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("def a():\n    return 1\n")
    (tmp_path / "in" / "b.txt").write_text("class B:\n    pass\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "x = 1\n", "other": 3}) + "\n\n")
        f.write(json.dumps({"body": "y = 2\n"}) + "\n")
    meta = prepare([str(tmp_path / "in" / "*.txt"), str(tmp_path / "c.jsonl.gz")], tmp_path / "out",
                   tok.path, text_field="body", sample_len=16, workers=1, progress=False)
    texts = ["def a():\n    return 1\n", "class B:\n    pass\n", "x = 1\n", "y = 2\n"]
    total = sum(len(tok.encode(t)) + 1 for t in texts)
    s = meta["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 4 and s["val"]["documents"] == 1
    assert s["train"]["tokens"] + s["val"]["tokens"] == total
    assert token_dtype(512) == "uint16" and token_dtype(65535) == "uint16" and token_dtype(65536) == "int32"


def test_prepare_errors_name_the_problem(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "a"}\n{"content": "b"}\n')
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"text": "a"}\n{not json\n')
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    one = tmp_path / "one.txt"
    one.write_text("only one document\n")
    cases = [
        ([str(empty)], {}, "empty.txt: file is empty"),
        ([str(nofield)], {}, "nofield.jsonl:2: record has no field 'text'"),
        ([str(badjson)], {}, "bad.jsonl:2: not valid JSON"),
        ([str(binary)], {}, "bin.txt: not UTF-8"),
        ([str(tmp_path / "nothing*.jsonl")], {}, "matches no files"),
        ([str(tmp_path / "missing.txt")], {}, "missing.txt: no such file"),
        ([str(one)], {}, "cannot hold out 1 of 1"),
        ([str(one)], {"sample_len": 1}, "sample_len must be >= 2"),
        ([str(one)], {"tokenizer": tmp_path / "no.model"}, "no.model"),
    ]
    for inputs, kw, msg in cases:
        kw = {"tokenizer": tok.path, **kw}
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            prepare(inputs, tmp_path / "out", progress=False, workers=1, **kw)
    meta = prepare([str(one)], tmp_path / "out", tok.path, val_fraction=0.0, workers=1, progress=False)
    assert meta["splits"]["val"]["samples"] == 0 and not (tmp_path / "out" / "val").exists()
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare([str(one)], tmp_path / "out", tok.path, val_fraction=0.0, progress=False)


def test_foreign_tokenizer_without_pad_drops_the_partial_block(corpus, tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = Tokenizer(tmp_path / "plain.model")
    assert tok.pad_id == -1
    meta = prepare([str(corpus)], tmp_path / "d", tok.path, sample_len=100, workers=1, progress=False)
    s = meta["splits"]["train"]
    assert meta["final_block"] == "dropped" and s["padded_tokens"] == 0
    assert s["samples"] == s["tokens"] // 100 and s["dropped_tokens"] == s["tokens"] % 100
    b = next(TokenBatches(_cfg(tmp_path / "d", seq_len=99, shuffle=False), "train", 2, 0, 1, seed=0))
    assert (b["labels"] >= 0).all() and b["doc_ids"].shape == (2, 99)


def test_cli_prepare(corpus, tok, tmp_path, capsys):
    args = ["prepare", "--input", str(corpus), "--out", str(tmp_path / "d"), "--tokenizer", str(tok.path),
            "--sample-len", "128", "--workers", "1", "--no-progress"]
    assert data_main(args) == 0
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["sample_len"] == 128
    assert "unigram entropy" in capsys.readouterr().out
    assert data_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data_main(args + ["--overwrite"]) == 0


# ---- loader ---------------------------------------------------------------------------------

def test_windows_reproduce_the_token_stream(dataset, tok):
    blocks = [b.astype(np.int64) for b in _blocks(dataset, "train")]
    meta = json.loads((dataset / "meta.json").read_text())["splits"]["train"]
    # seq_len + 1 == sample_len: one window per block, so the windows are the stream itself.
    it = TokenBatches(_cfg(dataset, seq_len=SAMPLE_LEN - 1, shuffle=False), "train", 4, 0, 1, seed=0)
    assert it.meta["windows"] == len(blocks)
    rows = []
    while len(rows) < len(blocks):
        b = next(it)
        rows += [torch.cat([x[:1], y]) for x, y in zip(b["input_ids"], b["labels"])]
        assert (b["input_ids"][:, 1:] == b["labels"][:, :-1].masked_fill(b["labels"][:, :-1] == IGNORE_INDEX, 0)).all()
    real = len(blocks) * SAMPLE_LEN - meta["padded_tokens"]
    flat = torch.cat(rows[: len(blocks)]).numpy()
    stream = np.concatenate(blocks)
    assert (flat[:real] == stream[:real]).all()
    assert (flat[real:] == IGNORE_INDEX).all()  # padding is never a target
    # Shorter windows: floor(256 / 51) = 5 per block, the tail of each block unused.
    it = TokenBatches(_cfg(dataset, seq_len=50, shuffle=False), "train", 5, 0, 1, seed=0)
    for b_idx in (0, 1, len(blocks) // 2):
        it.cursor = 5 * b_idx
        got = next(it)["input_ids"]
        want = torch.from_numpy(np.stack([blocks[b_idx][j * 51:j * 51 + 50] for j in range(5)]))
        assert torch.equal(got, want)


def test_doc_ids_increment_after_each_eos(dataset):
    x = torch.tensor([[5, 2, 7, 8, 2, 2, 9], [2, 3, 3, 3, 3, 3, 2]])
    assert doc_ids_of(x, 2).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    it = TokenBatches(_cfg(dataset, seq_len=127), "train", 64, 0, 1, seed=1)
    n_eos = 0
    for _ in range(4):  # documents are long: look at a few batches to meet several EOS
        b = next(it)
        inp, doc = b["input_ids"], b["doc_ids"]
        n_eos += int((inp == 2).sum())
        assert (doc[:, 0] == 0).all()
        assert torch.equal(doc[:, 1:] - doc[:, :-1], (inp[:, :-1] == 2).long())
    assert n_eos > 0
    assert "doc_ids" not in TokenBatches(_cfg(dataset, seq_len=127), "train", 2, 0, 1, seed=1,
                                         doc_ids=False).batch_at(0)


def test_shuffled_epochs_are_seeded_permutations(dataset):
    it = TokenBatches(_cfg(dataset, seq_len=63), "train", 8, 0, 1, seed=5)
    n = it.meta["windows"]
    e0 = [it.locate(g)[1] for g in range(n)]
    e1 = [it.locate(g)[1] for g in range(n, 2 * n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1 and e0 != list(range(n))
    again = TokenBatches(_cfg(dataset, seq_len=63), "train", 8, 0, 1, seed=5)
    other = TokenBatches(_cfg(dataset, seq_len=63), "train", 8, 0, 1, seed=6)
    assert [again.locate(g)[1] for g in range(n)] == e0
    assert [other.locate(g)[1] for g in range(n)] != e0


def _global(loaders, steps):
    out = []
    for _ in range(steps):
        parts = [next(it) for it in loaders]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return out


def test_layout_independence_and_exact_resume(dataset):
    cfg = _cfg(dataset, seq_len=50)
    G = 32
    one = [TokenBatches(cfg, "train", G, 0, 1, seed=3)]
    n_steps = one[0].meta["windows"] // G + 12  # crosses an epoch boundary
    ref = _global(one, n_steps)
    two = [TokenBatches(cfg, "train", G, r, 2, seed=3) for r in range(2)]
    four = [TokenBatches(cfg, "train", G, r, 4, seed=3) for r in range(4)]
    for a, b in zip(ref[:6], _global(two, 6)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(ref[:3], _global(four, 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert two[0].state_dict() == two[1].state_dict() == {**four[0].state_dict(), "cursor": 6 * G}

    # Interrupt mid-epoch under dp=1, resume under dp=2: the rest matches the uninterrupted run.
    first = TokenBatches(cfg, "train", G, 0, 1, seed=3)
    _global([first], 17)
    sd = json.loads(json.dumps(first.state_dict()))  # survives a plain-JSON round trip
    resumed = [TokenBatches(cfg, "train", G, r, 2, seed=3) for r in range(2)]
    for it in resumed:
        it.load_state_dict(sd)
    for a, b in zip(ref[17:], _global(resumed, n_steps - 17)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="seed"):
        TokenBatches(cfg, "train", G, 0, 1, seed=4).load_state_dict(sd)
    with pytest.raises(UserError, match="other data"):
        TokenBatches(_cfg(dataset, seq_len=40), "train", G, 0, 1, seed=3).load_state_dict(sd)


def test_mixture_weights_and_determinism(dataset, dataset2):
    cfg = DataConfig(mixture=[DatasetSource(str(dataset), 1.0), DatasetSource(str(dataset2), 3.0)],
                     seq_len=63)
    it = TokenBatches(cfg, "train", 8, 0, 1, seed=0)
    n = 3 * MIX_CHUNK + 123
    located = [it.mixture.locate(g) for g in range(n)]
    src = np.array([s for s, _ in located])
    assert abs((src == 0).mean() - 0.25) < 0.002
    assert abs((src[:500] == 0).mean() - 0.25) < 0.06  # mixed finely, not in long runs
    for s in (0, 1):  # each source walks its own order without gaps
        assert [k for t, k in located if t == s] == list(range(int((src == s).sum())))
    assert it.epochs()[1] == 0.0 and len(it.meta["sources"]) == 2
    again = TokenBatches(cfg, "train", 8, 0, 1, seed=0)
    a, b = _global([it], 5), _global([again], 5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    other = TokenBatches(cfg, "train", 8, 0, 1, seed=1)
    assert not torch.equal(_global([other], 1)[0]["input_ids"], a[0]["input_ids"])
    # A mixture sample of source 0 is that source's own k-th sample.
    solo = TokenBatches(_cfg(dataset, seq_len=63), "train", 8, 0, 1, seed=0)
    for g in range(40):
        s, k = it.mixture.locate(g)
        if s == 0:
            assert (it.sample(g) == solo.sample(k)).all()


def test_long_sequences_span_consecutive_blocks(dataset):
    blocks = [b.astype(np.int64) for b in _blocks(dataset, "train")]
    meta = json.loads((dataset / "meta.json").read_text())["splits"]["train"]
    stream, real = np.concatenate(blocks), len(blocks) * SAMPLE_LEN - meta["padded_tokens"]
    seq = 3 * SAMPLE_LEN + 10  # a window spans 4 or 5 stored blocks
    W = seq + 1
    it = TokenBatches(_cfg(dataset, seq_len=seq, shuffle=False), "train", 2, 0, 1, seed=0)
    n = it.meta["windows"]
    assert n == min(len(stream) // W, (real - 2) // W + 1) and n >= 10
    for c in (0, 2, n - 2):  # the last batch reaches the padded tail of the split when it can
        it.cursor = c
        b = next(it)
        for r in range(2):
            want = torch.from_numpy(stream[(c + r) * W:(c + r + 1) * W])
            assert torch.equal(b["input_ids"][r], want[:-1])
            lab = want[1:].clone()
            lab[(c + r) * W + 1 + torch.arange(seq) >= real] = IGNORE_INDEX
            assert torch.equal(b["labels"][r], lab)
        assert torch.equal(b["doc_ids"], doc_ids_of(b["input_ids"], it.eos_id))
    # layout independence and exact resume (shuffled), as for short windows
    cfg = _cfg(dataset, seq_len=seq)
    ref = _global([TokenBatches(cfg, "train", 4, 0, 1, seed=3)], n // 4 + 3)  # crosses an epoch
    two = [TokenBatches(cfg, "train", 4, r, 2, seed=3) for r in range(2)]
    for a, b in zip(ref[:3], _global(two, 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = [TokenBatches(cfg, "train", 4, r, 2, seed=3) for r in range(2)]
    for r in resumed:
        r.load_state_dict(json.loads(json.dumps(two[0].state_dict())))
    for a, b in zip(ref[3:], _global(resumed, len(ref) - 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="too small for data.seq_len"):
        TokenBatches(_cfg(dataset, seq_len=len(stream)), "train", 1, 0, 1, seed=0)


def test_context_parallel_ranks_read_only_their_spans(dataset):
    from pretrain.data.loader import span_doc_ids

    seq, cp = 4 * SAMPLE_LEN, 4  # 8 chunks of 128 tokens; rank i holds chunks i and 7 - i
    n = seq // (2 * cp)
    it = TokenBatches(_cfg(dataset, seq_len=seq), "train", 3, 0, 1, seed=1)
    # a batch in which documents end (they are long: look for one)
    cur = next(c for c in range(0, 60, 3) if int((it.batch_at(c)["input_ids"] == it.eos_id).sum()) > 1)
    full = it.batch_at(cur)
    got = {}
    for r in range(cp):
        spans = [(c * n, (c + 1) * n) for c in (r, 2 * cp - 1 - r)]
        it._blocks.clear()
        part = it.spans_at(cur, spans)
        # a chunk of 128 tokens lies in at most 2 blocks of 256: 3 rows x 2 chunks x 2
        assert len(it._blocks) <= 12
        for k, (a, b) in enumerate(spans):
            got[a] = {key: part[key][:, k * n:(k + 1) * n] for key in ("input_ids", "labels", "doc_ids")}
            got[a]["eos"] = part["span_eos"][:, k]
    starts = sorted(got)
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([got[a][key] for a in starts], 1), full[key])
    eos = torch.stack([got[a]["eos"] for a in starts], 1)
    before = eos.cumsum(1) - eos  # what the cp ranks would all-gather
    ids = span_doc_ids(torch.cat([got[a]["doc_ids"] for a in starts], 1), [(a, a + n) for a in starts], before)
    assert torch.equal(ids, full["doc_ids"])
    with pytest.raises(ValueError, match="outside"):
        it.spans_at(0, [(0, seq + 1)])


def test_loader_errors(dataset, corpus, tmp_path):
    with pytest.raises(UserError, match="dataset directory not found"):
        TokenBatches(_cfg(tmp_path / "nope", seq_len=32), "train", 4, 0, 1, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no meta.json"):
        TokenBatches(_cfg(tmp_path / "empty", seq_len=32), "train", 4, 0, 1, seed=0)
    with pytest.raises(UserError, match="no field|must name"):
        TokenBatches(DataConfig(seq_len=32), "train", 4, 0, 1, seed=0)
    small = Tokenizer(train_tokenizer([str(corpus)], tmp_path / "t400", vocab_size=400))
    prepare([str(corpus)], tmp_path / "v400", small.path, sample_len=128, val_fraction=0.0,
            workers=1, progress=False)
    mixed = DataConfig(mixture=[DatasetSource(str(dataset)), DatasetSource(str(tmp_path / "v400"))], seq_len=32)
    with pytest.raises(UserError, match="vocab_size differs"):
        TokenBatches(mixed, "train", 4, 0, 1, seed=0)
    with pytest.raises(UserError, match="split 'val' holds no samples"):
        TokenBatches(_cfg(tmp_path / "v400", seq_len=32), "val", 4, 0, 1, seed=0)
    with pytest.raises(UserError, match="eos_id 7 does not match"):
        TokenBatches(_cfg(dataset, seq_len=32), "train", 4, 0, 1, seed=0, eos_id=7)
    with pytest.raises(UserError, match="exceeds model.vocab_size=256"):
        TokenBatches(_cfg(dataset, seq_len=32), "train", 4, 0, 1, seed=0, model_vocab=256)
    with pytest.raises(UserError, match="multiple of the data-parallel size 3"):
        TokenBatches(_cfg(dataset, seq_len=32), "train", 4, 0, 3, seed=0)


def test_eval_batches_are_fixed_and_unshuffled(dataset):
    cfg = _cfg(dataset, seq_len=SAMPLE_LEN - 1, val_split="val")
    a = eval_batches(cfg, "val", 2, 3)
    b = eval_batches(cfg, "val", 2, 3)
    assert len(a) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    blocks = _blocks(dataset, "val")
    for i in range(6):  # windows in stored order, cycling when the split is small
        row = a[i // 2]["input_ids"][i % 2].numpy()
        assert (row == blocks[i % len(blocks)][:-1]).all()
    halves = [eval_batches(cfg, "val", 2, 3, dp_rank=r, dp_size=2) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][1]["labels"], halves[1][1]["labels"]]), a[1]["labels"])


def test_remote_source_is_cached_locally(dataset, tmp_path):
    cache = tmp_path / "cache"
    remote = _cfg(f"file://{dataset}", seq_len=100, cache_dir=str(cache))
    local = _cfg(dataset, seq_len=100)
    r = _global([TokenBatches(remote, "train", 8, 0, 1, seed=2)], 4)
    l = _global([TokenBatches(local, "train", 8, 0, 1, seed=2)], 4)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(r, l) for k in x)
    (cached,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (cached / "meta.json").is_file() and list((cached / "train").rglob("shard.*.mds"))
    assert Path(resolve_tokenizer(remote)).read_bytes() == (dataset / "tokenizer.model").read_bytes()
    with pytest.raises(UserError, match="cannot fetch meta.json"):
        TokenBatches(_cfg(f"file://{tmp_path}/absent", seq_len=100, cache_dir=str(cache)),
                     "train", 8, 0, 1, seed=2)


# ---- several processes, as torchrun starts them ------------------------------------------------

def _run_all(procs, timeout: float) -> None:
    """Start ``procs``, wait for each up to ``timeout`` s, and kill any still alive (a hang fails fast)."""
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _rank_main(rank, world, port, paths, cache, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    cfg = DataConfig(mixture=[DatasetSource(paths[0], 1.0), DatasetSource(paths[1], 1.0)], seq_len=100)
    it = TokenBatches(cfg, "train", 8, rank, world, seed=7, cache_dir=cache)
    batches = [next(it) for _ in range(3)]
    ev = eval_batches(_cfg(paths[1], seq_len=100), "val", 4, 2, dp_rank=rank, dp_size=world, cache_dir=cache)
    # As in the trainer: a process group already exists, and streaming synchronizes through it.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ev0 = eval_batches(_cfg(paths[0], seq_len=100), "val", 4, 1, dp_rank=rank, dp_size=world)
    finally:
        torch.distributed.destroy_process_group()
    torch.save({"train": batches, "eval": ev + ev0, "state": it.state_dict()}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_read_local_and_remote_sources(dataset, dataset2, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = [str(dataset), f"file://{dataset2}"]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, paths, str(tmp_path / "cache"), str(tmp_path)))
             for r in range(2)]
    _run_all(procs, timeout=150)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got[0]["state"] == got[1]["state"]
    # The parent reads the same data in one process (its own cache dir) as dp=1.
    cfg = DataConfig(mixture=[DatasetSource(paths[0], 1.0), DatasetSource(paths[1], 1.0)], seq_len=100)
    ref = _global([TokenBatches(cfg, "train", 8, 0, 1, seed=7, cache_dir=str(tmp_path / "c1"))], 3)
    for step in range(3):
        for k in ref[step]:
            assert torch.equal(torch.cat([g["train"][step][k] for g in got]), ref[step][k])
    ev = eval_batches(_cfg(paths[1], seq_len=100), "val", 4, 2, cache_dir=str(tmp_path / "c1"))
    ev += eval_batches(_cfg(paths[0], seq_len=100), "val", 4, 1)
    for i in range(3):
        assert torch.equal(torch.cat([g["eval"][i]["input_ids"] for g in got]), ev[i]["input_ids"])


def _open_at_once(rank, port, paths, start, out):
    """One rank of a 2-rank job that opens ``paths``' stores once every rank of both jobs is up."""
    import datetime

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from pretrain.data.store import open_dataset

    start.wait()
    try:
        for p in paths:
            for split in ("train", "val"):
                open_dataset(p).store(split)
        res = "ok"
    except Exception as e:  # reported to the test, which names it
        res = f"{type(e).__name__}: {e}"
    torch.distributed.destroy_process_group()
    Path(out, f"{port}_{rank}").write_text(res)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_jobs_on_one_node_open_datasets_at_once(dataset, dataset2, tmp_path):
    """Two distributed jobs opening their datasets at the same moment on one node both start
    (streaming's shared-memory prefix scan raced: without the node-wide registration lock one
    job failed in 2 of 3 such starts, "File exists: '/000004_locals'")."""
    import shutil

    copies = []
    for job in range(2):
        mine = [tmp_path / f"job{job}_{i}" for i in range(2)]
        for src, dst in zip((dataset, dataset2), mine):
            shutil.copytree(src, dst)
        copies.append([str(p) for p in mine])
    ctx = torch.multiprocessing.get_context("spawn")
    start, procs = ctx.Barrier(4), []
    for paths in copies:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs += [ctx.Process(target=_open_at_once, args=(r, port, paths, start, str(tmp_path))) for r in range(2)]
    _run_all(procs, timeout=180)
    results = sorted(f.read_text() for f in tmp_path.iterdir() if f.is_file())
    assert results == ["ok"] * 4, results
