"""MQAR recall of a model: the fraction of queries whose argmax prediction is the value paired
with the queried key (``pretrain eval --task mqar``; the scale-test's ``mqar_recall`` column).

The sequences come from ``pretrain/data/mqar.py`` (held-out stream ``val``, seeded); every
row has exactly ``pairs`` queries, so recall is correct queries / (samples x pairs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.data.mqar import IGNORE_INDEX, check_mqar, mqar_batch, vocab_split
from pretrain.errors import UserError


@torch.no_grad()
def recall_counts(model, batch: dict) -> tuple[int, int]:
    """(correct, queries) of one batch: argmax of ``model(input_ids)`` at the labelled positions."""
    logits = model(batch["input_ids"])
    mask = batch["labels"] != IGNORE_INDEX
    pred = logits.argmax(-1)
    return int((pred[mask] == batch["labels"][mask]).sum()), int(mask.sum())


def mqar_recall(model, vocab_size: int, seq_len: int, pairs: int, samples: int, seed: int = 0,
                batch_size: int = 32, placement: str = "power", power_a: float = 0.01,
                max_seq_len: int | None = None) -> dict:
    """Recall of ``model`` on ``samples`` generated sequences; a dict with ``recall`` and its inputs."""
    check_mqar(vocab_size, seq_len, pairs, where="mqar pairs")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise UserError(f"mqar seq_len: {seq_len} exceeds the model's max_seq_len={max_seq_len}")
    if samples < 1 or batch_size < 1:
        raise UserError(f"mqar samples: {samples} samples in batches of {batch_size}; both must be >= 1")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    correct = total = 0
    for start in range(0, samples, batch_size):
        batch = mqar_batch(vocab_size, seq_len, pairs, seed, start, min(batch_size, samples - start),
                           "val", placement, power_a)
        c, n = recall_counts(model, batch)
        correct, total = correct + c, total + n
    if was_training:
        model.train()
    n_values = len(vocab_split(vocab_size)[1])
    return {"task": "mqar", "recall": correct / total, "correct": correct, "queries": total,
            "pairs": pairs, "seq_len": seq_len, "samples": samples, "seed": seed, "placement": placement,
            "vocab_size": vocab_size, "chance": 1.0 / n_values}


def checkpoint_recall(checkpoint: str, pairs: int | None = None, seq_len: int | None = None,
                      samples: int = 256, seed: int = 0, batch_size: int = 32) -> tuple[dict, Path]:
    """Recall of a checkpoint (step_N or run directory); defaults from its ``data.mqar``/``data.seq_len``."""
    from pretrain.evaluate import load_for_inference

    cfg, model, path = load_for_inference(checkpoint)
    mq = cfg.data.mqar
    result = mqar_recall(model, cfg.model.vocab_size, seq_len or cfg.data.seq_len, pairs or mq.pairs,
                         samples, seed, batch_size, mq.placement, mq.power_a, cfg.model.max_seq_len)
    result["checkpoint"] = str(path)
    return result, path


def eval_mqar_main(args) -> int:
    """``pretrain eval --task mqar``: print (and write) the recall JSON."""
    result, path = checkpoint_recall(args.checkpoint, args.mqar_pairs, args.mqar_seq_len,
                                     args.mqar_samples, args.seed, args.batch_size)
    out = Path(args.out) if args.out else path / "eval_mqar.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0
