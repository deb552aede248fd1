"""Worker for the multi-process parallel tests (run under torchrun; holds no tests itself).

``python -m torch.distributed.run --nproc_per_node N tests/test_parallel_worker.py SPEC OUT``
runs every job in the JSON file SPEC in sequence on one process group and rank 0 writes
the results (per-step loss and grad norm, or errors) to OUT. ``run_layout`` is also
called in-process with world size 1 for the reference curve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TINY = dict(vocab_size=512, d_model=64, n_layers=2, pattern="*-", n_heads=4, n_kv_heads=2,
            max_seq_len=64)
SEQ, GLOBAL_BATCH, MICRO = 32, 8, 2


def model_cfg(**kw):
    from models.config import GDNConfig, HybridHeadsConfig, MambaConfig, MoEConfig, ModelConfig

    # nested configs arrive as dicts from JSON job specs
    for key, cls in (("moe", MoEConfig), ("mamba", MambaConfig), ("hybrid", HybridHeadsConfig),
                     ("gdn", GDNConfig)):
        if isinstance(kw.get(key), dict):
            kw[key] = cls(**kw[key])
    return ModelConfig(**{**TINY, **kw})


_TOKENS: dict[str, dict] = {}


def global_batch(step: int) -> dict:
    """The layout-independent global batch of ``step``: the first ``SEQ`` tokens of the rows
    of the parity harness's learnable text (tests/parity.py; the file in PARITY_TOKENS, set
    by the ``parity_tokens`` fixture)."""
    path = os.environ["PARITY_TOKENS"]
    if path not in _TOKENS:
        _TOKENS[path] = torch.load(path)
    t = _TOKENS[path]
    return {k: v[step % v.shape[0], :GLOBAL_BATCH, :SEQ].contiguous() for k, v in t.items()}


def rank_batches(step: int, world) -> list[dict]:
    b = global_batch(step)
    rows = GLOBAL_BATCH // world.dp_size
    b = {k: v[world.dp_rank * rows:(world.dp_rank + 1) * rows] for k, v in b.items()}
    return [{k: v[i:i + MICRO] for k, v in b.items()} for i in range(0, rows, MICRO)]


def make_world(layout: dict):
    import torch.distributed as dist

    from parallel import ParallelConfig, build_world

    pcfg = ParallelConfig(**layout)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return pcfg, build_world(pcfg, rank, ws, 0, torch.device("cpu"))


def build(layout: dict, model_kw: dict | None = None, **kw):
    from models.transformer import build_model
    from parallel import parallelize
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    pcfg, world = make_world(layout)
    model = build_model(model_cfg(**(model_kw or {})), init=False)
    runner = parallelize(model, pcfg, world, seed=0, **kw)
    opt = build_optimizer(runner.parts, OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1))
    return runner, opt, world


def train_steps(runner, opt, world, start: int, stop: int) -> dict:
    losses, norms = [], []
    for step in range(start, stop):
        loss = runner.forward_backward(rank_batches(step, world))
        losses.append(runner.reduce_loss(loss))
        norms.append(float(runner.clip_grad_norm_(0.5)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"loss": losses, "grad_norm": norms}


def run_layout(layout: dict, steps: int = 10, model_kw: dict | None = None, **kw) -> dict:
    """Per-step loss and grad norm of ``steps`` optimizer steps; ``kw`` go to parallelize."""
    runner, opt, world = build(layout, model_kw, **kw)
    return train_steps(runner, opt, world, 0, steps)


def run_resume(save_layout: dict, load_layout: dict, ckpt_dir: str, save_at: int, steps: int) -> dict:
    """Train ``save_at`` steps under ``save_layout`` and checkpoint (skipped if ``save_layout``
    is None), then resume under ``load_layout`` and train up to ``steps``."""
    from pretrain import checkpoint as ckpt

    if save_layout is not None:
        runner, opt, world = build(save_layout)
        train_steps(runner, opt, world, 0, save_at)
        ckpt.save_checkpoint(ckpt_dir, save_at, runner.parts, opt, {"step": save_at}, world, "x: 1\n")
    if load_layout is None:
        return {}
    runner, opt, world = build(load_layout)
    ckpt.load_checkpoint(Path(ckpt_dir) / "checkpoints" / f"step_{save_at}", runner.parts, opt, world)
    return train_steps(runner, opt, world, save_at, steps)


def run_gradsync(layout: dict) -> dict:
    """Count data-parallel gradient reductions during one step of 3 micro-batches."""
    import torch.distributed as dist

    runner, opt, world = build(layout)
    counts = {"n": 0}
    names = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(fn):
        def inner(*a, **k):
            counts["n"] += 1
            return fn(*a, **k)
        return inner

    mbs = rank_batches(0, world)
    mbs = [{k: torch.cat([v, v[:1]]) for k, v in mbs[0].items()}] + mbs  # 3 micro-batches
    per_mb = []
    from parallel.fsdp import set_gradient_sync

    try:
        for n in names:
            if n in saved:
                setattr(dist, n, wrap(saved[n]))
        for i, mb in enumerate(mbs):
            before = counts["n"]
            set_gradient_sync(runner.parts, i == len(mbs) - 1)
            runner._micro_loss(runner._to_device(mb)).backward()
            per_mb.append(counts["n"] - before)
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    return {"per_microbatch": per_mb}


def run_init_check(layout: dict) -> dict:
    """Largest difference between any parameter (gathered) and its layout-free initial value."""
    from torch.distributed.tensor import DTensor

    from models.transformer import init_tensor
    from parallel.init import canonical_name

    runner, _, _ = build(layout)
    worst = 0.0
    for part in runner.parts:
        for name, p in part.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            ref = init_tensor(part, canonical_name(name), tuple(full.shape), 0)
            worst = max(worst, float((full.detach() - ref).abs().max()))
    return {"max_abs_diff": worst}


def run_job(job: dict) -> dict:
    kind = job.get("kind", "layout")
    if kind == "layout":
        return run_layout(job["layout"], job.get("steps", 10), job.get("model"), **job.get("kw", {}))
    if kind == "resume":
        return run_resume(job.get("save"), job.get("load"), job["dir"], job["save_at"], job["steps"])
    if kind == "init":
        return run_init_check(job["layout"])
    if kind == "gradsync":
        return run_gradsync(job["layout"])
    raise ValueError(kind)


def main(spec_path: str, out_path: str) -> None:
    from torchrun_jobs import serve_jobs

    serve_jobs(run_job, spec_path, out_path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
