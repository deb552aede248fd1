"""Hugging Face export/import of dense models: logits and greedy generation match transformers,
the tokenizer round-trips, bf16 and sharded weights, import/export round trips, remote code
for ladder residual and Peri-LN, and the user errors."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig, RopeScalingConfig
from models.transformer import build_model
from parallel.world import World
from pretrain.checkpoint import save_checkpoint
from pretrain.config import Config, config_yaml
from pretrain.errors import UserError
from pretrain.evaluate import load_for_inference, sample
from pretrain.hf.export import export_checkpoint
from pretrain.hf.import_hf import import_model

from hf_sharp import LOGIT_TOL, check_sharp, sharpen

pytestmark = pytest.mark.filterwarnings("ignore")
VOCAB = 320


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def make_checkpoint(run_dir: Path, mc: ModelConfig, tokenizer: Path | None, steps: int = 3):
    """A few AdamW steps on random tokens, weights sharpened, then a checkpoint; returns (model, step dir)."""
    torch.manual_seed(0)
    model = build_model(mc, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, mc.vocab_size, (2, 17))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    sharpen(model)  # sharp attention, sublayers that matter: see tests/hf_sharp.py
    cfg = Config(model=mc)
    cfg.data.seq_len = min(32, mc.max_seq_len)
    text = config_yaml(cfg)
    path = save_checkpoint(run_dir, steps, [model], opt, {"step": steps}, World(), text,
                           str(tokenizer) if tokenizer else None)
    return model.eval(), path


def hf_model(out: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def max_diff(ours, theirs, x) -> float:
    with torch.no_grad():
        return (ours(x).float() - theirs(x).logits.float()).abs().max().item()


def safetensors_in(out: Path) -> dict:
    from pretrain.hf.arch_io import read_hf_weights

    return read_hf_weights(out)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from pretrain.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    rnd = random.Random(0)
    words = "the quick brown fox jumps over lazy dog def class return import self value if else".split()
    lines = [" " * rnd.choice([0, 4, 8]) + " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 8)))
             + rnd.choice(["", ":", ",", ".", "()"]) for _ in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    return train_tokenizer([str(d / "corpus.txt")], d / "tok", vocab_size=300)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer):
    """A trained tiny Llama-shaped model (GQA, tied embeddings), its checkpoint and fp32 export."""
    d = tmp_path_factory.mktemp("dense")
    model, ckpt = make_checkpoint(d / "run", tiny(tie_embeddings=True, rope_theta=5000.0), tokenizer)
    summary = export_checkpoint(str(ckpt), str(d / "hf"))
    return model, ckpt, d / "hf", summary


def test_llama_export_matches_logits_and_greedy_generation(dense):
    model, _, out, summary = dense
    assert summary["architecture"] == "LlamaForCausalLM" and not summary["remote_code"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 5000.0 and cfg["max_position_embeddings"] == 64
    assert "lm_head.weight" not in safetensors_in(out)
    hf = hf_model(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    check_sharp(model, x, "LlamaForCausalLM")
    d = max_diff(model, hf, x)
    print(f"LlamaForCausalLM: max |logit difference| {d:.2e}, logit std {model(x).std().item():.2f}")
    assert d < LOGIT_TOL, d
    prompt = x[0, :6]
    ours = sample(model, prompt.tolist(), 16, greedy=True)
    theirs = hf.generate(prompt[None], max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert theirs[0].tolist() == ours
    readme = (out / "README.md").read_text()
    assert "Document masking" in readme and "single document" in readme
    # the classic RoPE export bug (interleaved instead of rotate-half pairs) is far outside
    # the tolerance on these weights
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    perm = torch.arange(hd).view(2, hd // 2).t().flatten()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = proj.weight.view(-1, hd, proj.weight.shape[1])
                w.copy_(w[:, perm])
    assert max_diff(model, hf, x) > 1e4 * LOGIT_TOL  # 6.5 here; 2.7e-3 on unsharpened weights


def test_tokenizer_round_trip(dense, tokenizer):
    from transformers import AutoTokenizer

    from pretrain.data.tokenizer import Tokenizer

    _, _, out, _ = dense
    ours = Tokenizer(tokenizer)
    hf = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaTokenizerFast"
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert not hf.add_bos_token and not hf.add_eos_token
    texts = ["the quick brown fox", " leading space", "def f(x):\n    return x + 1\n\n\n",
             "tabs\tand  double  spaces  ", "ünïcødé 日本語 🙂 émoji", "12345 67.8", "x\r\ny", "",
             "        self.value = import\n    if lazy: return dog()\n"]
    corpus = (tokenizer.parent / "corpus.txt").read_text()
    rnd = random.Random(2)
    texts += [corpus[i:i + rnd.randrange(1, 200)] for i in (rnd.randrange(len(corpus)) for _ in range(50))]
    for text in texts:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, repr(text)
        assert hf.decode(ids) == text == ours.decode(ids), repr(text)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)


def test_bf16_and_sharded_exports(dense, tmp_path):
    from safetensors import safe_open

    model, ckpt, _, _ = dense
    export_checkpoint(str(ckpt), str(tmp_path / "bf16"), dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    x = torch.randint(0, VOCAB, (1, 16))
    assert max_diff(model, hf_model(tmp_path / "bf16").float(), x) < 0.1  # bf16 rounding only

    out = tmp_path / "sharded"
    export_checkpoint(str(ckpt), str(out), max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / "model.safetensors").exists()
    assert max_diff(model, hf_model(out), x) < 1e-4


def test_import_export_round_trip_is_byte_identical(dense, tmp_path):
    model, _, out, _ = dense
    step0 = import_model(str(out), str(tmp_path / "imported"))
    assert step0.name == "step_0"
    for name in ("meta.json", "trainer_state.json", "config.yaml", "tokenizer.model", ".metadata"):
        assert (step0 / name).is_file(), name
    assert json.loads((step0 / "trainer_state.json").read_text())["step"] == 0
    _, again, _ = load_for_inference(str(step0))
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    export_checkpoint(str(step0), str(tmp_path / "again"))
    a, b = safetensors_in(out), safetensors_in(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_import_transformers_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      rope_theta=20000.0, rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases (the o_proj bias must stay zero)
        for name, p in hf.named_parameters():
            if "norm" in name or ("bias" in name and "o_proj" not in name):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "llama")
    step0 = import_model(str(tmp_path / "llama"), str(tmp_path / "ckpt"))
    _, ours, _ = load_for_inference(str(step0))
    assert ours.cfg.head_dim == 16 and ours.cfg.qkv_bias and ours.cfg.n_kv_heads_resolved == 2
    x = torch.randint(0, 128, (2, 20))
    assert max_diff(ours, hf, x) < 1e-4


@pytest.mark.parametrize("kw", [dict(residual="ladder", ladder_from=1), dict(norm="peri", qkv_bias=True),
                                dict(norm="peri", rope_scaling=RopeScalingConfig(type="yarn", factor=4.0,
                                                                                 original_max_seq_len=16))],
                         ids=["ladder", "peri_ln", "peri_ln_yarn"])
def test_remote_code_export(kw, tmp_path, tokenizer):
    model, ckpt = make_checkpoint(tmp_path / "run", tiny(**kw), tokenizer, steps=2)
    with pytest.raises(UserError, match="ladder residual" if "residual" in kw else "Peri-LN"):
        export_checkpoint(str(ckpt), str(tmp_path / "never"), remote_code="never")
    assert not (tmp_path / "never").exists()
    summary = export_checkpoint(str(ckpt), str(tmp_path / "hf"))
    assert summary["remote_code"] and summary["architecture"] == "PretrainLMForCausalLM"
    assert summary["notes"] and "remote code" in summary["notes"][0]
    code = (tmp_path / "hf" / "modeling_pretrain_lm.py").read_text()
    assert "import pretrain" not in code and "from models" not in code and "import kernels" not in code
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"]
    hf = hf_model(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    check_sharp(model, x, f"PretrainLMForCausalLM ({'ladder' if 'residual' in kw else 'Peri-LN'})")
    d = max_diff(model, hf, x)
    print(f"PretrainLMForCausalLM: max |logit difference| {d:.2e}, logit std {model(x).std().item():.2f}")
    assert d < LOGIT_TOL, d
    prompt = x[0, :5]
    theirs = hf.generate(prompt[None], max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert theirs[0].tolist() == sample(model, prompt.tolist(), 16, greedy=True)
    # and back: the remote-code export imports to the same model
    _, again, _ = load_for_inference(str(import_model(str(tmp_path / "hf"), str(tmp_path / "imp"))))
    assert again.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_user_errors(dense, tmp_path):
    from pretrain.cli import main as cli

    _, ckpt, out, _ = dense
    with pytest.raises(UserError, match="not found"):
        export_checkpoint(str(tmp_path / "nope" / "step_5"), str(tmp_path / "o1"))
    broken = tmp_path / "run" / "checkpoints" / "step_1"
    broken.mkdir(parents=True)
    (broken / ".metadata").write_bytes(b"")
    with pytest.raises(UserError, match="incomplete"):
        export_checkpoint(str(broken), str(tmp_path / "o2"))
    with pytest.raises(UserError, match="not empty"):
        export_checkpoint(str(ckpt), str(out))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UserError, match="cannot import architecture 'GPT2LMHeadModel'"):
        import_model(str(gpt2), str(tmp_path / "o3"))
    assert cli(["import-hf", "--model", str(gpt2), "--out", str(tmp_path / "o4")]) == 2
    assert cli(["export", "--checkpoint", str(broken), "--out", str(tmp_path / "o5")]) == 2
    assert not (tmp_path / "o5").exists()
