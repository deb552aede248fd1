"""Training tokens/s of this project's model vs transformers' LlamaForCausalLM of identical shape.

Same process, same batch, same machine; eager and (optionally) torch.compile on both sides.
Both sides alternate rounds so machine noise hits them alike; prints the ratio.

    python bench/bench_vs_hf.py [--layers 4 --width 256 --seq 256 --batch 8 --steps 10 --compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.config import ModelConfig  # noqa: E402
from models.transformer import build_model  # noqa: E402


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden_resolved,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads_resolved, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                     attn_implementation="sdpa")
    return LlamaForCausalLM(hc)


def step_fn(model, opt, x, y, is_hf):
    def step():
        if is_hf:
            logits = model(input_ids=x).logits
        else:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile on both sides")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.width, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.seq, doc_mask=False)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    modes = ["eager"] + (["compiled"] if args.compile else [])
    print(f"shape: {args.layers} layers, width {args.width}, seq {args.seq}, batch {args.batch}, "
          f"vocab {args.vocab}; threads {torch.get_num_threads()}")
    for mode in modes:
        sides = {}
        for name in ("ours", "hf"):
            model = build_model(cfg) if name == "ours" else hf_llama(cfg)
            if mode == "compiled":
                model = torch.compile(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            fn = step_fn(model, opt, x, y, name == "hf")
            fn()
            fn()  # warm-up (and compilation)
            sides[name] = (fn, [])
        for _ in range(args.rounds):
            for name, (fn, times) in sides.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times.append(time.perf_counter() - t0)
        tok = args.batch * args.seq * args.steps
        rate = {n: tok / statistics.median(t) for n, (_, t) in sides.items()}
        print(f"{mode:9s} ours {rate['ours']:9.0f} tok/s   hf {rate['hf']:9.0f} tok/s   "
              f"ratio ours/hf {rate['ours'] / rate['hf']:.3f}")


if __name__ == "__main__":
    main()
