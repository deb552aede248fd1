"""Context extension with ``model.rope_scaling``: frequencies equal transformers' RoPE variants,
and a run trained at 256 tokens, continued at 1024 with YaRN and exported, gives transformers'
logits past the original length."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_overrides
from models.config import ModelConfig, RopeScalingConfig, UserError
from models.rope_scaling import rope_inv_freq, rope_scaling_from_hf, rope_scaling_to_hf

CASES = [
    RopeScalingConfig(type="linear", factor=4.0),
    RopeScalingConfig(type="llama3", factor=8.0, original_max_seq_len=256, low_freq_factor=1.0, high_freq_factor=4.0),
    RopeScalingConfig(type="llama3", factor=4.0, original_max_seq_len=8192, low_freq_factor=2.0, high_freq_factor=8.0),
    RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=256),
    RopeScalingConfig(type="yarn", factor=16.0, original_max_seq_len=4096, beta_fast=16, beta_slow=2,
                      attention_factor=1.3, truncate=False),
    RopeScalingConfig(type="yarn", factor=8.0),  # original length: max_seq_len
]


@pytest.mark.parametrize("sc", CASES, ids=lambda sc: f"{sc.type}-{sc.factor:g}-{sc.original_max_seq_len}")
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (128, 500000.0)])
def test_frequencies_match_transformers(sc, head_dim, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = rope_scaling_to_hf(sc)
    spec = SimpleNamespace(rope_theta=theta, head_dim=head_dim, hidden_size=head_dim * 4, num_attention_heads=4,
                           partial_rotary_factor=1.0, max_position_embeddings=2048, rope_scaling=hf)
    want, want_mult = ROPE_INIT_FUNCTIONS[hf["rope_type"]](spec, "cpu")
    got, mult = rope_inv_freq(head_dim, theta, sc, max_seq_len=2048)
    assert torch.equal(got, want.float()) and mult == pytest.approx(want_mult, rel=1e-12)
    assert rope_scaling_from_hf(hf) == sc  # the HF dict reads back
    assert not torch.equal(got, rope_inv_freq(head_dim, theta)[0])


def test_bad_rope_scaling_is_a_config_error():
    for sc, key in ((RopeScalingConfig(type="ntk"), "type"), (RopeScalingConfig(type="yarn", factor=0.5), "factor"),
                    (RopeScalingConfig(type="llama3", factor=8.0), "original_max_seq_len")):
        with pytest.raises(UserError, match=f"model.rope_scaling.{key}"):
            ModelConfig(rope_scaling=sc).validate()


@pytest.mark.timeout(600)
def test_context_extension_with_yarn_exports_to_transformers(tiny_dataset, tmp_path):
    from pretrain import checkpoint as ckpt
    from pretrain.config import load_config
    from pretrain.evaluate import load_for_inference
    from pretrain.hf.export import export_checkpoint
    from pretrain.train import train

    torch.set_num_threads(2)
    short = tmp_path / "short"
    train(load_config("tiny", tiny_overrides(tiny_dataset, short, **{
        "data.seq_len": 256, "model.max_seq_len": 256, "train.steps": 4, "train.global_batch": 2,
        "checkpoint.every": 4, "train.eval_batches": 1})))
    long = tmp_path / "long"
    yarn = {"model.rope_scaling.type": "yarn", "model.rope_scaling.factor": 4.0,
            "model.rope_scaling.original_max_seq_len": 256}
    train(load_config("tiny", tiny_overrides(tiny_dataset, long, **{
        "data.seq_len": 1024, "model.max_seq_len": 1024, "train.steps": 2, "train.global_batch": 1,
        "checkpoint.every": 2, "train.eval_batches": 1, "checkpoint.init_from": str(short), **yarn})))
    last = ckpt.latest_checkpoint(long)
    cfg, model, _ = load_for_inference(str(last))
    assert cfg.model.rope_scaling.type == "yarn"
    out = tmp_path / "hf"
    export_checkpoint(str(last), str(out))
    import json

    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
    from pretrain.data.loader import TokenBatches

    x = TokenBatches(cfg.data, "train", 1, 0, 1, seed=0, shuffle=False).batch_at(100)["input_ids"]
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        plain, _ = load_for_inference(str(last), ["--model.rope_scaling.type=none"])[1:]
        unscaled = plain(x)
    diff = (ours[:, 256:] - theirs[:, 256:]).abs().max().item()
    effect = (ours[:, 256:] - unscaled[:, 256:]).abs().max().item()
    print(f"logits past 256: max |ours - transformers| {diff:.2e}; the scaling moves them by {effect:.2e}")
    assert diff < 1e-5 and effect > 1e-3  # exact, and the scaling matters at these positions
