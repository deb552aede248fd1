"""Corpus formats (Parquet, zstd, gzip, datasets directories), their errors, and prepare spread
over parts (local processes, SLURM array script) merged into the one-process dataset."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from pretrain.data.cli import main as data_main
from pretrain.data.corpus import stdlib_corpus
from pretrain.data.hf_tokenizer import train_hf_bpe
from pretrain.data.prepare import prepare

SAMPLE_LEN = 64


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = stdlib_corpus(tmp_path_factory.mktemp("fc") / "c.jsonl", max_bytes=120_000)
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def hftok(docs, tmp_path_factory):
    return train_hf_bpe(docs, tmp_path_factory.mktemp("hftok"), vocab_size=400)


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _blocks(out, split="train"):
    from streaming import StreamingDataset

    sd = StreamingDataset(local=str(out), split=split, shuffle=False)
    return [sd[i]["tokens"] for i in range(sd.num_samples)]


def _prep(inputs, out, tok, **kw):
    kw = {"sample_len": SAMPLE_LEN, "val_fraction": 0.0, "workers": 1, "progress": False, **kw}
    prepare([str(i) for i in inputs], out, tok, **kw)
    return np.concatenate(_blocks(out))


@pytest.mark.timeout(300)
def test_every_format_gives_the_jsonl_tokens(docs, hftok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    ref = _prep([_jsonl(tmp_path / "ref.jsonl", docs)], tmp_path / "ref", hftok)
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), tmp_path / "a.parquet",
                   row_group_size=4)  # several row groups: units of their own
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "ref.jsonl").read_bytes()))
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "hfds"), max_shard_size="40KB")
    assert len(list((tmp_path / "hfds").glob("*.arrow"))) > 1
    for name, inputs, field in [("parquet", [tmp_path / "a.parquet"], "content"),
                                ("zst", [zst], "text"), ("hfds", [tmp_path / "hfds"], "content")]:
        got = _prep(inputs, tmp_path / name, hftok, text_field=field, workers=2 if name == "zst" else 1)
        assert np.array_equal(got, ref), name
    # a directory mixing plain, .gz and .zst text files (one document each, in name order)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "0.txt").write_text(docs[0])
    with gzip.open(mixed / "1.txt.gz", "wt") as f:
        f.write(docs[1])
    (mixed / "2.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[2].encode()))
    ref3 = _prep([_jsonl(tmp_path / "ref3.jsonl", docs[:3])], tmp_path / "ref3", hftok)
    assert np.array_equal(_prep([mixed], tmp_path / "mixed_out", hftok), ref3)


def test_bad_inputs_give_one_error_line(docs, hftok, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "junk.jsonl.zst").write_bytes(b"\x00not zstd")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    cases = [("nocol.parquet", "nocol.parquet: no column 'text' (columns: body)"),
             ("ints.parquet", "ints.parquet: column 'text' has type int64, not string"),
             ("junk.parquet", "junk.parquet: not a readable Parquet file"),
             ("junk.jsonl.zst", "junk.jsonl.zst: cannot read"),
             ("dd", "a datasets DatasetDict; pass one split's directory")]
    for name, needle in cases:
        rc = data_main(["prepare", "--input", str(tmp_path / name), "--out", str(tmp_path / "o"),
                        "--tokenizer", str(hftok), "--workers", "1", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (name, err)
        assert not (tmp_path / "o" / "meta.json").exists()


def _part_files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("shard.*.mds"))


@pytest.mark.timeout(600)
def test_sharded_prepare_merges_to_the_one_process_dataset(docs, hftok, tmp_path):
    srcs = [_jsonl(tmp_path / f"in{i}.jsonl", docs[i::4]) for i in range(4)]  # 4 groups of one file
    common = dict(text_field="text", sample_len=SAMPLE_LEN, val_fraction=0.2, progress=False,
                  group_bytes=1, shard_bytes=1 << 12)
    ref = tmp_path / "one"
    prepare([str(s) for s in srcs], ref, hftok, workers=1, **common)
    out = tmp_path / "sharded"
    # part 1 of 3 alone, as one task of a cluster array would do, plus a crashed part 2's debris
    prepare([str(s) for s in srcs], out, hftok, workers=1, part=(1, 3), **common)
    (out / "train" / "part-00002-of-00003").mkdir(parents=True)
    (out / "train" / "part-00002-of-00003" / "shard.00007.mds").write_bytes(b"partial")
    before = (out / "parts" / "part-00001-of-00003.json").stat().st_mtime_ns
    assert data_main(["merge", "--out", str(out)]) == 2  # parts 0 and 2 missing
    args = ["prepare", "--input", *map(str, srcs), "--out", str(out), "--tokenizer", str(hftok),
            "--sample-len", str(SAMPLE_LEN), "--val-fraction", "0.2", "--workers", "1",
            "--group-bytes", "1", "--runner", "local", "--shards", "3"]
    p = subprocess.run([sys.executable, "-m", "pretrain", "data", *args], capture_output=True, text=True,
                       timeout=400, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "parts" / "part-00001-of-00003.json").stat().st_mtime_ns == before  # skipped
    assert "shard.00007.mds" not in " ".join(_part_files(out))  # debris replaced, no duplicates
    for split in ("train", "val"):
        a, b = _blocks(ref, split), _blocks(out, split)
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b)), split
    m1, m2 = (json.loads((d / "meta.json").read_text()) for d in (ref, out))
    assert m1["splits"] == m2["splits"] and m1["unigram_entropy"] == m2["unigram_entropy"]
    assert m2["parts"] == 3 and m2["tokenizer_files"] == ["special_tokens_map.json", "tokenizer.json",
                                                          "tokenizer_config.json"]


def test_slurm_array_script(docs, hftok, tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", docs[:6])
    out = tmp_path / "d s"  # a space: everything in the script must be quoted
    base = ["prepare", "--input", str(src), "--out", str(out), "--tokenizer", str(hftok), "--workers", "4",
            "--runner", "slurm", "--shards", "4", "--partition", "cpu", "--time", "02:00:00", "--dry-run"]
    prepare([str(src)], out, hftok, part=(2, 4), workers=1, progress=False, group_bytes=1)
    assert data_main(base + ["--group-bytes", "1"]) == 0
    assert "3 of 4 parts" in capsys.readouterr().out
    array = (out / "slurm" / "prepare-array.sbatch").read_text()
    assert "#SBATCH --array=0,1,3\n" in array and '#SBATCH --partition="cpu"' in array
    assert "#SBATCH --cpus-per-task=4" in array and f"'{out}'" in array
    assert '--shard "$SLURM_ARRAY_TASK_ID"/4' in array
    merge = (out / "slurm" / "prepare-merge.sbatch").read_text()
    assert f"data merge --out '{out}'" in merge
    assert data_main(base[:-3] + ["--shard", "0/4"]) == 2  # --runner with --shard
