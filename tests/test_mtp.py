"""Multi-token prediction (models/mtp.py, parallel/mtp.py): targets, the off switch, a run,
FLOPs/parameter counts, export and refused layouts. Multi-process parity: tests/test_parity.py
(``-k mtp``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.config import ModelConfig, UserError
from models.transformer import build_model

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def _batch(S: int = 12, B: int = 2, vocab: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, S + 1), generator=g)
    labels = x[:, 1:].clone()
    labels[0, 5] = labels[1, S - 2] = -100  # padding-like positions: no target there
    doc_ids = torch.zeros(B, S, dtype=torch.long)
    doc_ids[0, 7:] = 1  # a packed second document in row 0
    return x[:, :-1], labels, doc_ids


def test_depth_losses_are_cross_entropy_against_token_i_plus_1_plus_k():
    """Each depth recomputed as DeepSeek-V3 defines it, on truncated sequences: module k
    reads h^{k-1}_{1:S-k} and Emb(t_{k+1:S}); its logits at position i are scored against
    token i+1+k, positions whose target lies past the row or is ignored excluded."""
    model = build_model(ModelConfig(**TINY, mtp_depth=2, mtp_loss_weight=0.5))
    x, labels, doc_ids = _batch()
    S = x.shape[1]
    model(x, doc_ids, mtp_labels=labels)
    got = model.mtp_depth_losses
    total = model.mtp_loss
    with torch.no_grad():
        emb = model.tok_embeddings(x)
        h, _ = model.run_stack(emb, model.make_context(S, x.device, doc_ids), None)
        for k, module in enumerate(model.mtp, start=1):
            n = S - k
            ctx = model.make_context(n, x.device, doc_ids[:, :n])
            h, normed = module(h[:, :n], emb[:, k:], ctx)
            logits = model.output(normed)  # [B, S-k, V]: position i predicts token i+1+k
            want, count = 0.0, 0
            for b in range(x.shape[0]):
                for i in range(n):
                    target = int(labels[b, i + k])  # labels[i + k] is token i + 1 + k
                    if target != -100:
                        want += float(F.cross_entropy(logits[b, i][None], torch.tensor([target])))
                        count += 1
            assert count == x.shape[0] * n - 2  # both ignored labels fall inside
            assert abs(float(got[k - 1]) - want / count) < 1e-5, (k, float(got[k - 1]), want / count)
    assert abs(float(total.detach()) - 0.5 / 2 * sum(float(v) for v in got)) < 1e-6


def test_mtp_off_is_bit_identical_and_main_path_unchanged():
    """mtp_depth=0 (whatever the other MTP keys say) builds the same model as before, and
    with mtp_depth > 0 the main logits are unchanged (parameters are initialised by name)."""
    from pretrain.flops import train_flops_per_token
    from pretrain.planner.model_stats import total_params

    x, labels, doc_ids = _batch()
    base = build_model(ModelConfig(**TINY))
    off = build_model(ModelConfig(**TINY, mtp_depth=0, mtp_loss_weight=0.9, mtp_pattern="*E"))
    on = build_model(ModelConfig(**TINY, mtp_depth=2))
    assert base.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in base.state_dict().items())
    assert off.mtp is None
    ref = base(x, doc_ids)
    assert torch.equal(ref, off(x, doc_ids, mtp_labels=labels)) and off.mtp_loss is None
    assert torch.equal(ref, on(x, doc_ids, mtp_labels=labels))
    for n, v in base.state_dict().items():
        assert torch.equal(v, on.state_dict()[n])
    assert {n.split(".")[0] for n in on.state_dict().keys() - base.state_dict().keys()} == {"mtp"}
    a, b = ModelConfig(**TINY), ModelConfig(**TINY, mtp_depth=0, mtp_pattern="-")
    assert train_flops_per_token(a, 16) == train_flops_per_token(b, 16)
    assert total_params(a) == total_params(b)


def test_runner_loss_and_gradients_match_the_model():
    """The runner adds lambda/D * sum of depth losses to the main loss (one process), and
    every MTP parameter and the shared embedding get gradients from it."""
    from parallel import ParallelConfig, build_world, parallelize

    cfg = ModelConfig(**TINY, mtp_depth=2)
    x, labels, doc_ids = _batch()
    runner = parallelize(build_model(cfg), ParallelConfig(), build_world(ParallelConfig(), 0, 1, 0, torch.device("cpu")))
    loss = runner.forward_backward([{"input_ids": x, "labels": labels, "doc_ids": doc_ids}])
    model = build_model(cfg)
    logits = model(x, doc_ids, mtp_labels=labels)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + model.mtp_loss
    assert abs(float(loss) - float(want.detach())) < 1e-5
    grads = {n: p.grad for n, p in runner.model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("mtp."))
    from parallel.mtp import mtp_metrics

    m = mtp_metrics(runner, {"loss": float(loss)})
    assert abs(m["loss"] - float(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))) < 1e-5
    assert m["loss_total"] == float(loss) and set(m) == {"mtp_loss_1", "mtp_loss_2", "loss", "loss_total"}


def test_flops_and_params_count_the_mtp_modules():
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.flops import cpu_attention_flop_mapping, forward_flops_per_token
    from pretrain.planner.model_stats import total_params

    cfg = ModelConfig(**TINY, mtp_depth=2)
    model = build_model(cfg)
    x, labels, doc_ids = _batch(S=16)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_mapping()) as fwd:
        model(x, doc_ids, mtp_labels=labels)
    measured = fwd.get_total_flops() / x.numel()
    assert abs(measured - forward_flops_per_token(cfg, 16)) / measured < 0.02
    assert forward_flops_per_token(cfg, 16) > 1.5 * forward_flops_per_token(dataclasses.replace(cfg, mtp_depth=0), 16)
    assert total_params(cfg) == model.num_params()


def test_hf_export_llama_drops_mtp_and_remote_code_keeps_it(tmp_path):
    """A checkpoint of a model with MTP exports to LlamaForCausalLM without the MTP weights
    (same logits), and with remote code keeping them, so ``pretrain import`` restores them."""
    import warnings

    import yaml
    from transformers import AutoModelForCausalLM

    from parallel.world import World
    from pretrain.checkpoint import save_checkpoint
    from pretrain.config import Config, _plain
    from pretrain.evaluate import load_for_inference
    from pretrain.hf.export import export_checkpoint
    from pretrain.hf.import_hf import import_model

    mc = ModelConfig(**{**TINY, "vocab_size": 128}, mtp_depth=1)
    model = build_model(mc, seed=1)
    cfg = Config(model=mc)
    cfg.data.seq_len = 16
    text = yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)
    ckpt = save_checkpoint(tmp_path / "run", 1, [model], None, {"step": 1}, World(), text, None)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for mode, cls in (("never", "LlamaForCausalLM"), ("always", "PretrainLMForCausalLM")):
        summary = export_checkpoint(str(ckpt), str(tmp_path / mode), remote_code=mode)
        assert summary["architecture"] == cls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(tmp_path / mode, trust_remote_code=True).eval()
        assert not any("mtp" in n for n, _ in hf.named_parameters())
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max() < 1e-4
    _, back, _ = load_for_inference(str(import_model(str(tmp_path / "always"), str(tmp_path / "imp"))))
    assert back.cfg.mtp_depth == 1
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items() if k.startswith("mtp."))


@pytest.mark.parametrize("layout, msg", [
    (dict(cp=2), "parallel.cp > 1"),
    (dict(tp=2, sequence_parallel=True), "parallel.sequence_parallel"),
    (dict(dp_engine="deepspeed"), "parallel.dp_engine=deepspeed"),
])
def test_unsupported_layouts_are_refused(layout, msg):
    from parallel import ParallelConfig
    from parallel.mtp import check_mtp

    pcfg = ParallelConfig(**layout)
    world = type("W", (), {"cp_size": layout.get("cp", 1), "tp_size": layout.get("tp", 1)})()
    with pytest.raises(UserError, match=msg):
        check_mtp(ModelConfig(**TINY, mtp_depth=1), pcfg, world)
    check_mtp(ModelConfig(**TINY), pcfg, world)  # off: nothing to refuse


def test_bad_mtp_pattern_is_a_config_error():
    with pytest.raises(UserError, match="model.mtp_pattern"):
        ModelConfig(**TINY, mtp_depth=1, mtp_pattern="*|-").validate()


@pytest.mark.timeout(300)
def test_tiny_run_logs_falling_mtp_losses(tiny_dataset, tmp_path):
    from conftest import tiny_overrides
    from pretrain.config import load_config
    from pretrain.metrics import read_metrics
    from pretrain.train import train

    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(tiny_dataset, run, **{
        "train.steps": 12, "checkpoint.every": 0, "model.mtp_depth": 2, "optim.lr": 3e-3})))
    recs = read_metrics(run)
    for r in recs:
        want = r["loss"] + 0.3 / 2 * (r["mtp_loss_1"] + r["mtp_loss_2"])
        assert abs(r["loss_total"] - want) < 1e-6 * want
    for key in ("loss", "mtp_loss_1", "mtp_loss_2"):
        first, last = recs[0][key], recs[-1][key]
        print(f"{key}: {first:.3f} -> {last:.3f}")
        assert last < first - 0.5, (key, first, last)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_dry_run_counts_match_the_planner(layout):
    """``pretrain plan --dry-run``: the parallelised meta model's parameters per rank (MTP
    modules on the last stage, split over tp) equal the planner's prediction."""
    from pretrain.config import load_config
    from pretrain.planner.dryrun import dry_run
    from pretrain.planner.layout import config_layout
    from pretrain.planner.memory import local_param_counts

    over = [f"--parallel.{k}={v}" for k, v in layout.items()] + ["--parallel.dp_shard=1", "--model.mtp_depth=2"]
    cfg = load_config("tiny", over)
    exact = dry_run(cfg, 2)
    predicted = local_param_counts(cfg.model, config_layout(cfg, 2))
    assert [r["params"] for r in exact] == [p["sharded"] for p in predicted]
    plain = local_param_counts(load_config("tiny", over[:-1]).model, config_layout(cfg, 2))
    assert predicted[-1]["sharded"] > plain[-1]["sharded"]  # the MTP modules: last stage only
    if len(predicted) > 1:
        assert predicted[0]["sharded"] == plain[0]["sharded"]


