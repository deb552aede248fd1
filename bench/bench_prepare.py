"""prepare throughput against the tokenizer's own batched encoder, and peak memory at 1x/10x data.

    PYTHONPATH=. .venv/bin/python bench/bench_prepare.py [--mb 2] [--workers 1]

Prints tokens/s per CPU-second (per core) of (a) the HF tokenizer's ``encode_batch`` on the corpus held in
memory (one thread), (b) ``pretrain data prepare`` end to end (read Parquet, encode, pack,
write MDS), their ratio, and prepare's peak RSS on the corpus and on 10 copies of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=2.0, help="corpus size in MiB")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pretrain.data.corpus import stdlib_corpus
    from pretrain.data.hf_tokenizer import train_hf_bpe
    from pretrain.data.tokenizer import load_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    corpus = stdlib_corpus(root / "c.jsonl", max_bytes=int(args.mb * 2**20), include_tests=True)
    docs = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    tok_path = train_hf_bpe(docs[:200], root / "tok", vocab_size=8192)
    pq.write_table(pa.table({"text": docs}), root / "c.parquet", row_group_size=256)
    tok = load_tokenizer(tok_path)
    t = time.process_time()  # CPU time: the machine may be shared, wall time would lie
    n_tok = sum(len(ids) for i in range(0, len(docs), 256) for ids in tok.encode_batch(docs[i:i + 256]))
    enc_rate = n_tok / (time.process_time() - t)
    print(f"corpus {sum(map(len, docs)) / 2**20:.1f} MiB chars, {len(docs)} docs, {n_tok} tokens")
    print(f"tokenizer encode_batch (1 thread): {enc_rate:,.0f} tokens/s")
    runs = {}
    for copies in (1, 10):
        cmd = [sys.executable, "-m", "pretrain", "data", "prepare", "--input", *[str(root / "c.parquet")] * copies,
               "--out", str(root / f"out{copies}"), "--tokenizer", str(tok_path), "--workers", str(args.workers),
               "--no-progress", "--val-fraction", "0.001"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        rss = after.ru_maxrss / 1024
        meta = json.loads((root / f"out{copies}" / "meta.json").read_text())
        tokens = sum(s["tokens"] - s["documents"] for s in meta["splits"].values())  # without EOS
        rate = tokens / cpu  # all processes' CPU seconds: tokens/s per busy core
        print(f"prepare x{copies}: {tokens} tokens, {wall:.1f}s wall, {cpu:.1f} CPU-s = {rate:,.0f} tokens/s "
              f"per core ({rate / enc_rate:.2f} of encode_batch; includes interpreter/torch start-up); "
              f"peak RSS of any prepare process so far {rss:.0f} MiB")
        runs[copies] = (tokens, cpu)
    (t1, c1), (t10, c10) = runs[1], runs[10]
    marginal = (t10 - t1) / (c10 - c1)  # start-up cancels out
    print(f"marginal (x10 - x1): {marginal:,.0f} tokens/s per core = {marginal / enc_rate:.2f} of encode_batch")


if __name__ == "__main__":
    main()
