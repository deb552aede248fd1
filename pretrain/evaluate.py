"""``pretrain eval`` (held-out loss/perplexity) and ``pretrain generate`` (sampling)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from models.transformer import build_model
from pretrain import checkpoint as ckpt
from pretrain.cliargs import Parser, integer, name, path
from pretrain.config import Config, apply_overrides, from_dict, load_yaml
from pretrain.errors import UserError


def load_for_inference(checkpoint: str, overrides: list[str] | None = None):
    """(Config, model with the checkpoint's weights, checkpoint path) in one process."""
    path = ckpt.resolve_checkpoint_arg(checkpoint)
    ckpt.check_checkpoint_dir(path)
    data = apply_overrides(load_yaml(path / "config.yaml"), list(overrides or []))
    cfg: Config = from_dict(Config, data)
    cfg.validate()
    model = build_model(cfg.model, seed=cfg.train.seed, init=False).to_empty(device="cpu")
    ckpt.load_model_weights(path, model)
    model.eval()
    return cfg, model, path


def eval_parser() -> Parser:
    ap = Parser(prog="pretrain eval", description="Held-out loss and perplexity of a checkpoint, or (--task mqar) "
                                                 "its associative-recall accuracy.")
    ap.add_argument("--checkpoint", required=True, type=path(),  # (a missing one: "no complete checkpoint")
                    help="step_N directory or a run directory (newest)")
    ap.add_argument("--data", type=path(), help="MDS dataset directory or URL (default: the run's data.path)")
    ap.add_argument("--split", default=None, type=name(), help="split name (default: data.val_split)")
    ap.add_argument("--batches", type=integer(ge=1), default=None,
                    help="number of batches (default: train.eval_batches)")
    ap.add_argument("--batch-size", type=integer(ge=1), default=8)
    ap.add_argument("--out", type=path(), help="JSON output (default: <checkpoint>/eval.json, "
                                                 "eval_mqar.json for --task mqar)")
    ap.add_argument("--task", choices=("lm", "mqar"), default="lm",
                    help="lm: held-out loss; mqar: associative-recall accuracy on generated sequences")
    ap.add_argument("--mqar-pairs", type=integer(ge=1), default=None,
                    help="key-value pairs per sequence (default: the run's data.mqar.pairs)")
    ap.add_argument("--mqar-seq-len", type=integer(ge=1), default=None,
                    help="sequence length (default: the run's data.seq_len)")
    ap.add_argument("--mqar-samples", type=integer(ge=1), default=256, help="generated sequences")
    ap.add_argument("--seed", type=integer(ge=0), default=0, help="seed of the generated sequences")
    return ap


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    if args.task == "mqar":
        from pretrain.mqar_eval import eval_mqar_main

        return eval_mqar_main(args)
    overrides = [f"--data.path={args.data}", "--data.mixture=[]"] if args.data else []
    cfg, model, path = load_for_inference(args.checkpoint, overrides)
    from pretrain.data.loader import eval_batches

    if cfg.data.task == "mqar" and not args.data:  # held-out loss on generated MQAR sequences
        from pretrain.data import mqar

        batches = mqar.eval_batches(cfg, args.split or cfg.data.val_split, args.batch_size,
                                    args.batches or cfg.train.eval_batches)
    else:
        batches = eval_batches(cfg.data, args.split or cfg.data.val_split, args.batch_size,
                               args.batches or cfg.train.eval_batches, dp_rank=0, dp_size=1,
                               cache_dir=cfg.data.cache_path(path.parent.parent),
                               doc_ids=cfg.model.doc_mask)
    import kernels

    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], b.get("doc_ids"))
            n = int((b["labels"] != -100).sum())
            total += float(kernels.cross_entropy(logits, b["labels"])) * n
            count += n
    if count == 0:
        raise UserError("the held-out split yielded no batches")
    loss = total / count
    result = {"checkpoint": str(path), "split": args.split or cfg.data.val_split, "tokens": count,
              "loss": loss, "perplexity": math.exp(min(loss, 50))}
    out = Path(args.out) if args.out else path / "eval.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, greedy: bool = False, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Autoregressive sampling by re-running the full forward (simple, not a server)."""
    ids = list(prompt_ids)
    max_len = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-max_len:]])
        logits = model(x)[0, -1].float()
        if greedy or temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1)
            if top_p < 1.0:
                sp, si = probs.sort(descending=True)
                keep = sp.cumsum(0) - sp < top_p
                probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                probs /= probs.sum()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return ids


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pretrain generate", description="Sample text from a checkpoint.")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.json (default: the checkpoint's copy)")
    args = ap.parse_args(argv)
    cfg, model, path = load_for_inference(args.checkpoint)
    from pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer or path)
    # Documents are packed as "... EOS doc EOS": EOS is the start-of-document context.
    ids = [tok.eos_id] + tok.encode(args.prompt)
    out = sample(model, ids, args.max_new_tokens, args.temperature, args.top_p, args.greedy,
                 tok.eos_id, torch.Generator().manual_seed(args.seed))
    print(tok.decode(out[1:]))
    return 0