def test_last_stage_without_attention_still_gets_rope():
    """Pipeline split with the stack's attention all on the first stage: the last stage's
    MTP block still attends with RoPE (stages run in one process, no schedule)."""
    from parallel.head import accept_stage_inputs
    from parallel.init import materialize
    from parallel.pipeline import build_stage_model

    cfg = ModelConfig(**TINY, mtp_depth=1)
    x, labels, doc_ids = _batch()
    full = build_model(cfg)
    meta = build_model(cfg, init=False)
    first, last = build_stage_model(meta, [0, 1, 2], True, False), build_stage_model(meta, [3], False, True)
    for part in (first, last):
        materialize(part, torch.device("cpu"), 0)
        accept_stage_inputs(part)
    assert [l.kind for l in last.layers.values()] == ["mlp"]
    want = full(x, doc_ids=doc_ids, mtp_labels=labels)
    got = last(*first(x, doc_ids=doc_ids, mtp_labels=labels), doc_ids=doc_ids, mtp_labels=labels)
    assert torch.equal(want, got)
    assert torch.equal(full.mtp_depth_losses[0], last.mtp_depth_losses[0])


MORE_LAYOUTS = None  # the "ci": False MTP jobs of tests/parity_matrix.py (filled on first use)


def _more_layouts() -> list[dict]:
    global MORE_LAYOUTS
    if MORE_LAYOUTS is None:
        import sys

        from conftest import ROOT

        sys.path.insert(0, str(ROOT / "tests"))
        import parity_matrix

        ci = {j["name"] for j in parity_matrix.mtp_jobs()}
        MORE_LAYOUTS = [j for j in parity_matrix.mtp_jobs(ci=False) if j["name"] not in ci]
    return MORE_LAYOUTS


