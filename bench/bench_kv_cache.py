"""KV-cache bytes per token: MLA vs GQA vs MHA of the same width (not CI).

    .venv/bin/python bench/bench_kv_cache.py

Computed (``models.mla.kv_cache_bytes_per_token``, bf16) for a tiny width and DeepSeek-V3's
(d_model 7168, 128 heads of 128, 61 layers; MLA latent 512 + rope key 64; GQA with 8 KV
heads). Measured for the tiny width: the project has no cached-generation path
(``pretrain generate`` re-runs the whole prefix per token), so "measured" is the size of the
tensors a cache would hold, taken from one forward of a built model: the K and V projection
outputs per token (MHA/GQA) or MLA's ``wkv_a`` output (latent + shared rope key), per layer,
in bf16 as a cache would store them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.config import MLAConfig, ModelConfig  # noqa: E402
from models.mla import kv_cache_bytes_per_token  # noqa: E402


def variants(d: int, heads: int, hd: int, layers: int, kv: int, lora: int, rope: int) -> dict:
    base = dict(d_model=d, n_heads=heads, head_dim=hd, n_layers=layers, pattern="*-", vocab_size=512,
                max_seq_len=64)
    return {"MHA": ModelConfig(**base),
            f"GQA ({kv} KV heads)": ModelConfig(**base, n_kv_heads=kv),
            "MLA": ModelConfig(**base, attention="mla",
                               mla=MLAConfig(kv_lora_rank=lora, qk_nope_head_dim=hd, qk_rope_head_dim=rope,
                                             v_head_dim=hd))}


def measured_bytes_per_token(cfg: ModelConfig, bytes_per_elem: int = 2) -> int:
    """Bytes per token of the tensors a KV cache would hold, from one forward."""
    from models.transformer import build_model

    model = build_model(cfg)
    seen: list[int] = []

    def hook(mod, args, out):
        seen.append(out.shape[-1])  # elements per token

    for layer in model.layers.values():
        m = layer.mixer
        names = ("wkv_a",) if cfg.attention == "mla" else ("wk", "wv")
        for n in names if layer.kind == "attention" else ():
            getattr(m, n).register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 16)))
    return bytes_per_elem * sum(seen)


def main() -> None:
    rows = []
    tiny = variants(256, 8, 32, 4, 2, 128, 16)
    v3 = variants(7168, 128, 128, 61, 8, 512, 64)
    for width, cfgs, measure in (("tiny d=256, 8x32, 4 layers", tiny, True),
                                 ("DeepSeek-V3 d=7168, 128x128, 61 layers", v3, False)):
        mha = kv_cache_bytes_per_token(cfgs["MHA"])
        for name, cfg in cfgs.items():
            n = kv_cache_bytes_per_token(cfg)
            meas = measured_bytes_per_token(cfg) if measure else None
            rows.append((width, name, n // cfg.n_layers, n, meas, mha / n))
    print(f"{'width':40s} {'attention':18s} {'B/token/layer':>14s} {'B/token':>10s} {'measured':>10s} "
          f"{'MHA / this':>10s}")
    for width, name, per_layer, total, meas, ratio in rows:
        m = f"{meas:,}" if meas is not None else "-"
        print(f"{width:40s} {name:18s} {per_layer:>14,} {total:>10,} {m:>10s} {ratio:>9.1f}x")


if __name__ == "__main__":
    main()
