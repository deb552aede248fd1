"""The planner's per-rank memory against what real CPU runs allocate.

After one optimizer step every rank sums the bytes of its local shards of the parameters,
their gradients and the AdamW state tensors; the planner's prediction for that rank
(parameters + gradients + optimizer state) must equal it to the byte. One process in-process,
then several layouts on 2 processes (FSDP, TP, TP+SP, PP) under torchrun.

Run as a script (``torchrun --nproc_per_node N tests/test_plan_memory.py SPEC OUT``) this
file is the worker that measures the layouts listed in SPEC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

MODEL = dict(vocab_size=512, d_model=64, n_layers=2, pattern="*-", n_heads=4, n_kv_heads=2, max_seq_len=64)
SEQ, BATCH = 32, 8
# each entry: parallel.* keys, plus "model" overrides of MODEL
LAYOUTS_2 = [
    {"dp_shard": 2},
    {"dp_shard": 2, "model": {"vocab_size": 515, "d_model": 48, "n_heads": 3, "n_kv_heads": 1}},  # uneven shards
    {"tp": 2, "dp_shard": 1},
    {"tp": 2, "dp_shard": 1, "sequence_parallel": True},
    {"pp": 2, "dp_shard": 1},
    {"dp_replicate": 2, "dp_shard": 1},
]
LAYOUTS_4 = [{"tp": 2, "dp_shard": 2}, {"pp": 2, "dp_shard": 2}]


def _model_config(extra: dict):
    """MODEL with ``extra`` dotted overrides (``moe.top_k``) applied."""
    from pretrain.config import load_config

    ov = [f"--model.{k}={v}" for k, v in {**MODEL, **extra}.items()]
    return load_config(None, [*ov, f"--data.seq_len={SEQ}"]).model


def _batches(world) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=g)
    rows = BATCH // world.dp_size
    x = x[world.dp_rank * rows:(world.dp_rank + 1) * rows]
    return [{"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}]


def _bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def measure(layout: dict) -> dict:
    """One training step under ``layout`` on the current process group; this rank's bytes."""
    import torch
    import torch.distributed as dist

    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    layout = dict(layout)
    model_cfg = _model_config(layout.pop("model", {}))
    pcfg = ParallelConfig(**layout)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    runner = parallelize(build_model(model_cfg, init=False), pcfg, world, seed=0)
    opt = build_optimizer(runner.parts, OptimConfig(lr=1e-3, warmup_steps=0))
    runner.forward_backward(_batches(world))
    opt.step()
    params = {id(p): p for part in runner.parts for p in part.parameters()}.values()
    out = {"params": sum(_bytes(p) for p in params),
           "grads": sum(_bytes(p.grad) for p in params if p.grad is not None),
           "optimizer": sum(_bytes(v) for st in opt.state.values() for k, v in st.items()
                            if k != "step" and isinstance(v, torch.Tensor))}
    coord = dict(zip(("pp", "dp_replicate", "dp_shard", "cp", "tp"), world.mesh.get_coordinate())) \
        if world.mesh is not None else {}
    out.update(pp_rank=world.pp_rank, shard_rank=coord.get("dp_shard", 0), world=ws)
    return out


def predict(layout: dict, world_size: int, pp_rank: int, shard_rank: int) -> float:
    """The planner's parameters + gradients + optimizer bytes for that rank."""
    from pretrain.config import load_config
    from pretrain.planner.layout import config_layout, project_recipe, workload
    from pretrain.planner.memory import rank_memory, state_bytes

    layout = dict(layout)
    ov = [f"--model.{k}={v}" for k, v in {**MODEL, **layout.pop("model", {})}.items()]
    ov += [f"--parallel.{k}={str(v).lower()}" for k, v in layout.items()]
    ov += [f"--data.seq_len={SEQ}", f"--train.global_batch={BATCH}"]
    cfg = load_config(None, ov)
    lay = config_layout(cfg, world_size)
    mem = rank_memory(cfg.model, lay, workload(cfg), project_recipe(cfg), shard_rank=shard_rank)
    return state_bytes(mem[pp_rank])


def _check(layout: dict, got: dict) -> tuple[float, float]:
    measured = got["params"] + got["grads"] + got["optimizer"]
    predicted = predict(layout, got["world"], got["pp_rank"], got["shard_rank"])
    return measured, predicted


SINGLE = [
    {},
    {"model": {"pattern": "*E", "moe.n_experts": 4, "moe.top_k": 2, "moe.n_shared_experts": 1}},
    {"model": {"pattern": "M-*-", "mamba.d_state": 16, "mamba.head_dim": 16, "mamba.chunk_size": 16}},
    {"model": {"norm": "peri", "residual": "ladder", "qkv_bias": True}},
]


@pytest.mark.parametrize("layout", SINGLE, ids=["dense", "moe", "hybrid", "peri_ladder"])
def test_single_process_memory_matches_plan(layout):
    got = measure(layout)
    measured, predicted = _check(layout, got)
    assert predicted == measured, (measured, predicted)
    # AdamW in fp32: parameters, gradients and two moments, 4 bytes each
    assert got["grads"] == got["params"] and got["optimizer"] == 2 * got["params"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc,layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4)])
def test_multi_process_memory_matches_plan(tmp_path, nproc, layouts):
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps(layouts))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(Path(__file__).resolve()), str(spec), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == len(layouts)
    for layout, ranks in zip(layouts, results):
        for got in ranks:
            measured, predicted = _check(layout, got)
            print(layout, got["pp_rank"], got["shard_rank"], measured, predicted)
            assert predicted == measured, (layout, got, predicted)


def _worker(spec: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = []
    for layout in json.loads(Path(spec).read_text()):
        mine = measure(layout)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results.append(gathered)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
