"""Hugging Face mappings beyond dense Llama: Mixtral, Qwen2-MoE, Mamba2, Bamba, Falcon-H1,
and remote code for MoE / Mamba-2 / hybrid-heads features no transformers class has."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from models.config import HybridHeadsConfig, MambaConfig, MoEConfig, ModelConfig
from models.transformer import build_model
from parallel.world import World
from pretrain.checkpoint import save_checkpoint
from pretrain.config import Config, config_yaml
from pretrain.errors import UserError
from pretrain.evaluate import load_for_inference, sample
from pretrain.hf.export import export_checkpoint
from pretrain.hf.import_hf import import_model

from hf_sharp import LOGIT_TOL, check_sharp, sharpen

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]
VOCAB = 96
MAMBA = MambaConfig(d_state=8, head_dim=8, n_groups=1, chunk_size=4)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def checkpoint(run_dir: Path, mc: ModelConfig):
    """A few AdamW steps on random tokens, weights sharpened (tests/hf_sharp.py), then a
    checkpoint; returns (model, step dir)."""
    torch.manual_seed(0)
    model = build_model(mc, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        x = torch.randint(0, VOCAB, (2, 13))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    sharpen(model)
    cfg = Config(model=mc)
    cfg.data.seq_len = 16
    text = config_yaml(cfg)
    return model.eval(), save_checkpoint(run_dir, 2, [model], opt, {"step": 2}, World(), text)


def load_hf(out: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def diff(ours, hf, x) -> float:
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


def export_and_compare(tmp_path: Path, mc: ModelConfig, arch: str):
    """Export, then fp32 logits and a greedy generation against transformers, on weights whose
    attention is sharp and whose every sublayer moves the stream (the checks would not see a
    wrong mapping of a sublayer that contributes nothing)."""
    model, ckpt = checkpoint(tmp_path / "run", mc)
    summary = export_checkpoint(str(ckpt), str(tmp_path / "hf"))
    assert summary["architecture"] == arch, summary["notes"]
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == arch
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    check_sharp(model, x, arch)
    d = diff(model, hf, x)
    print(f"{arch}: max |logit difference| {d:.2e}, logit std {model(x).std().item():.2f}")
    assert d < LOGIT_TOL, d
    out = hf.generate(x[:1, :4], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0].tolist() == sample(model, x[0, :4].tolist(), 16, greedy=True)
    # import of the export gives back the same function
    _, again, _ = load_for_inference(str(import_model(str(tmp_path / "hf"), str(tmp_path / "imp"))))
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max().item() < 1e-5
    return model, ckpt, summary


def test_mixtral(tmp_path):
    export_and_compare(tmp_path, tiny(pattern="*E", moe=MoEConfig(n_experts=4, top_k=2)),
                       "MixtralForCausalLM")


def test_qwen2_moe_shared_experts_and_dense_layers(tmp_path):
    # an ungated shared expert (exported as gate 0, doubled down projection), no renormalisation,
    # and a dense MLP layer in between (mlp_only_layers)
    moe = MoEConfig(n_experts=4, top_k=2, n_shared_experts=2, renormalize=False)
    export_and_compare(tmp_path, tiny(pattern="*E*-", n_layers=1, moe=moe, qkv_bias=True),
                       "Qwen2MoeForCausalLM")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [1] and cfg["norm_topk_prob"] is False


def test_mamba2(tmp_path):
    export_and_compare(tmp_path, tiny(pattern="M", mamba=MAMBA, tie_embeddings=True), "Mamba2ForCausalLM")


def test_bamba(tmp_path):
    export_and_compare(tmp_path, tiny(pattern="M-*-", n_layers=1, mamba=MAMBA), "BambaForCausalLM")


def test_falcon_h1(tmp_path):
    mc = tiny(pattern="P-", mamba=MambaConfig(d_state=8, head_dim=8, n_groups=2, chunk_size=4),
              hybrid=HybridHeadsConfig(n_attn_heads=2, n_mamba_heads=4))
    export_and_compare(tmp_path, mc, "FalconH1ForCausalLM")


def test_remote_code_moe_mamba_hybrid(tmp_path):
    """Features with no faithful class: sigmoid group-limited routing with shared experts and a
    router bias, grouped Mamba-2 norm, and a free mix of sublayers."""
    moe = MoEConfig(n_experts=4, top_k=2, score_fn="sigmoid", n_groups=2, topk_groups=1, n_shared_experts=1,
                    shared_expert_gate=True, router_bias=True)
    mc = tiny(pattern="M*EP-", n_layers=1, moe=moe, mamba=MambaConfig(d_state=8, head_dim=8, n_groups=2,
              chunk_size=4), hybrid=HybridHeadsConfig(n_attn_heads=2, n_mamba_heads=2))
    _, _, s = export_and_compare(tmp_path, mc, "PretrainLMForCausalLM")
    assert "sublayer pattern" in s["notes"][0]

    sig = tiny(pattern="*E", moe=MoEConfig(n_experts=4, top_k=2, score_fn="sigmoid"))
    _, ck = checkpoint(tmp_path / "sig", sig)
    with pytest.raises(UserError, match="MixtralForCausalLM cannot represent.*score_fn=sigmoid"):
        export_checkpoint(str(ck), str(tmp_path / "never"), remote_code="never")
    grouped = tiny(pattern="M", mamba=MambaConfig(d_state=8, head_dim=8, n_groups=2, chunk_size=4))
    _, ck = checkpoint(tmp_path / "grp", grouped)
    with pytest.raises(UserError, match="n_groups=2"):
        export_checkpoint(str(ck), str(tmp_path / "never2"), remote_code="never")


def test_import_transformers_mamba2(tmp_path):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                       state_size=8, n_groups=1, expand=2, chunk_size=4, conv_kernel=4,
                       time_step_limit=(0.0, 4.0), tie_word_embeddings=False)
    hf = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "D", "dt_bias")):
                p.add_(torch.rand_like(p))
    hf.save_pretrained(tmp_path / "m2")
    _, ours, _ = load_for_inference(str(import_model(str(tmp_path / "m2"), str(tmp_path / "ck"))))
    assert ours.cfg.pattern == "M" and ours.cfg.mamba.dt_limit == (0.0, 4.0)
    assert diff(ours, hf, torch.randint(0, VOCAB, (2, 10))) < 1e-4


def test_import_falcon_h1_folds_multipliers(tmp_path):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    torch.manual_seed(0)
    cfg = FalconH1Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4,
                         mamba_d_state=8, mamba_chunk_size=4, mamba_rms_norm=True, mamba_norm_before_gate=False,
                         max_position_embeddings=32, embedding_multiplier=1.7, lm_head_multiplier=0.6,
                         mlp_multipliers=[0.9, 1.3], key_multiplier=0.7, attention_out_multiplier=1.2,
                         attention_in_multiplier=0.8, ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.5],
                         ssm_in_multiplier=1.3, ssm_out_multiplier=0.75, tie_word_embeddings=False)
    hf = FalconH1ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "fh1")
    _, ours, _ = load_for_inference(str(import_model(str(tmp_path / "fh1"), str(tmp_path / "ck"))))
    assert diff(ours, hf, torch.randint(0, VOCAB, (2, 10))) < 1e-4


def test_import_transformers_mixtral_via_cli(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from pretrain.cli import main as cli

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32, sliding_window=None)
    hf = MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "mx")
    assert cli(["import-hf", "--model", str(tmp_path / "mx"), "--out", str(tmp_path / "run")]) == 0
    _, ours, _ = load_for_inference(str(tmp_path / "run"))
    assert ours.cfg.pattern == "*E" and ours.cfg.moe.n_experts == 4
    assert diff(ours, hf, torch.randint(0, VOCAB, (2, 10))) < 1e-4
