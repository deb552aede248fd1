"""Checkpoint transforms: ``pretrain convert-ladder`` and ``pretrain upcycle``.

Both read a checkpoint (any layout), change the model config, transform the weights
and write a fresh ``step_0`` checkpoint (weights only) for continued pretraining with
``--checkpoint.init_from=OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.transformer import build_model
from parallel.world import World
from pretrain import checkpoint as ckpt
from pretrain.config import Config, apply_overrides, config_yaml
from pretrain.errors import UserError
from pretrain.evaluate import load_for_inference


def write_weights_checkpoint(out_dir: str, cfg: Config, model, tokenizer: str | None) -> Path:
    """A complete ``<out_dir>/checkpoints/step_0`` holding ``model``'s weights and ``cfg``."""
    out = Path(out_dir)
    if ckpt.list_checkpoints(out):
        raise UserError(f"{out} already holds checkpoints; choose an empty output directory")
    cfg.logging.run_dir = str(out)
    text = config_yaml(cfg)
    state = {"step": 0, "tokens": 0, "scheduler": None, "data": None, "weights_only": True}
    return ckpt.save_checkpoint(out, 0, [model], None, state, World(), text, tokenizer)


def _config_with(cfg: Config, overrides: list[str]) -> Config:
    from pretrain.config import from_dict

    new = from_dict(Config, apply_overrides(cfg.to_dict(), overrides))
    new.validate()
    return new


def ladder_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pretrain convert-ladder",
                                 description="Turn a standard-residual checkpoint into a ladder-residual "
                                             "model (all sublayers, or from sublayer index --from on).")
    ap.add_argument("--checkpoint", required=True, help="step_N directory or run directory")
    ap.add_argument("--out", required=True, help="new run directory (gets checkpoints/step_0)")
    ap.add_argument("--from", dest="start", type=int, default=0,
                    help="first sublayer index that becomes ladder (default 0: all)")
    args = ap.parse_args(argv)
    cfg, model, path = load_for_inference(args.checkpoint)
    if cfg.model.residual != "standard":
        raise UserError(f"{path} is already a '{cfg.model.residual}' residual model; convert a standard one")
    if not 0 <= args.start < cfg.model.n_sublayers:
        raise UserError(f"--from: {args.start} outside 0..{cfg.model.n_sublayers - 1}")
    # Ladder changes how outputs join the stream, not the parameters: weights carry over as they are.
    new_cfg = _config_with(cfg, ["--model.residual=ladder", f"--model.ladder_from={args.start}"])
    model.cfg = new_cfg.model
    tok = path / "tokenizer.model"
    out = write_weights_checkpoint(args.out, new_cfg, model, str(tok) if tok.exists() else None)
    print(f"wrote {out} (ladder from sublayer {args.start}); continue with "
          f"--checkpoint.init_from={out}")
    return 0


def upcycle_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pretrain upcycle",
                                 description="Initialise an MoE model from a dense checkpoint: every expert a "
                                             "copy of the dense MLP it replaces (optionally with noise).")
    ap.add_argument("--checkpoint", required=True, help="dense step_N directory or run directory")
    ap.add_argument("--out", required=True, help="new run directory (gets checkpoints/step_0)")
    ap.add_argument("--noise-std", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*",
                    help="MoE model settings, e.g. --model.moe.n_experts=8 --model.moe.top_k=2 "
                         "(default pattern: every '-' becomes 'E')")
    args, unknown = ap.parse_known_args(argv)
    overrides = list(args.overrides) + unknown
    cfg, dense, path = load_for_inference(args.checkpoint)
    if not any(o.startswith("--model.pattern=") for o in overrides):
        overrides.append(f"--model.pattern={cfg.model.pattern.replace('-', 'E')}")
    if not any(o.startswith("--model.moe.ffn_hidden=") for o in overrides):
        overrides.append(f"--model.moe.ffn_hidden={cfg.model.ffn_hidden_resolved}")
    new_cfg = _config_with(cfg, overrides)
    from models.moe_upcycle import upcycle_dense_state

    state = upcycle_dense_state(dense.state_dict(), new_cfg.model, args.noise_std, args.seed)
    moe = build_model(new_cfg.model, seed=new_cfg.train.seed)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"upcycle: state does not fit the MoE model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    tok = path / "tokenizer.model"
    out = write_weights_checkpoint(args.out, new_cfg, moe, str(tok) if tok.exists() else None)
    print(f"wrote {out} ({new_cfg.model.moe.n_experts} experts, top-{new_cfg.model.moe.top_k}); "
          f"continue with --checkpoint.init_from={out}")
    return 0
