"""Gated DeltaNet hybrids with gated attention and MoE <-> ``Qwen3NextForCausalLM``: fp32 logits
and greedy generation equal transformers' on sharp weights (tests/hf_sharp.py), and the
import of the export gives back the original weights."""

from __future__ import annotations

import json

import pytest
import torch

from models.config import GDNConfig, MoEConfig
from pretrain.errors import UserError
from pretrain.evaluate import load_for_inference
from models.transformer import build_model
from pretrain.hf.registry import choose
from pretrain.hf.import_hf import import_model

from hf_sharp import QK_GAIN
from test_hf_arch import export_and_compare, tiny

pytestmark = pytest.mark.filterwarnings("ignore")
# (default chunk size: the HF config has none, so an import gets the default, and chunking moves
# fp32 logits by ~1e-5 on sharp weights)
GDN = GDNConfig(n_heads=2, n_v_heads=4, head_k_dim=8, head_v_dim=8, norm_eps=1e-5)
MOE = MoEConfig(n_experts=4, top_k=2, ffn_hidden=16, n_shared_experts=1, shared_expert_gate=True)
ATTN = dict(qk_norm=True, attn_output_gate=True, partial_rotary_factor=0.25, n_heads=2, n_kv_heads=1,
            head_dim=16, rope_theta=1e4)


@pytest.fixture(autouse=True)
def _sharp_qk_norm(monkeypatch):
    """With q/k RMSNorm the scale of wq/wk is normalised away: ``sharpen`` also scales the
    q/k norm weights, so attention is as sharp as without the norm (and the exported
    zero-centred weights are far from zero)."""
    import hf_sharp

    original = hf_sharp.sharpen

    @torch.no_grad()
    def sharpen(model):
        original(model)
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(QK_GAIN)
        return model

    monkeypatch.setattr(hf_sharp, "sharpen", sharpen)
    import test_hf_arch

    monkeypatch.setattr(test_hf_arch, "sharpen", sharpen)


def round_trip_weights(tmp_path, model):
    """The imported checkpoint's weights equal the original model's, tensor by tensor."""
    _, again, _ = load_for_inference(str(tmp_path / "imp"))
    ours, back = model.state_dict(), again.state_dict()
    assert ours.keys() == back.keys()
    worst = max((ours[k].float() - back[k].float()).abs().max().item() for k in ours if ours[k].numel())
    print(f"round trip: max |weight difference| {worst:.1e}")
    assert worst == 0.0


def test_qwen3_next_moe_gated_attention(tmp_path):
    """The Qwen3-Next shape: GDN and gated attention 3:1, every MLP an MoE with a gated shared
    expert, q/k norm, RoPE on a quarter of each head."""
    mc = tiny(pattern="GEGEGE*E", n_layers=1, gdn=GDN, moe=MOE, norm_eps=1e-5, **ATTN)
    model, _, _ = export_and_compare(tmp_path, mc, "Qwen3NextForCausalLM")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg["mlp_only_layers"] == [] and cfg["num_experts"] == 4 and cfg["partial_rotary_factor"] == 0.25
    round_trip_weights(tmp_path, model)


def test_gdn_hybrid_dense_and_moe_layers_ungated(tmp_path):
    """Dense and MoE layers mixed (mlp_only_layers), ungated full-rotary attention (zero gate
    rows and a doubled o_proj on export, ungated again on import), an ungated shared expert."""
    moe = MoEConfig(n_experts=4, top_k=2, ffn_hidden=16, n_shared_experts=1)
    attn = dict(ATTN, attn_output_gate=False, partial_rotary_factor=1.0)
    mc = tiny(pattern="G-GE*-*E", n_layers=1, gdn=GDN, moe=moe, norm_eps=1e-5, **attn)
    model, _, _ = export_and_compare(tmp_path, mc, "Qwen3NextForCausalLM")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0, 2] and cfg["layer_types"][2:] == ["full_attention"] * 2
    cfg_back, again, _ = load_for_inference(str(tmp_path / "imp"))
    assert not cfg_back.model.attn_output_gate  # zero gate rows came back as an ungated attention
    ours, back = model.state_dict(), again.state_dict()
    for i in (3, 7):  # the ungated shared expert comes back gated: gate 0, down projection x2
        pre = f"layers.{i}.mixer."
        assert not back.pop(pre + "shared_gate.weight").any()
        assert torch.equal(back[pre + "shared_expert.w_down.weight"], 2 * ours[pre + "shared_expert.w_down.weight"])
        back[pre + "shared_expert.w_down.weight"] = ours[pre + "shared_expert.w_down.weight"]
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)


def test_what_qwen3_next_cannot_express_is_refused_in_one_line(tmp_path):
    cases = {"gdn.norm_eps": tiny(pattern="G-*-", n_layers=1, gdn=GDN, norm_eps=1e-6, **ATTN),
             "qk_norm": tiny(pattern="G-*-", n_layers=1, gdn=GDN, norm_eps=1e-5, **dict(ATTN, qk_norm=False)),
             "pattern": tiny(pattern="GG-*-", n_layers=1, gdn=GDN, norm_eps=1e-5, **ATTN),
             "both G and *": tiny(pattern="G-", n_layers=2, gdn=GDN, norm_eps=1e-5)}
    for key, mc in cases.items():
        sd = build_model(mc, seed=0).state_dict()
        with pytest.raises(UserError) as e:
            choose(mc, sd)
        msg = str(e.value)
        print(msg)
        assert "\n" not in msg and "Qwen3NextForCausalLM" in msg and (key in msg or key == "pattern"), msg
    mc = tiny(pattern="GE*-", n_layers=1, gdn=GDN, norm_eps=1e-5, moe=MOE, qk_norm=True, tie_embeddings=True)
    assert choose(mc, build_model(mc, seed=0).state_dict())[0].hf_class == "Qwen3NextForCausalLM"
    with pytest.raises(UserError, match="remote-code always"):  # the remote code has no GDN
        choose(mc, build_model(mc, seed=0).state_dict(), "always")


def test_import_of_published_shape_config(tmp_path):
    """transformers' Qwen3NextConfig defaults (Qwen3-Next-80B-A3B, shrunk in width) map to
    the 'GEGEGE*E' pattern with the published attention options."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    hf_cfg = Qwen3NextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=8, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                             shared_expert_intermediate_size=8, intermediate_size=24)
    torch.manual_seed(0)
    hf = Qwen3NextForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg, model, _ = load_for_inference(str(import_model(str(tmp_path / "hf"), str(tmp_path / "imp"))))
    mc = cfg.model
    assert (mc.pattern, mc.n_layers, mc.partial_rotary_factor) == ("GEGEGE*E", 2, 0.25)
    assert mc.qk_norm and mc.attn_output_gate and mc.moe.n_shared_experts == 1 and mc.moe.shared_expert_gate
    x = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = (model(x) - hf(x).logits).abs().max().item()
    print(f"imported HF-initialised model: max |logit difference| {d:.1e}")
    assert d < 1e-4
