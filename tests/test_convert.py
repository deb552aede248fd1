"""`pretrain upcycle`: an MoE checkpoint from a dense one computes the dense function at init."""

import torch

from conftest import tiny_overrides
from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.convert import upcycle_main
from pretrain.evaluate import load_for_inference
from pretrain.train import train


def test_upcycle_cli_matches_dense_and_trains(tiny_dataset, tmp_path):
    dense_dir = tmp_path / "dense"
    train(load_config("tiny", tiny_overrides(tiny_dataset, dense_dir, **{"train.steps": 3})))
    out = tmp_path / "moe"
    assert upcycle_main(["--checkpoint", str(dense_dir), "--out", str(out),
                         "--model.moe.n_experts=4", "--model.moe.top_k=2"]) == 0
    _, dense, _ = load_for_inference(str(dense_dir))
    cfg, moe, _ = load_for_inference(str(out))
    assert cfg.model.pattern == "*E" and cfg.model.moe.n_experts == 4
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    # continued pretraining from the upcycled weights
    run = tmp_path / "moe_run"
    cont = load_config(str(ckpt.latest_checkpoint(out) / "config.yaml"),
                       tiny_overrides(tiny_dataset, run, **{"train.steps": 2,
                                                            "checkpoint.init_from": str(out)}))
    summary = train(cont)
    assert summary["steps"] == 2 and summary["val_loss"] is not None
