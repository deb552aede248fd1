"""MLA + MoE models <-> transformers' DeepseekV3ForCausalLM: fp32 logits and greedy generation
equal on sharp weights, the MTP module in DeepSeek-V3's layout (layer ``num_hidden_layers``)
and back on import, refusals in one line; the DeepSeek-V3 presets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from models.config import MLAConfig, MoEConfig, ModelConfig, RopeScalingConfig
from models.transformer import build_model
from parallel.world import World
from pretrain.checkpoint import save_checkpoint
from pretrain.config import Config, config_yaml
from pretrain.errors import UserError
from pretrain.evaluate import load_for_inference, sample
from pretrain.hf.export import export_checkpoint
from pretrain.hf.import_hf import import_model

from hf_sharp import LOGIT_TOL, QK_GAIN, check_sharp, sharpen

pytestmark = pytest.mark.filterwarnings("ignore")
VOCAB = 96
ROUTING = dict(n_experts=8, top_k=3, ffn_hidden=16, score_fn="sigmoid", renormalize=True, routed_scaling_factor=2.5,
               n_groups=4, topk_groups=2, n_shared_experts=1, expert_impl="loop")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


def tiny(q_lora: int = 16, **kw) -> ModelConfig:
    """A dense layer then MoE layers, MLA with q-LoRA (or not), YaRN with DeepSeek's mscale."""
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=1, pattern="*-*E*E", n_heads=4, ffn_hidden=48,
                max_seq_len=32, norm_eps=1e-6, attention="mla",
                rope_scaling=RopeScalingConfig(type="yarn", factor=2.0, original_max_seq_len=16, attention_factor=1.0),
                mla=MLAConfig(q_lora_rank=q_lora, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8,
                              v_head_dim=6, mscale_all_dim=1.0),
                moe=MoEConfig(**ROUTING))
    base.update(kw)
    return ModelConfig(**base)


@torch.no_grad()
def sharpen_mla(model) -> None:
    """hf_sharp's ``sharpen`` plus its query/key gain on MLA's q and k projections (q and the
    latent are normed, so the gain goes on the matrices after the norms and on the rope key)."""
    sharpen(model)
    for name, p in model.named_parameters():
        if name.endswith(("mixer.wq.weight", "mixer.wq_b.weight", "mixer.wkv_b.weight", "mixer.wkv_a.weight")):
            p.mul_(QK_GAIN)