@pytest.fixture(scope="module")
def more_layout_results(parity_tokens, tmp_path_factory, request):
    import parity
    from torchrun_jobs import run_jobs

    wanted = {item.callspec.params.get("name") for item in request.session.items if hasattr(item, "callspec")}
    refs = parity.References(tmp_path_factory.mktemp("mtp_refs"), parity_tokens)
    jobs = [{**j, "tokens": refs.tokens, "ref": str(refs.path(j))} for j in _more_layouts() if j["name"] in wanted]
    out = {}
    for world in sorted({j["world"] for j in jobs}):
        batch = [j for j in jobs if j["world"] == world]
        out.update(run_jobs("parity_worker.py", world, batch, tmp_path_factory.mktemp("mtp_more"),
                            timeout=120 + 240 * len(batch)))
    return refs, out


@pytest.mark.parity
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("name", [j["name"] for j in _more_layouts()])
def test_mtp_more_layouts_match_one_process(more_layout_results, name):
    """``make parity``: MTP under the interleaved and zero-bubble pipeline schedules, a
    DeepSeek-V3-shaped MoE model with an MoE MTP block under ep=2, and ladder residual
    under tp=2: per-step loss, every step-1 gradient by name (the MTP modules' among them)
    and the final weights match one process (tests/parity.py's tolerances)."""
    import parity

    refs, results = more_layout_results
    job = next(j for j in _more_layouts() if j["name"] == name)
    res = results[name]
    assert "refused" not in res, f"{name}: the trainer refused {job['layout']}: {res['refused']}"
    assert "error" not in res, res.get("trace", res)
    parity.check(name, res, refs.floor(job))
    assert any(k.startswith("mtp.0.") for k in refs.ref(job)["grads"])
