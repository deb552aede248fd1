"""MQAR: the generator's layout and determinism, recall of an oracle and a random model, training
on MQAR through ``pretrain train``, ``pretrain eval --task mqar`` and the scale-test column."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from pretrain import cli
from pretrain.data.mqar import MqarBatches, check_mqar, mqar_batch, vocab_split
from pretrain.errors import UserError
from pretrain.mqar_eval import mqar_recall


def _pairs_of(row: torch.Tensor, n: int) -> dict[int, int]:
    return {int(row[2 * i]): int(row[2 * i + 1]) for i in range(n)}


@pytest.mark.parametrize("placement", ["power", "uniform"])
def test_every_query_is_labelled_with_its_pairs_value(placement):
    V, L, n = 64, 48, 6
    b = mqar_batch(V, L, n, seed=3, start=0, n=40, placement=placement)
    x, y = b["input_ids"], b["labels"]
    assert x.shape == y.shape == (40, L) and x.dtype == y.dtype == torch.int64
    keys, values = vocab_split(V)
    for row, lab in zip(x, y):
        kv = _pairs_of(row, n)
        assert len(kv) == n and all(k in keys for k in kv) and all(v in values for v in kv.values())
        assert len(set(kv.values())) == n  # distinct values
        where = (lab != -100).nonzero().flatten().tolist()
        assert len(where) == n and all(p >= 2 * n and (p - 2 * n) % 2 == 0 for p in where)
        assert sorted(int(row[p]) for p in where) == sorted(kv)  # each key queried once
        for p in where:
            assert int(lab[p]) == kv[int(row[p])]
        assert (lab[: 2 * n] == -100).all() and int((lab == -100).sum()) == L - n
        assert 0 <= int(row.min()) and int(row.max()) < V


def test_power_law_puts_queries_nearer_than_uniform():
    def mean_offset(placement):
        y = mqar_batch(256, 256, 8, seed=0, start=0, n=64, placement=placement)["labels"]
        return float((y != -100).nonzero()[:, 1].float().mean())

    power, uniform = mean_offset("power"), mean_offset("uniform")
    print(f"mean query position: power {power:.1f}, uniform {uniform:.1f}")
    assert power < 0.8 * uniform


def test_seeded_resumable_and_layout_independent():
    a = mqar_batch(128, 64, 8, seed=1, start=5, n=4)
    b = mqar_batch(128, 64, 8, seed=1, start=5, n=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], mqar_batch(128, 64, 8, seed=2, start=5, n=4)["input_ids"])
    assert not torch.equal(a["input_ids"], mqar_batch(128, 64, 8, seed=1, start=5, n=4,
                                                      split="train")["input_ids"])
    one = MqarBatches(128, 64, 8, "train", 8, 0, 1, seed=7)
    halves = [MqarBatches(128, 64, 8, "train", 8, r, 2, seed=7) for r in range(2)]
    for _ in range(2):
        full, parts = next(one), [next(h) for h in halves]
        assert torch.equal(full["input_ids"], torch.cat([p["input_ids"] for p in parts]))
    resumed = MqarBatches(128, 64, 8, "train", 8, 0, 1, seed=7)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(next(resumed)["labels"], next(one)["labels"])
    with pytest.raises(UserError, match="other MQAR data"):
        MqarBatches(128, 64, 4, "train", 8, 0, 1, seed=7).load_state_dict(one.state_dict())


@pytest.mark.parametrize("vocab,seq,pairs,needle", [
    (16, 64, 8, "vocabulary of at least 18 tokens"),
    (512, 31, 8, "at least 32 tokens"),
    (512, 64, 0, "at least 1"),
])
def test_bad_sizes_are_one_line(vocab, seq, pairs, needle):
    with pytest.raises(UserError, match=needle) as e:
        check_mqar(vocab, seq, pairs)
    assert "\n" not in str(e.value)


class Oracle(torch.nn.Module):
    """Recall by lookup: at each position, the token that followed the first earlier occurrence of
    the current token (the pairs come first, so that is the paired value)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        out = torch.zeros(B, T, self.vocab)
        for b in range(B):
            first: dict[int, int] = {}
            for t in range(T):
                tok = int(ids[b, t])
                if tok in first and first[tok] + 1 < T:
                    out[b, t, int(ids[b, first[tok] + 1])] = 1.0
                first.setdefault(tok, t)
        return out


