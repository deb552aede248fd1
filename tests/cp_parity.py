"""Parity runs for context parallelism: one layout trained on real text, compared with the
same training in one process (loss per step, every gradient after step 1 by name, final
weights). Used in-process for the reference and under torchrun by tests/test_cp_worker.py.

Data: a token stream of the ``tiny_dataset`` fixture (stdlib source, 512-token BPE) cut into
rows of ``SEQ + 1`` tokens; documents (EOS-separated) cross the cp chunk boundaries.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEQ, ROWS, MICRO, STEPS = 1024, 2, 1, 10
MODELS = {
    "dense": dict(pattern="*-", n_layers=2),
    "mqa": dict(pattern="*-", n_layers=2, n_kv_heads=1),
    "ladder": dict(pattern="*-", n_layers=2, residual="ladder", ladder_from=1),
    "moe": dict(pattern="*E", n_layers=2, moe=dict(n_experts=4, top_k=2, aux_loss_coef=0.01,
                                                  z_loss_coef=0.001, bias_update_rate=0.001)),
    # recurrent mixers: state passing (parallel/cp_recurrent.py) wired through the trainer's path
    "hybrid": dict(pattern="M-*-", n_layers=1, mamba=dict(d_state=16, head_dim=16, n_groups=2, chunk_size=48)),
    "heads": dict(pattern="P-", n_layers=1, mamba=dict(d_state=16, head_dim=16, n_groups=2, chunk_size=48),
                  hybrid=dict(n_attn_heads=4, n_mamba_heads=4)),
    # Gated DeltaNet hybrid: 2 q/k heads, 4 value heads of 16 (state passing with delta-rule transitions)
    "gdn": dict(pattern="G-*-", n_layers=1, gdn=dict(n_heads=2, n_v_heads=4, head_k_dim=16, head_v_dim=16,
                                                    chunk_size=48)),
    # multi-head latent attention: q/k head dim 24 != v head dim 16 (v padded for the ring)
    "mla": dict(pattern="*-", n_layers=2, attention="mla",
                mla=dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
}
BASE = dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=SEQ, doc_mask=True)


def model_cfg(name: str):
    from models.config import MoEConfig, ModelConfig

    from models.config import GDNConfig, HybridHeadsConfig, MLAConfig, MambaConfig

    kw = {**BASE, **MODELS[name]}
    for key, cls in (("moe", MoEConfig), ("mamba", MambaConfig), ("hybrid", HybridHeadsConfig),
                     ("mla", MLAConfig), ("gdn", GDNConfig)):
        if isinstance(kw.get(key), dict):
            kw[key] = cls(**kw[key])
    return ModelConfig(**kw)


def write_tokens(data_dir: Path, out: Path, steps: int = STEPS) -> Path:
    """Save the token stream the runs read (read once here: opening the store is collective)."""
    import json

    import numpy as np

    from pretrain.data.store import open_dataset, read_block

    ds = open_dataset(str(data_dir))
    store = ds.store("train")
    need, parts, n, b = steps * ROWS * (SEQ + 1), [], 0, 0
    while n < need:
        blk = np.asarray(read_block(store, b)).astype(np.int64)
        parts.append(blk)
        n, b = n + len(blk), b + 1
    eos = int(json.loads((Path(data_dir) / "meta.json").read_text())["eos_id"])
    torch.save({"tokens": torch.from_numpy(np.concatenate(parts)[:need]), "eos": eos}, out)
    return out


def batches(data: dict, step: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This dp rank's micro-batches of step ``step`` (the same global batch for any layout)."""
    from pretrain.data.loader import doc_ids_of

    toks = data["tokens"].view(-1, ROWS, SEQ + 1)[step]
    rows = ROWS // dp_size
    x = toks[dp_rank * rows:(dp_rank + 1) * rows]
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    b = {"input_ids": inputs, "labels": labels, "doc_ids": doc_ids_of(inputs, data["eos"])}
    return [{k: v[i:i + MICRO] for k, v in b.items()} for i in range(0, rows, MICRO)]


