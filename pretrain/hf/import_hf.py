"""``pretrain import-hf``: a local Hugging Face model directory -> a ``step_0`` checkpoint.

Supported: LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Mamba2ForCausalLM,
BambaForCausalLM (full rotary) and this project's own remote-code exports. The result is
``OUT/checkpoints/step_0`` (DCP weights, no optimizer state, trainer_state.json with step 0
and ``weights_only``, config.yaml, meta.json, tokenizer.model when the HF directory has one),
written by the same ``save_checkpoint`` as training, so ``--checkpoint.init_from=OUT`` loads it
into any parallel layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pretrain.errors import UserError


def import_model(model_dir: str, out: str) -> Path:
    """Convert ``model_dir``; returns the written step_0 path."""
    from models.transformer import build_model
    from pretrain.config import Config
    from pretrain.convert import write_weights_checkpoint
    from pretrain.hf.arch_io import read_hf_weights
    from pretrain.hf.registry import arch_for_hf

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{src}/config.json: not valid JSON ({e.msg})") from None
    arch = arch_for_hf(hf)
    try:
        mc = arch.import_config(hf)
        mc.validate()
    except (UserError, KeyError) as e:
        raise UserError(f"{src}: {arch.hf_class} config does not map to a model here: {e}") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in read_hf_weights(src).items()}
    sd = arch.import_weights(hf, mc, tensors)

    model = build_model(mc, init=False).to_empty(device="cpu")
    model.tie_weights()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise UserError(f"{src}: weights do not fit the mapped model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    used = _hf_names_used(arch, mc, sd, tensors)
    leftover = sorted(k for k in tensors if k not in used)
    if leftover:  # never drop weights silently
        raise UserError(f"{src}: weights with no place in the mapped model: {leftover[:3]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{src}: {k} has shape {tuple(v.shape)}, the mapped model expects "
                            f"{tuple(expected[k].shape)}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()})

    cfg = Config(model=mc)
    cfg.data.seq_len = min(cfg.data.seq_len, mc.max_seq_len)
    cfg.validate()
    from pretrain.data.tokenizer import find_tokenizer

    tok = find_tokenizer(src)  # tokenizer.model, else tokenizer.json (+ its config)
    return write_weights_checkpoint(out, cfg, model, str(tok) if tok else None)


def _hf_names_used(arch, mc, sd: dict, tensors: dict) -> set[str]:
    """HF tensor names the mapping consumed: re-export the imported weights and compare names.
    Tensors the export would not write (e.g. a zero o_proj bias) count as used when present."""
    used = set(arch.export_weights(mc, sd))
    if mc.tie_embeddings:
        used |= {"lm_head.weight"}
    # buffers some checkpoints carry that hold no learned state
    used |= {k for k in tensors if k.endswith(("rotary_emb.inv_freq", "o_proj.bias"))}
    return used


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pretrain import-hf",
                                 description="Turn a local Hugging Face model (Llama, Mixtral, Qwen2-MoE, Mamba-2, "
                                             "Bamba, or a pretrain export) into a step_0 checkpoint for "
                                             "--checkpoint.init_from.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="new run directory (gets checkpoints/step_0)")
    args = ap.parse_args(argv)
    path = import_model(args.model, args.out)
    print(f"wrote {path}; continue pretraining with --checkpoint.init_from={path.parent.parent}")
    return 0
