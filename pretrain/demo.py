"""``pretrain demo``: the whole pipeline on an embedded default, no arguments needed.

Builds a corpus from the Python standard library's own source files, trains a
sentencepiece tokenizer, writes MDS shards, trains a small model with a live
progress bar, checkpoints, evaluates held-out loss and prints where it all went.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pretrain demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.yaml)")
    ap.add_argument("--corpus-mb", type=float, default=8.0, help="stdlib source to use, in MB")
    ap.add_argument("--fresh", action="store_true", help="delete a previous demo output first")
    args = ap.parse_args(argv or [])
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    from pretrain.config import load_config
    from pretrain.data.corpus import stdlib_corpus
    from pretrain.data.prepare import prepare
    from pretrain.data.tokenizer import train_tokenizer
    from pretrain.train import train

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    run_dir = out / "train"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from scratch; data is reused
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    overrides = [f"--logging.run_dir={run_dir}", f"--data.path={out / 'data'}"]
    if args.steps:
        overrides.append(f"--train.steps={args.steps}")
    cfg = load_config("demo", overrides)

    corpus = out / "corpus.jsonl"
    if not corpus.exists():
        print(f"[1/4] corpus: Python standard library sources -> {corpus}")
        stdlib_corpus(corpus, max_bytes=int(args.corpus_mb * 2**20))
    tok_model = out / "tokenizer.model"
    if not tok_model.exists():
        print(f"[2/4] tokenizer: sentencepiece BPE, vocab {cfg.model.vocab_size} -> {tok_model}")
        train_tokenizer([str(corpus)], str(out / "tokenizer"), vocab_size=cfg.model.vocab_size)
    data_dir = out / "data"
    if not (data_dir / "meta.json").exists():
        print(f"[3/4] shards: tokenizing into MDS -> {data_dir}")
        prepare([str(corpus)], str(data_dir), tokenizer=str(tok_model), sample_len=4 * (cfg.data.seq_len + 1))
    meta = json.loads((data_dir / "meta.json").read_text())
    print(f"[4/4] training {cfg.train.steps} steps on CPU -> {run_dir}")
    summary = train(cfg)

    entropy = meta.get("unigram_entropy")
    val = summary["val_loss"]
    minutes = (time.time() - t_start) / 60
    print()
    print("demo finished in %.1f min" % minutes)
    print(f"  corpus            {corpus}")
    print(f"  tokenizer         {tok_model}")
    print(f"  MDS shards        {data_dir}  (train/ and val/)")
    print(f"  run directory     {run_dir}")
    print(f"  metrics           {run_dir / 'metrics.jsonl'}")
    print(f"  checkpoint        {summary['checkpoint']}")
    print(f"  held-out loss     {val:.4f} nats/token (perplexity {math.exp(val):.1f})")
    if entropy:
        print(f"  unigram entropy   {entropy:.4f} nats/token  (loss is {entropy - val:.2f} nats below it)")
    print()
    print("next:")
    print(f"  pretrain eval --checkpoint {run_dir}")
    print(f"  pretrain generate --checkpoint {run_dir} --prompt 'def '")
    print(f"  pretrain export --checkpoint {run_dir} --out {out / 'hf'}")
    (out / "demo_summary.json").write_text(json.dumps({**summary, "unigram_entropy": entropy,
                                                       "minutes": minutes}, indent=1))
    return 0