def _full(p):
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()


def named(parts, grads: bool) -> dict:
    """Full tensors of every parameter (or its gradient) of this rank's parts, canonical names."""
    from parallel.init import canonical_name

    out = {}
    for part in parts:
        for name, p in part.named_parameters():
            t = p.grad if grads else p
            if grads and t is None:
                t = torch.zeros_like(p)
            out[canonical_name(name)] = _full(t)
    return out


def build(layout: dict, model: str, kw: dict):
    import torch.distributed as dist

    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    pcfg = ParallelConfig(**layout)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    if pcfg.mixed_precision == "bf16":  # bf16 compute as the trainer sets it (train.dtype)
        kw = {**kw, "autocast_dtype": torch.bfloat16}
    runner = parallelize(build_model(model_cfg(model), init=False), pcfg, world, seed=0, **kw)
    opt = build_optimizer(runner.parts, OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1))
    return runner, opt, world


def blockwise_attention(runner) -> None:
    """One process, attention through the ring's block arithmetic (one rank, no transfers):
    how far a different summation order alone moves the run (the noise floor)."""
    from kernels.reference import doc_segments
    from parallel.ring_attention import CPGroup, ring_attention

    def blockwise(ctx, seq_len, doc_ids):
        ctx.attention = lambda q, k, v, d: ring_attention(
            q, k, v, doc_segments(d) if d is not None else None, CPGroup(None))
        return ctx

    for part in runner.parts:
        part.context_hooks.append(blockwise)


def train(data: dict, layout: dict, model: str, steps: int, kw: dict | None = None,
          floor: bool = False, probe=None, save: tuple[str, int] | None = None) -> dict:
    """Loss per step, gradients after step 1 and final weights (full tensors by name).
    ``probe``: a ``parity_worker.ReduceDtypes`` recording step 1's gradient reduce dtypes;
    ``save = (dir, step)``: also checkpoint into ``dir`` after ``step`` steps (the resume
    tests load it: the run goes on unchanged, no second run just to write it)."""
    import time

    t0 = time.process_time()
    runner, opt, world = build(layout, model, kw or {})
    if floor:
        blockwise_attention(runner)
    losses, grads, times = [], None, {"build": time.process_time() - t0, "gather": 0.0}
    for step in range(steps):
        if probe is not None:
            probe.active = step == 0
        loss = runner.forward_backward(batches(data, step, world.dp_rank, world.dp_size))
        losses.append(runner.reduce_loss(loss))
        if step == 0:
            t1 = time.process_time()
            grads = named(runner.parts, grads=True)
            times["gather"] += time.process_time() - t1
            if probe is not None:  # and the gradients handed to the optimizer
                probe.seen.update(f"grad:{p.grad.dtype}" for part in runner.parts
                                  for p in part.parameters() if p.grad is not None)
        runner.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        runner.after_optimizer_step()
        if save is not None and step + 1 == save[1]:
            from pretrain import checkpoint as ckpt

            ckpt.save_checkpoint(save[0], save[1], runner.parts, opt, {"step": save[1]}, world, "x: 1\n")
    t1 = time.process_time()
    weights = named(runner.parts, grads=False)
    times["gather"] += time.process_time() - t1
    times["steps"] = time.process_time() - t0 - times["build"] - times["gather"]
    return {"loss": losses, "grads": grads, "weights": weights, "cpu": times}


