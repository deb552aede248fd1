"""Worker for the expert-parallel tests (run under torchrun; holds no tests itself).

``python -m torch.distributed.run --nproc_per_node N tests/test_parallel_moe_worker.py SPEC OUT``
runs the jobs of SPEC in sequence on one process group (as tests/test_parallel_worker.py,
whose batches and layouts it reuses); rank 0 writes the results to OUT. ``run_moe`` also
runs in-process with world size 1 for the reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import test_parallel_worker as W  # noqa: E402


def moe_model_cfg(preset: str):
    """The worker's tiny transformer with the MoE section of configs/moe_<preset>_tiny.yaml."""
    import yaml

    from models.config import MoEConfig

    moe = yaml.safe_load((ROOT / "configs" / f"moe_{preset}_tiny.yaml").read_text())["model"]
    return W.model_cfg(pattern=moe["pattern"], moe=MoEConfig(**moe["moe"]))


def _biases(runner) -> dict[str, list[float]]:
    from models.moe import moe_layers

    return {n: m.expert_bias.tolist() for part in runner.parts for n, m in moe_layers(part)}


def _build(layout: dict, preset: str):
    from models.transformer import build_model
    from parallel import parallelize
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    pcfg, world = W.make_world(layout)
    runner = parallelize(build_model(moe_model_cfg(preset), init=False), pcfg, world, seed=0)
    opt = build_optimizer(runner.parts, OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1))
    return runner, opt, world


def rank_batches(step: int, world, micro: int = W.MICRO) -> list[dict]:
    """This dp rank's rows of the global batch of ``step``, in micro-batches of ``micro`` rows."""
    mbs = W.rank_batches(step, world)
    b = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
    n = b["input_ids"].shape[0]
    return [{k: v[i:i + micro] for k, v in b.items()} for i in range(0, n, micro)]


def _train(runner, opt, world, start: int, stop: int, micro: int = W.MICRO) -> dict:
    import torch.distributed as dist

    losses, norms, biases, metrics = [], [], [], {}
    for step in range(start, stop):
        loss = runner.forward_backward(rank_batches(step, world, micro))
        losses.append(runner.reduce_loss(loss))
        norms.append(float(runner.clip_grad_norm_(0.5)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        runner.after_optimizer_step()
        b = _biases(runner)
        if world.distributed:  # pipeline stages hold different layers
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, b)
            b = {k: v for p in parts for k, v in p.items()}
        biases.append(b)
        metrics = runner.step_metrics()
    return {"loss": losses, "grad_norm": norms, "bias": biases, "metrics": metrics}


def _expert_memory(runner, opt) -> dict:
    """Routed-expert elements this rank holds: weights ``(local, total)`` and Adam state."""
    from torch.distributed.tensor import DTensor

    from parallel.expert_parallel import expert_numel, moe_modules

    local = total = 0
    for part in runner.parts:
        a, b = expert_numel(part)
        local, total = local + a, total + b
    state = 0
    for part in runner.parts:
        for m in moe_modules(part):
            for n in ("w_gate", "w_up", "w_down"):
                st = opt.state.get(getattr(m, n), {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        t = st[key]
                        state += (t.to_local() if isinstance(t, DTensor) else t).numel()
    return {"local": local, "total": total, "adam_state": state}


def run_moe(layout: dict, preset: str, steps: int = 10, micro: int = W.MICRO) -> dict:
    """Per-step loss, grad norm and expert biases (after each step) of ``steps`` steps, and
    the routed-expert elements rank 0 holds."""
    runner, opt, world = _build(layout, preset)
    out = _train(runner, opt, world, 0, steps, micro)
    return {**out, "expert_memory": _expert_memory(runner, opt)}


def run_resume(save: dict | None, load: dict | None, ckpt_dir: str, preset: str, save_at: int,
               steps: int) -> dict:
    """Train ``save_at`` steps under layout ``save`` and checkpoint (skipped if None), then
    resume under layout ``load`` (skipped if None) and train up to ``steps``."""
    from pretrain import checkpoint as ckpt

    if save is not None:
        runner, opt, world = _build(save, preset)
        _train(runner, opt, world, 0, save_at)
        ckpt.save_checkpoint(ckpt_dir, save_at, runner.parts, opt, {"step": save_at}, world, "x: 1\n")
    if load is None:
        return {}
    runner, opt, world = _build(load, preset)
    ckpt.load_checkpoint(Path(ckpt_dir) / "checkpoints" / f"step_{save_at}", runner.parts, opt, world)
    return _train(runner, opt, world, save_at, steps)


def run_nosync(layout: dict, preset: str) -> dict:
    """Whether the expert weights hold a (reduced, sharded) gradient after each micro-batch's
    backward when only the last one syncs, as ``PlainRunner.forward_backward`` runs them."""
    from parallel.expert_parallel import expert_params
    from parallel.fsdp import set_gradient_sync

    runner, _, world = _build(layout, preset)
    mbs = rank_batches(0, world, 1)
    has_grad = []
    for i, mb in enumerate(mbs):
        set_gradient_sync(runner.parts, i == len(mbs) - 1)
        with runner.loss_context():
            (runner._micro_loss(runner._to_device(mb)) / len(mbs)).backward()
        has_grad.append([p.grad is not None for part in runner.parts for p in expert_params(part)])
    return {"has_grad": has_grad}


def run_comm(ep: int) -> dict:
    """dispatch -> per-expert scaling -> combine over the whole world as one ep group, with
    uneven (and zero) counts per expert, against the same computation done locally."""
    import torch.distributed as dist

    from parallel.expert_parallel import AllToAllExpertComm

    rank, E, d = dist.get_rank(), 2 * ep, 3
    g = torch.Generator().manual_seed(rank)
    counts = torch.randint(0, 4, (E,), generator=g)
    counts[(rank + 1) % E] = 0
    x = torch.randn(int(counts.sum()), d, generator=g, requires_grad=True)
    comm = AllToAllExpertComm(dist.group.WORLD, ep, E)
    local, local_counts, ctx = comm.dispatch(x, counts)
    nl = E // ep
    scale = torch.arange(rank * nl, (rank + 1) * nl, dtype=torch.float32) + 1.0
    out = comm.combine(local * scale.repeat_interleave(local_counts).unsqueeze(1), ctx)
    (out * out).sum().backward()
    want_scale = (torch.arange(E, dtype=torch.float32) + 1.0).repeat_interleave(counts).unsqueeze(1)
    want = x.detach() * want_scale
    totals = [None] * dist.get_world_size()
    dist.all_gather_object(totals, local_counts.tolist())
    return {"out_err": float((out.detach() - want).abs().max()) if out.numel() else 0.0,
            "grad_err": float((x.grad - 2 * want * want_scale).abs().max()) if x.numel() else 0.0,
            "local_counts": totals, "send_counts": counts.tolist()}


def run_job(job: dict) -> dict:
    import torch.distributed as dist

    kind = job.get("kind", "layout")
    if kind == "comm":
        return run_comm(dist.get_world_size())
    if kind == "resume":
        return run_resume(job.get("save"), job.get("load"), job["dir"], job["preset"], job["save_at"], job["steps"])
    if kind == "bf16":
        return run_moe(job["layout"], job["preset"], job["steps"])
    if kind == "nosync":
        return run_nosync(job["layout"], job["preset"])
    return run_moe(job["layout"], job["preset"], job.get("steps", 10), job.get("micro", W.MICRO))


def main(spec_path: str, out_path: str) -> None:
    from torchrun_jobs import serve_jobs

    serve_jobs(run_job, spec_path, out_path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
