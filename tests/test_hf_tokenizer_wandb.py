"""A Hugging Face tokenizer.json through prepare -> train -> generate -> export -> AutoTokenizer,
with the run tracked in Weights & Biases (offline) and resumed into the same W&B run."""

import contextlib
import io
import json
import struct
import time

import pytest

from conftest import tiny_overrides
from pretrain.config import load_config
from pretrain.data.corpus import stdlib_corpus
from pretrain.data.hf_tokenizer import train_hf_bpe
from pretrain.data.prepare import prepare
from pretrain.data.tokenizer import load_tokenizer
from pretrain.metrics import read_metrics
from pretrain.train import train

AWKWARD = ["  two leading spaces\tand a tab", "def f(x):\n    return x + 1\n\n\n", "émoji 🤖 ünïcödé 中文",
           "literal </s> and <s> inside text", "\r\nwindows\r\nnewlines\r\n", "zero\u200bwidth", " ", "\n"]


def read_wandb_file(path):
    """Records of a W&B run file (LevelDB-style log of wandb's own protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, recs = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # zero padding to the end of a block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            recs.append(rec)
            buf = b""
    return recs


def wandb_history(run_dir):
    runs, steps = set(), {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in read_wandb_file(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                runs.add((rec.run.run_id, rec.run.project, tuple(rec.run.tags)))
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = items.get("_step", rec.history.step.num)
                steps[step] = {**steps.get(step, {}), **items}
    return runs, steps


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfdata")
    corpus = stdlib_corpus(root / "c.jsonl", max_bytes=200_000)
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    tok = train_hf_bpe(docs, root / "tok", vocab_size=512)
    prepare([str(corpus)], root / "data", tok.parent, sample_len=132, val_fraction=0.05, workers=1,
            progress=False)
    return root / "data"


def test_hf_tokenizer_round_trips_with_config_specials(hf_data):
    tok = load_tokenizer(hf_data)  # the dataset's copy: tokenizer.json + tokenizer_config.json
    assert tok.kind == "hf" and (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)
    meta = json.loads((hf_data / "meta.json").read_text())
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["vocab_size"]) == (1, 2, 3, 512)
    for text in AWKWARD:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.eos_id not in ids
    assert tok.encode_batch(AWKWARD) == [tok.encode(t) for t in AWKWARD]


@pytest.mark.timeout(600)
def test_train_resume_wandb_generate_export_autotokenizer(hf_data, tmp_path):
    from transformers import AutoTokenizer

    from pretrain.evaluate import generate_main
    from pretrain.hf.export import export_checkpoint

    run = tmp_path / "run"
    ov = {"logging.wandb": "true", "logging.wandb_mode": "offline", "logging.wandb_project": "proj",
          "logging.wandb_tags": "[hf, test]", "checkpoint.every": 2}
    train(load_config("tiny", tiny_overrides(hf_data, run, **{"train.steps": 3, **ov})))
    # W&B names an offline run's folder by its start second and run id: a resume that starts
    # in the same second as the first run would write into the first run's folder
    time.sleep(1.1)
    train(load_config("tiny", tiny_overrides(hf_data, run, **{"train.steps": 5, "checkpoint.resume": "auto",
                                                               **ov})))
    runs, steps = wandb_history(run)
    assert len({r[0] for r in runs}) == 1 and runs.pop()[1:] == ("proj", ("hf", "test"))
    for rec in read_metrics(run):  # every metrics.jsonl record is in W&B (the resumed run's wins)
        assert steps[rec["step"]]["loss"] == pytest.approx(rec["loss"], rel=1e-6)
    assert sorted(steps) == [1, 2, 3, 4, 5]

    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert generate_main(["--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "8",
                              "--greedy"]) == 0
    assert buf.getvalue().startswith("def ")

    out = tmp_path / "hf"
    summary = export_checkpoint(str(run), str(out))
    assert "tokenizer.json" in summary["files"]
    hf = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(hf_data)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    for text in AWKWARD:
        ids = hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == ours.encode(text) and hf.decode(ids) == text
