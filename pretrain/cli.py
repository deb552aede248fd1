"""``pretrain <verb>``: the command-line entry point.

Every verb is a module function ``main(argv) -> int``, imported only when used.
A user mistake (bad config, data or checkpoint) prints one line and exits 2.
"""

from __future__ import annotations

import importlib
import sys

from pretrain.errors import EXIT_USER_ERROR, UserError

VERBS = {
    "demo": ("pretrain.demo:main", "tokenize a built-in corpus, train a small model, evaluate (no arguments)"),
    "train": ("pretrain.cli_train:main", "train a model: pretrain train CONFIG [--section.key=value ...]"),
    "eval": ("pretrain.evaluate:eval_main", "held-out loss and perplexity of a checkpoint"),
    "generate": ("pretrain.evaluate:generate_main", "sample text from a checkpoint"),
    "data": ("pretrain.data.cli:main", "build corpora, train tokenizers, write MDS shards"),
    "export": ("pretrain.hf.export:main", "write a checkpoint in Hugging Face format"),
    "import-hf": ("pretrain.hf.import_hf:main", "turn a Hugging Face model into a checkpoint"),
    "convert-ladder": ("pretrain.convert:ladder_main", "turn a standard checkpoint into a ladder-residual one"),
    "upcycle": ("pretrain.convert:upcycle_main", "initialise an MoE checkpoint from a dense one"),
    "launch": ("launch.cli:main", "run training under torchrun, SLURM or DeepSpeed"),
    "plan": ("pretrain.plan:main", "predict memory and step time of parallel layouts"),
    "scale-test": ("pretrain.scale_test:main", "run a sweep of model sizes/architectures/layouts"),
    "plot": ("pretrain.plot:main", "plot loss and throughput curves of runs"),
}


def usage() -> str:
    lines = ["usage: pretrain <verb> [args]   (pretrain <verb> --help for details)", "", "verbs:"]
    lines += [f"  {name:<15} {desc}" for name, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def _load(target: str):
    mod, fn = target.split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):
            raise UserError(f"this verb is not available in this installation ({mod} missing)") from None
        raise
    return getattr(module, fn)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(_load(VERBS[verb][0])(rest) or 0)
    except UserError as e:  # (models/ and parallel/ raise the same class)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
