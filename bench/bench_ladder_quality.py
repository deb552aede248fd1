"""Does ladder residual cost quality? ``standard`` vs ``ladder`` vs ``parallel`` trained on
the same tokenized data, same steps, same seed; prints final held-out loss side by side
(not CI).

    .venv/bin/python bench/bench_ladder_quality.py --steps 600 [--out runs/ladder_quality]

The data is the Python standard library's source (pretrain.data: corpus -> sentencepiece
tokenizer -> MDS shards, built once under --out and reused). Each mode trains with
``pretrain.train`` in this process (one CPU thread by default). A single seed at this scale
separates only large differences; the paper's comparison is 1B-3B models on ~105B tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("standard", "ladder", "parallel")


def build_data(out: Path, vocab: int, seq: int, corpus_mb: float) -> Path:
    from pretrain.data.corpus import stdlib_corpus
    from pretrain.data.prepare import prepare
    from pretrain.data.tokenizer import train_tokenizer

    data = out / "data"
    if (data / "meta.json").exists():
        return data
    out.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(out / "corpus.jsonl", max_bytes=int(corpus_mb * 2**20))
    tok = train_tokenizer([str(corpus)], out / "tok", vocab_size=vocab)
    prepare([str(corpus)], data, tokenizer=tok, sample_len=4 * (seq + 1), val_fraction=0.02,
            workers=1, progress=False)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="runs/ladder_quality")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4, help="blocks (attention + MLP each)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--corpus-mb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from pretrain.config import load_config
    from pretrain.train import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = build_data(out, args.vocab, args.seq, args.corpus_mb)
    results = {}
    for mode in MODES:
        run_dir = out / f"{mode}_{args.steps}"
        ov = {"model.vocab_size": args.vocab, "model.d_model": args.d_model, "model.n_layers": args.layers,
              "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": args.seq,
              "model.residual": mode, "data.path": data, "data.seq_len": args.seq,
              "train.steps": args.steps, "train.global_batch": args.batch, "train.seed": args.seed,
              "train.eval_batches": args.eval_batches, "train.eval_every": 0,
              "optim.lr": args.lr, "optim.warmup_steps": max(args.steps // 20, 1), "optim.schedule": "cosine",
              "optim.min_lr_ratio": 0.1, "optim.weight_decay": 0.1,
              "checkpoint.every": 0, "logging.run_dir": run_dir, "logging.progress": "off"}
        cfg = load_config("tiny", [f"--{k}={v}" for k, v in ov.items()])
        t0 = time.time()
        summary = train(cfg)
        results[mode] = {"val_loss": summary["val_loss"], "train_loss": summary["final_train_loss"],
                         "minutes": (time.time() - t0) / 60}
        print(f"{mode}: held-out {summary['val_loss']:.4f} ({results[mode]['minutes']:.1f} min)", flush=True)
    (out / f"results_{args.steps}.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.steps} steps x {args.batch} x {args.seq} tokens, d_model={args.d_model}, "
          f"{args.layers} blocks, seed {args.seed} (one seed: small differences are noise)")
    print(f"{'mode':10s} {'held-out loss':>13s} {'ppl':>8s} {'vs standard':>12s} {'final train':>12s}")
    base = results["standard"]["val_loss"]
    for mode, r in results.items():
        print(f"{mode:10s} {r['val_loss']:13.4f} {math.exp(r['val_loss']):8.2f} {r['val_loss'] - base:+12.4f} "
              f"{r['train_loss']:12.4f}")


if __name__ == "__main__":
    main()