def test_recall_of_an_oracle_is_one_and_of_a_random_model_near_zero(one_thread):
    r = mqar_recall(Oracle(128), 128, 64, 8, samples=64)
    assert r["recall"] == 1.0 and r["queries"] == 64 * 8
    from models.transformer import build_model
    from pretrain.config import load_config

    cfg = load_config("tiny", ["--data.seq_len=64"])
    rand = mqar_recall(build_model(cfg.model, seed=0), 512, 64, 8, samples=128)
    print(f"random model recall {rand['recall']:.4f} (chance {rand['chance']:.4f})")
    assert rand["queries"] == 128 * 8 and rand["recall"] <= 3 * rand["chance"]


def _train_mqar(run, steps, **extra):
    from pretrain.config import load_config
    from pretrain.train import train

    ov = {"data.task": "mqar", "model.vocab_size": 32, "data.seq_len": 16, "data.mqar.pairs": 4,
          "train.steps": steps, "train.global_batch": 32, "train.eval_batches": 1, "optim.lr": 1e-2,
          "optim.warmup_steps": 5, "checkpoint.every": 0, "logging.run_dir": str(run),
          "logging.progress": "off", **extra}
    return train(load_config("tiny", [f"--{k}={v}" for k, v in ov.items()]))


@pytest.mark.timeout(240)
def test_training_on_mqar_raises_recall_and_eval_cli(tmp_path, capsys, one_thread):
    summary = _train_mqar(tmp_path / "run", 40)
    assert summary["steps"] == 40 and summary["val_loss"] is not None
    assert cli.main(["eval", "--task", "mqar", "--checkpoint", str(tmp_path / "run"),
                     "--mqar-samples", "64"]) == 0
    r = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print(f"recall after 40 steps: {r['recall']:.3f} (chance {r['chance']:.4f}, 1/pairs 0.25)")
    assert r["queries"] == 64 * 4 and r["chance"] == 1 / 16
    assert r["recall"] > 2 * r["chance"]  # it reads the context, not just the value vocabulary
    # the same checkpoint's held-out loss (on generated sequences) through the lm task
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 8 * 4
    # bad requests: one line, exit 2
    for args, needle in ((["--mqar-pairs", "5"], "at least 20 tokens"),
                         (["--mqar-pairs", "4", "--mqar-seq-len", "128"], "exceeds the model's max_seq_len"),
                         (["--mqar-pairs", "20", "--mqar-seq-len", "64"], "vocabulary of at least 42")):
        assert cli.main(["eval", "--task", "mqar", "--checkpoint", str(tmp_path / "run"), *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and needle in err[0], err


def test_train_refuses_pairs_that_do_not_fit(tmp_path, capsys):
    assert cli.main(["train", "tiny", "--data.task=mqar", "--data.mqar.pairs=9",
                     f"--logging.run_dir={tmp_path / 'r'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "data.mqar.pairs" in err[0] and "at least 36 tokens" in err[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(240)
def test_scale_test_reports_mqar_recall(tmp_path, capsys, one_thread):
    sweep = {"base": "tiny", "out": str(tmp_path / "sweep"), "eval_tasks": ["mqar"],
             "mqar": {"samples": 16, "pairs": 2},
             "overrides": {"data.task": "mqar", "train.steps": 3, "train.eval_batches": 1,
                           "checkpoint.every": 0, "logging.progress": "off", "optim.warmup_steps": 1},
             "axes": {"arch": {"dense": {}, "ladder": {"model.residual": "ladder"}}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert cli.main(["scale-test", str(path), "--in-process"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "report" / "table.csv")))
    assert [r["point"] for r in rows] == ["dense", "ladder"]
    for r in rows:
        measured = json.loads((tmp_path / "sweep" / "runs" / r["point"] / "eval_mqar.json").read_text())
        assert measured["pairs"] == 2 and measured["queries"] == 16 * 2
        assert float(r["mqar_recall"]) == measured["recall"]
    assert "mqar_recall" in (tmp_path / "sweep" / "report" / "table.md").read_text().splitlines()[0]
    path.write_text(yaml.safe_dump({**sweep, "mqar": {"pairs": 0}}))
    assert cli.main(["scale-test", str(path)]) == 2
    assert "mqar.pairs: 0 is not allowed" in capsys.readouterr().err
