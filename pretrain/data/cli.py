"""``pretrain data``: build a corpus, train a tokenizer, prepare MDS shards (on one machine or
spread over a cluster), merge prepared parts."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pretrain.cliargs import Parser, integer, name, number, path
from pretrain.errors import EXIT_USER_ERROR, UserError

DEFAULT_GROUP_BYTES = 256 << 20  # = pretrain.data.prepare.DEFAULT_GROUP_BYTES (not imported: --help stays fast)


def _parser() -> argparse.ArgumentParser:
    from pretrain.data.tokenizer import MIN_VOCAB

    p = Parser(prog="pretrain data", description=__doc__.strip())
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{corpus,tokenizer,prepare,merge}")

    c = sub.add_parser("corpus", help="write the Python stdlib sources as a JSONL corpus",
                       description="Write the Python standard library's .py files as JSONL "
                                   "({\"text\": ...} per file), sorted, up to --max-bytes.")
    c.add_argument("--out", required=True, type=path(), help="output .jsonl file")
    c.add_argument("--max-bytes", type=integer(ge=1), default=8 * 1024 * 1024, help="size cap (default 8 MiB)")
    c.add_argument("--include-tests", action="store_true", help="also take the stdlib's test packages")

    t = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer",
                       description="Train a byte-fallback BPE sentencepiece model "
                                   "(pad=0 bos=1 eos=2 unk=3) that round-trips whitespace.")
    t.add_argument("--input", nargs="+", required=True, type=path(), help="text/JSONL files, globs or directories")
    t.add_argument("--out", required=True, type=path(), help="output prefix (writes PREFIX.model)")
    t.add_argument("--vocab-size", type=integer(ge=MIN_VOCAB), default=4096)
    t.add_argument("--text-field", default="text", type=name(), help="JSONL field holding the text")
    t.add_argument("--max-bytes", type=integer(ge=1), default=32 * 1024 * 1024, help="train on at most this much text")

    r = sub.add_parser("prepare", help="tokenize documents into MDS shards (train/ and val/)",
                       description="Tokenize documents (EOS after each) into fixed blocks of "
                                   "--sample-len tokens stored as mosaicml-streaming MDS shards, "
                                   "with meta.json and a copy of the tokenizer.")
    r.add_argument("--input", nargs="+", required=True, type=path(),
                   help="files, globs or directories: text, JSONL (.jsonl, .jsonl.gz, .jsonl.zst, .json.gz), "
                        ".gz/.zst text, Parquet, Arrow, or a directory written by datasets' save_to_disk")
    r.add_argument("--out", required=True, type=path(), help="output dataset directory")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", type=path(exists=True),
                   help="sentencepiece .model, HF tokenizer.json, or a directory holding one")
    g.add_argument("--vocab-size", type=integer(ge=MIN_VOCAB), help="train a tokenizer of this size on the inputs first")
    r.add_argument("--text-field", default="text", type=name(),
                   help="JSONL field or Parquet/Arrow column holding the text")
    r.add_argument("--sample-len", type=integer(ge=2), default=2049, help="tokens per stored block")
    r.add_argument("--val-fraction", type=number(ge=0, lt=1, note="0: none held out"), default=0.01,
                   help="documents held out (at least one)")
    r.add_argument("--workers", type=integer(ge=1), default=2, help="tokenizer processes")
    r.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--group-bytes", type=integer(ge=1), default=DEFAULT_GROUP_BYTES,
                   help="input bytes per packing group (whole files or Parquet row groups; default 256 MiB)")
    c = r.add_argument_group("spreading over a cluster")
    c.add_argument("--shard", metavar="I/N", type=name(), help="tokenize only the I-th of N parts (0-based) into its own "
                                                  "sub-directories; `pretrain data merge` joins them")
    c.add_argument("--shards", type=integer(ge=0), default=0, metavar="N", help="with --runner: run all N parts")
    c.add_argument("--runner", choices=("local", "slurm"),
                   help="local: N concurrent processes, then merge; slurm: a job array of the unfinished "
                        "parts and a merge job after it")
    for key in ("partition", "account", "time", "mem"):
        c.add_argument(f"--{key}", type=name(), help=f"SLURM --{key}")
    c.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--qos=low (repeatable)")
    c.add_argument("--dry-run", action="store_true", help="slurm: write the scripts, submit nothing")

    m = sub.add_parser("merge", help="join the parts of a prepare spread over a cluster",
                       description="Merge every part written by `prepare --shard I/N` in --out into one "
                                   "dataset (mosaicml-streaming merge_index); refuses while parts are missing.")
    m.add_argument("--out", required=True, type=path(), help="the dataset directory the parts were written to")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``pretrain data ...``; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _run(args) -> int:
    t0 = time.perf_counter()
    if getattr(args, "sbatch", None):  # checked before any work, like launch slurm's
        from pretrain.cliargs import sbatch_extra

        for extra in args.sbatch:
            sbatch_extra(extra)
    if args.cmd == "corpus":
        from pretrain.data.corpus import stdlib_corpus

        out = stdlib_corpus(args.out, args.max_bytes, include_tests=args.include_tests)
        n = sum(1 for _ in open(out, encoding="utf-8"))
        print(f"wrote {out}: {n} documents, {out.stat().st_size} bytes")
    elif args.cmd == "tokenizer":
        from pretrain.data.tokenizer import Tokenizer, train_tokenizer

        path = train_tokenizer(args.input, args.out, args.vocab_size, text_field=args.text_field,
                               max_bytes=args.max_bytes)
        print(f"wrote {path} (vocab {Tokenizer(path).vocab_size}) in {time.perf_counter() - t0:.1f}s")
    elif args.cmd == "merge":
        from pretrain.data.parts import merge_parts
        from pretrain.data.prepare import describe

        print(describe(merge_parts(args.out)))
        print(f"merged {args.out} in {time.perf_counter() - t0:.1f}s")
    elif args.runner or args.shards:
        _run_parts(args)
    else:
        from pretrain.data.prepare import describe, prepare

        part = _parse_shard(args.shard) if args.shard else (0, 1)
        if args.shard and args.tokenizer is None:
            raise UserError("--shard: needs --tokenizer (every part must use the same one)")
        tokenizer = args.tokenizer
        if tokenizer is None:
            from pretrain.data.prepare import check_out_dir
            from pretrain.data.tokenizer import train_tokenizer

            check_out_dir(Path(args.out), args.overwrite)  # fail before spending time training
            tokenizer = train_tokenizer(args.input, Path(args.out) / "tokenizer", args.vocab_size,
                                        text_field=args.text_field)
            print(f"trained {tokenizer} in {time.perf_counter() - t0:.1f}s")
        meta = prepare(args.input, args.out, tokenizer, text_field=args.text_field,
                       sample_len=args.sample_len, val_fraction=args.val_fraction,
                       workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite,
                       part=part, group_bytes=args.group_bytes)
        if part[1] > 1:
            print(f"part {part[0]}/{part[1]}: " + ", ".join(f"{k} {v['samples']} samples"
                                                           for k, v in meta["splits"].items()))
            print(f"wrote {args.out} part {part[0]}/{part[1]} in {time.perf_counter() - t0:.1f}s")
            return 0
        print(describe(meta))
        print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise UserError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/8), got {text!r}")
    return int(i), int(n)


def _run_parts(args) -> None:
    from pretrain.data.prepare import check_out_dir, describe
    from pretrain.data.runner import run_local, submit_slurm

    if not (args.runner and args.shards >= 1):
        raise UserError("--runner and --shards N go together (N >= 1)")
    if args.shard or args.tokenizer is None:
        raise UserError("--runner: needs --tokenizer and no --shard (it runs every part)")
    if args.overwrite:
        raise UserError("--runner: --overwrite is not supported; remove --out or choose another")
    check_out_dir(Path(args.out), False)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.runner == "slurm":
        print(submit_slurm(args, args.shards))
    else:
        print(describe(run_local(args, args.shards)))


if __name__ == "__main__":
    raise SystemExit(main())