def checkpoint(run_dir: Path, mc: ModelConfig):
    """A few AdamW steps, sharp weights, a non-zero balancing bias; returns (model, step dir)."""
    torch.manual_seed(0)
    model = build_model(mc, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        x = torch.randint(0, VOCAB, (2, 13))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    sharpen_mla(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):  # moves choices (sigmoid scores are in (0, 1))
                b.copy_(torch.rand(b.shape, generator=g) * 0.5)
    cfg = Config(model=mc)
    cfg.data.seq_len = 16
    return model.eval(), save_checkpoint(run_dir, 2, [model], opt, {"step": 2}, World(), config_yaml(cfg))


def load_hf(out: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(out).eval()


def logit_diff(ours, hf, x) -> float:
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


@pytest.mark.parametrize("q_lora,mtp", [(16, 1), (0, 0), (16, 2)], ids=["qlora_mtp1", "plain_q", "qlora_mtp2"])
def test_export_equals_transformers_and_round_trips(tmp_path, q_lora, mtp):
    mc = tiny(q_lora, mtp_depth=mtp, mtp_pattern="*E")
    model, ckpt = checkpoint(tmp_path / "run", mc)
    s = export_checkpoint(str(ckpt), str(tmp_path / "hf"))
    assert s["architecture"] == "DeepseekV3ForCausalLM" and not s["remote_code"], s
    if mtp == 1:  # the training-time export (checkpoint.hf_every; meta tensors first) writes the same bytes
        from pretrain.hf.live_export import export_live

        cfg = Config(model=mc)
        cfg.data.seq_len = 16
        live = export_live(tmp_path / "run", 2, [model], cfg, World(), None)
        for f in ("model.safetensors", "config.json"):
            assert (live / f).read_bytes() == (tmp_path / "hf" / f).read_bytes(), f
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    check_sharp(model, x, "deepseek_v3")
    d = logit_diff(model, hf, x)
    print(f"DeepseekV3 (q_lora {q_lora}, mtp {mtp}): max |logit difference| {d:.2e}, "
          f"logit std {model(x).std().item():.2f}")
    assert d < LOGIT_TOL, d
    with torch.no_grad():  # the balancing bias is exercised: without it the logits differ
        biases = [b for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias")]
        kept = [b.clone() for b in biases]
        for b in biases:
            b.zero_()
        assert (hf(x).logits - model(x)).abs().max() > 100 * LOGIT_TOL
        for b, k in zip(biases, kept):
            b.copy_(k)
    out = hf.generate(x[:1, :4], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0].tolist() == sample(model, x[0, :4].tolist(), 16, greedy=True)

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    got = (cfg["first_k_dense_replace"], cfg["num_nextn_predict_layers"], cfg["routed_scaling_factor"])
    assert got == (1, mtp, 2.5), got
    assert cfg["rope_scaling"]["mscale"] == cfg["rope_scaling"]["mscale_all_dim"] == 1.0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for k in range(mtp):  # DeepSeek-V3's MTP layout: layer num_hidden_layers + k
        assert {f"model.layers.{3 + k}.{n}" for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight",
                "shared_head.norm.weight", "shared_head.head.weight", "embed_tokens.weight",
                "mlp.gate.e_score_correction_bias", "self_attn.kv_b_proj.weight")} <= names
    assert not any(n.startswith(f"model.layers.{3 + mtp}.") for n in names)

    # import gives back every tensor, the MTP modules' included
    _, again, _ = load_for_inference(str(import_model(str(tmp_path / "hf"), str(tmp_path / "imp"))))
    assert again.cfg.mtp_depth == mtp and again.cfg.moe.routed_scaling_factor == 2.5
    want, got = model.state_dict(), again.state_dict()
    assert set(got) == set(want)
    bad = [k for k in want if not torch.equal(want[k], got[k])]
    assert not bad, bad


def test_mtp_layer_computes_deepseek_v3_mtp_with_transformers_modules(tmp_path):
    """The exported MTP layer, run as DeepSeek-V3 defines it with transformers' own decoder
    layer and norms (eh_proj([enorm(emb(t+1)); hnorm(h)]), layer, shared_head), gives our
    MTP module's logits: the layout and the concatenation order are DeepSeek's."""
    from safetensors.torch import load_file
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    mc = tiny(16, mtp_depth=1, mtp_pattern="*E")
    model, ckpt = checkpoint(tmp_path / "run", mc)
    export_checkpoint(str(ckpt), str(tmp_path / "hf"))
    hf = load_hf(tmp_path / "hf")
    w = {k[len("model.layers.3."):]: v for k, v in load_file(str(tmp_path / "hf" / "model.safetensors")).items()
         if k.startswith("model.layers.3.")}
    layer = DeepseekV3DecoderLayer(hf.config, 3).eval()
    layer.load_state_dict({k: v for k, v in w.items() if k.split(".")[0] in (
        "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")})
    enorm, hnorm, head_norm = (DeepseekV3RMSNorm(32, mc.norm_eps) for _ in range(3))
    for n, mod in (("enorm", enorm), ("hnorm", hnorm), ("shared_head.norm", head_norm)):
        mod.weight.data.copy_(w[f"{n}.weight"])
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        seen = []  # the last decoder layer's output: the stack before the final norm
        hook = hf.model.layers[-1].register_forward_hook(
            lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        hf.model(x)
        hook.remove()
        h = seen[0]
        emb = torch.nn.functional.pad(hf.model.embed_tokens(x[:, 1:]), (0, 0, 0, 1))
        y = torch.cat([enorm(emb), hnorm(h)], -1) @ w["eh_proj.weight"].t()
        pos = torch.arange(20)[None]
        y = layer(y, position_embeddings=hf.model.rotary_emb(y, pos), attention_mask=None, position_ids=pos)
        want = head_norm(y) @ w["shared_head.head.weight"].t()
        # ours: the MTP module's hidden state from h^0 (the stack's output before the final norm)
        emb0 = model.tok_embeddings(x)
        ctx = model.make_context(20, "cpu", None)
        hid = emb0
        for layer_ in model.layers.values():
            hid = hid + layer_(hid, ctx)
        from models.mtp import shift_left

        _, normed = model.mtp[0](hid, shift_left(emb0, 1, 0.0), ctx)
        got = model.output(normed)
    assert torch.allclose(h, hid, atol=1e-4), (h - hid).abs().max()
    d = (got - want)[:, :-1].abs().max().item()  # (the last position has no t+1 token)
    print(f"MTP layer via transformers' modules: max |logit difference| {d:.2e}")
    assert d < LOGIT_TOL, d


def test_refusals_name_the_feature(tmp_path):
    cases = [
        (tiny(moe=MoEConfig(**{**ROUTING, "score_fn": "softmax"})), "score_fn=softmax"),
        (tiny(moe=MoEConfig(**{**ROUTING, "shared_expert_gate": True})), "shared_expert_gate"),
        (tiny(pattern="*E*-"), "dense layers after MoE layers"),
        (tiny(mtp_depth=1, mtp_pattern="*-"), "mtp_pattern"),
        (tiny(pattern="*-M"), "sublayer pattern"),
    ]
    for i, (mc, msg) in enumerate(cases):
        model = build_model(mc, seed=1)
        cfg = Config(model=mc)
        cfg.data.seq_len = 16
        ck = save_checkpoint(tmp_path / f"r{i}", 1, [model], None, {"step": 1}, World(), config_yaml(cfg))
        with pytest.raises(UserError, match=f"DeepseekV3ForCausalLM cannot represent.*{msg}"):
            export_checkpoint(str(ck), str(tmp_path / f"out{i}"))
        assert not (tmp_path / f"out{i}").exists()
    from pretrain.hf.registry import choose

    sd = build_model(tiny(), seed=1).state_dict()
    assert choose(tiny(), sd)[2] == []
    sd["layers.3.mixer.expert_bias"][2] = -0.1  # transformers' router may then choose differently
    assert "negative" in choose(tiny(), sd)[2][0]


def test_import_transformers_model_saved_without_mtp(tmp_path):
    """A DeepseekV3ForCausalLM saved by transformers (no q-LoRA, all-MoE, no shared expert,
    rope_interleave false) imports; a config naming an MTP layer whose weights are absent is
    refused in one line."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=0,
                           n_routed_experts=8, routed_scaling_factor=1.5, kv_lora_rank=12, q_lora_rank=None,
                           qk_rope_head_dim=8, v_head_dim=6, qk_nope_head_dim=8, n_group=2, topk_group=1,
                           num_experts_per_tok=2, first_k_dense_replace=0, norm_topk_prob=False,
                           max_position_embeddings=64, rope_interleave=False)
    hf = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape) * 0.3)
    hf.save_pretrained(tmp_path / "ds")
    _, ours, _ = load_for_inference(str(import_model(str(tmp_path / "ds"), str(tmp_path / "ck"))))
    assert ours.cfg.pattern == "*E" and ours.cfg.moe.n_shared_experts == 0 and not ours.cfg.moe.renormalize
    assert logit_diff(ours, hf, torch.randint(0, VOCAB, (2, 10))) < 1e-5
    c = json.loads((tmp_path / "ds" / "config.json").read_text())
    (tmp_path / "ds" / "config.json").write_text(json.dumps({**c, "num_nextn_predict_layers": 1}))
    with pytest.raises(UserError, match="model.layers.2.eh_proj.weight .*num_nextn_predict_layers=1"):
        import_model(str(tmp_path / "ds"), str(tmp_path / "ck2"))


@pytest.mark.timeout(300)
def test_tiny_preset_trains_and_exports_via_cli(tiny_dataset, tmp_path, capsys):
    """configs/deepseek_v3_tiny.yaml: the loss falls in a few CPU steps, and one
    ``pretrain export`` writes a DeepseekV3ForCausalLM with its MTP layer."""
    from conftest import tiny_overrides
    from pretrain import cli

    run = tmp_path / "run"
    ov = tiny_overrides(tiny_dataset, run, **{"train.steps": 10, "checkpoint.every": 10, "optim.lr": 3e-3})
    assert cli.main(["train", "deepseek_v3_tiny", *ov]) == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    with capsys.disabled():
        print("deepseek_v3_tiny losses", [round(v, 3) for v in losses], "mtp_loss_1", recs[-1].get("mtp_loss_1"))
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses
    assert "mtp_loss_1" in recs[-1]
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "as DeepseekV3ForCausalLM" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["num_nextn_predict_layers"] == 1


def test_full_preset_matches_published_config_and_fits_its_hardware():
    """configs/deepseek_v3.yaml exports DeepSeek-V3's published config.json fields, and its own
    layout (pp16 x ep64, 2048 H100s as its header says) fits per the planner."""
    from pretrain.config import load_config
    from pretrain.plan import _describe
    from pretrain.planner import hardware as hw
    from pretrain.planner.layout import config_layout, project_recipe, workload
    from pretrain.planner.search import evaluate

    cfg = load_config("deepseek_v3")
    dev = hw.get_device("h100", 8)
    plan = evaluate(cfg.model, config_layout(cfg, 2048), workload(cfg), dev, project_recipe(cfg), cfg)
    print(f"deepseek_v3 on 2048 x h100: {plan.layout.name}: {_describe(plan, dev)}")
    assert plan.fits, plan.problem
    from pretrain.hf.registry import choose
    from pretrain.planner.model_stats import active_params, total_params

    mc = load_config("deepseek_v3").model
    arch, issues, _ = choose(mc, {})
    assert arch.hf_class == "DeepseekV3ForCausalLM" and not issues
    got = arch.export_config(mc)
    published = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                     num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                     routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                     v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                     first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840,
                     rms_norm_eps=1e-6, rope_theta=10000.0, num_nextn_predict_layers=1, tie_word_embeddings=False)
    assert {k: got[k] for k in published} == published
    assert got["rope_scaling"] == dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                       beta_fast=32.0, beta_slow=1.0, truncate=True, mscale=1.0, mscale_all_dim=1.0)
    # DeepSeek's counts: 671B in the main model, 37B active per token; MTP adds a MoE layer + eh_proj
    total, active = total_params(mc), active_params(mc)
    print(f"deepseek_v3: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active")
    main = load_config("deepseek_v3", ["--model.mtp_depth=0"]).model
    assert total_params(main) == pytest.approx(671e9, rel=2e-3) and 37e9 < active_params(main) < 38e9
    assert 11e9 < total - total_params(main) < 12e9 and 0.6e9 < active - active_params(main) < 0.75e9
