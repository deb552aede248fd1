"""Megatron-LM indexed datasets (.bin/.idx written by megatron-core's builder) as a data source."""

import json

import numpy as np
import pytest

from conftest import tiny_overrides
from pretrain.config import DataConfig, DatasetSource, load_config
from pretrain.data.loader import TokenBatches
from pretrain.data.store import open_dataset
from pretrain.errors import UserError
from pretrain.metrics import read_metrics


@pytest.fixture(scope="module")
def megatron_data(tiny_dataset, tmp_path_factory):
    from megatron_data import write_megatron_dataset

    return write_megatron_dataset(tiny_dataset.parent / "corpus.jsonl", tiny_dataset / "tokenizer.model",
                                  tmp_path_factory.mktemp("megatron"))


def test_reads_documents_in_order_with_splits(megatron_data, tiny_dataset):
    import sentencepiece as spm

    ds = open_dataset(str(megatron_data) + ".bin")  # the prefix, or either file, names it
    meta = ds.meta
    assert meta["format"] == "megatron" and meta["vocab_size"] == 512 and meta["eos_id"] == 2
    docs = [json.loads(l)["text"] for l in (tiny_dataset.parent / "corpus.jsonl").read_text().splitlines()]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dataset / "tokenizer.model"))
    ids = [sp.encode(d) + [sp.eos_id()] for d in docs]
    n_val = max(round(len(docs) * 0.01), 1)
    assert meta["splits"]["val"]["documents"] == n_val
    assert meta["splits"]["train"]["tokens"] == sum(map(len, ids[:-n_val]))
    assert meta["splits"]["val"]["tokens"] == sum(map(len, ids[-n_val:]))
    stream = np.concatenate(ids[:-n_val])
    block = ds.store("train")[0]["tokens"]
    # a window that spans a document boundary reads across the two sequences
    a = len(ids[0]) - 5
    assert np.array_equal(block[a:a + 40], stream[a:a + 40])
    # the padded tail of the split's last block reads as padding
    end = meta["splits"]["train"]["tokens"]
    assert list(block[end - 2:end + 3])[2:] == [meta["pad_id"]] * 3


def test_loader_batches_and_mixture_with_mds(megatron_data, tiny_dataset):
    cfg = DataConfig(path=str(megatron_data), seq_len=32, shuffle=False)
    tb = TokenBatches(cfg, "train", 8, 0, 1, seed=0)
    b = next(tb)
    first = open_dataset(str(megatron_data)).store("train")[0]["tokens"][0:33]
    assert b["input_ids"][0].tolist() == first[:32].tolist() and b["labels"][0].tolist() == first[1:].tolist()
    mix = DataConfig(mixture=[DatasetSource(str(megatron_data), 0.5), DatasetSource(str(tiny_dataset), 0.5)],
                     seq_len=32)
    mb = TokenBatches(mix, "train", 8, 0, 1, seed=0)
    assert next(mb)["input_ids"].shape == (8, 32)
    assert [s["path"] for s in mb.meta["sources"]] == [str(megatron_data), str(tiny_dataset)]


def test_train_from_megatron_dataset(megatron_data, tmp_path):
    from pretrain.train import train

    run = tmp_path / "run"
    summary = train(load_config("tiny", tiny_overrides(megatron_data, run, **{"train.steps": 8})))
    recs = read_metrics(run)
    assert len(recs) == 8 and recs[-1]["loss"] < recs[0]["loss"]
    assert summary["val_loss"] is not None
    assert (run / "checkpoints" / "step_8" / "tokenizer.model").is_file()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # megatron's __del__
def test_megatron_errors(megatron_data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for ext in (".bin", ".idx"):
        (bare / f"c{ext}").write_bytes((megatron_data.parent / f"{megatron_data.name}{ext}").read_bytes())
    with pytest.raises(UserError, match="tokenizer.model"):
        open_dataset(str(bare / "c"))
    (bare / "tokenizer.model").write_bytes((megatron_data.parent / "tokenizer.model").read_bytes())
    (bare / "c.idx").write_bytes(b"not an index")
    with pytest.raises(UserError, match="not a readable Megatron indexed dataset"):
        open_dataset(str(bare / "c"))
    with pytest.raises(UserError, match="splits train, val"):
        open_dataset(str(megatron_data)).store("test")
