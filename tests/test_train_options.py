"""Training-loop options on a tiny model: accumulation, recomputation, compile, bf16, schedules."""

import copy
import json

import pytest
import torch

from models.config import ModelConfig
from models.transformer import build_model
from parallel import World, parallelize
from pretrain.config import OptimConfig
from pretrain.metrics import MetricsWriter, Progress
from pretrain.optim import lr_factor
from pretrain.train import split_micro_batches


def tiny_model(**kw):
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, **kw)
    return build_model(cfg, seed=1)


def batch(rows=8, seq=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (rows, seq + 1), generator=g)
    doc = torch.zeros(rows, seq, dtype=torch.long)
    doc[:, seq // 2:] = 1
    return {"input_ids": x[:, :-1], "labels": x[:, 1:], "doc_ids": doc}


def grads_after(model, micro=0, **pkw):
    runner = parallelize(model, model_pcfg(), World(), **pkw)
    loss = runner.forward_backward(split_micro_batches(batch(), micro))
    return float(loss), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                         for n, p in model.named_parameters()}


def model_pcfg():
    from parallel.config import ParallelConfig

    return ParallelConfig()


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=n)


def test_gradient_accumulation_equals_full_batch():
    base = grads_after(tiny_model())
    assert_same(grads_after(tiny_model(), micro=2), base)
    assert_same(grads_after(tiny_model(), micro=4), base)


@pytest.mark.parametrize("mode", ["full", "every_n"])
def test_activation_checkpointing_same_result(mode):
    base = grads_after(tiny_model())
    assert_same(grads_after(tiny_model(), ac=mode, ac_every=2), base)


def test_bf16_autocast_close_to_fp32():
    l32, _ = grads_after(tiny_model())
    l16, g16 = grads_after(tiny_model(), autocast_dtype=torch.bfloat16)
    assert abs(l16 - l32) / l32 < 0.02
    assert all(torch.isfinite(g).all() for g in g16.values())


def test_fused_loss_same_result():
    base = grads_after(tiny_model())
    assert_same(grads_after(tiny_model(), fused_loss=True), base, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_compile_same_loss():
    base = grads_after(tiny_model())
    assert_same(grads_after(tiny_model(), compile=True), base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    oc = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, 100, oc) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "cosine":
        assert f[99] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[10:], f[11:]))
    elif schedule == "wsd":
        assert f[79] == 1.0 and f[99] == pytest.approx(0.1) and f[90] < 1.0
    else:
        assert f[10:] == [1.0] * 90


def test_metrics_jsonl_tensorboard_and_plain_progress(tmp_path, capsys):
    w = MetricsWriter(tmp_path, tensorboard=True)
    rec = {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens": 10, "tokens_per_sec": 100.0,
           "mfu": None}
    w.write(rec)
    w.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == rec
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    p = Progress(total=3, initial=0, mode="auto", enabled=True)  # not a terminal here: plain lines
    p.update(1, 3, rec)
    assert "step 1/3 loss 2.5000" in capsys.readouterr().out