def compare(got: dict, ref: dict) -> dict:
    """Largest loss difference and largest gradient / weight differences (absolute, and
    relative to the largest reference entry of the same tensor) over this rank's tensors."""
    out = {"loss": got["loss"], "names": sorted(got["grads"]), "cpu": got.get("cpu")}
    out["loss_diff"] = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    # the parity harness's relative measures (tests/parity.py: bf16 tolerances are in these)
    out["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(got["loss"], ref["loss"]))
    out["grads_l2"] = max(float((t - ref["grads"][n]).norm() / ref["grads"][n].norm().clamp_min(1e-12))
                          for n, t in got["grads"].items())
    for key in ("grads", "weights"):
        worst, rel = 0.0, 0.0
        for name, t in got[key].items():
            r = ref[key][name]
            d = float((t - r).abs().max())
            worst, rel = max(worst, d), max(rel, d / max(float(r.abs().max()), 1e-12))
        out[f"{key}_diff"], out[f"{key}_rel"] = worst, rel
    return out


def reference(tokens: str, model: str, save: tuple[str, int] | None = None) -> tuple[dict, dict]:
    """One process: the reference run of ``model`` and its noise floor (the same run with
    attention summed in the ring's block order) as ``(ref, floor numbers)``; ``save``: see
    :func:`train`."""
    torch.set_num_threads(1)
    data = torch.load(tokens)
    ref = train(data, {}, model, STEPS, save=save)
    return ref, compare(train(data, {}, model, STEPS, floor=True), ref)


def references(tokens: str, models: list[str], workers: int = 2, save: dict | None = None) -> dict:
    """``{model: (ref, floor)}``, ``workers`` models at a time (one thread each: the
    machine's cores would otherwise idle while one process runs); ``save``: ``{model: (dir,
    step)}``, checkpoints the reference runs write on the way (see :func:`train`)."""
    save = save or {}
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if len(models) < 2:
        return {m: reference(tokens, m, save.get(m)) for m in models}
    with ProcessPoolExecutor(min(workers, len(models)), mp_context=mp.get_context("spawn")) as ex:
        futures = {m: ex.submit(reference, tokens, m, save.get(m)) for m in models}
        return {m: f.result() for m, f in futures.items()}


def train_job(job: dict) -> dict:
    data = torch.load(job["tokens"])
    model = job.get("model", "dense")
    ref = torch.load(job["ref"])[job.get("ref_key", model)]
    probe = None
    if job.get("probe_reduce"):
        from parity_worker import ReduceDtypes

        probe = ReduceDtypes()
    try:
        got = train(data, job["layout"], model, job.get("steps", STEPS), job.get("kw"), probe=probe,
                    save=(job["save_dir"], job["save_at"]) if job.get("save_dir") else None)
    finally:
        if probe is not None:
            probe.restore()
    out = compare(got, ref)
    if probe is not None:
        out["reduce_dtypes"] = sorted(probe.seen)
    return out


def resume_job(job: dict) -> dict:
    """Train to ``save_at`` under ``save`` and checkpoint into ``dir`` (if ``save``), then
    (if ``load``) resume under ``load`` up to ``steps``: losses of the resumed steps and the
    final weights compared with the uninterrupted one-process run."""
    from pretrain import checkpoint as ckpt

    data = torch.load(job["tokens"])
    save_at, model = job["save_at"], job.get("model", "dense")
    if job.get("save") is not None:
        runner, opt, world = build(job["save"], model, {})
        for step in range(save_at):
            runner.forward_backward(batches(data, step, world.dp_rank, world.dp_size))
            runner.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ckpt.save_checkpoint(job["dir"], save_at, runner.parts, opt, {"step": save_at}, world, "x: 1\n")
    if job.get("load") is None:
        return {}
    runner, opt, world = build(job["load"], model, {})
    ckpt.load_checkpoint(Path(job["dir"]) / "checkpoints" / f"step_{save_at}", runner.parts, opt, world)
    losses = []
    for step in range(save_at, job["steps"]):
        losses.append(runner.reduce_loss(runner.forward_backward(batches(data, step, world.dp_rank, world.dp_size))))
        runner.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref = torch.load(job["ref"])[model]
    got = {"loss": losses, "weights": named(runner.parts, grads=False)}
    worst = max(float((t - ref["weights"][n]).abs().max()) for n, t in got["weights"].items())
    return {"loss": losses, "want": ref["loss"][save_at:job["steps"]], "weights_diff": worst,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref["loss"][save_at:]))}
