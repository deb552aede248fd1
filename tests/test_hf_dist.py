"""Export of checkpoints saved by 2 gloo processes (FSDP2 dp_shard=2, and tp=2), read back in
one process: transformers' logits equal the sharded model's own logits. The Hugging Face
weights written from the sharded state during training (``checkpoint.hf_every``; also under
pp=2) equal ``pretrain export`` of the checkpoint of the same step, byte for byte.

The worker half of this file runs under torchrun: ``python -m torch.distributed.run
--standalone --nproc_per_node 2 tests/test_hf_dist.py OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYOUTS = {"fsdp": {"dp_shard": 2}, "tp": {"tp": 2, "dp_shard": 1}}
LIVE_ONLY = {"pp": {"pp": 2, "dp_shard": 1}}  # (no logits: the model is split over the ranks)
MODEL = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, qkv_bias=True)


def tokens() -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(7))


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from models.config import ModelConfig
    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain.checkpoint import save_checkpoint
    from pretrain.config import Config, config_yaml
    from pretrain.hf.live_export import export_live

    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    mc = ModelConfig(**MODEL)
    cfg = Config(model=mc)
    cfg.data.seq_len = 16
    text = config_yaml(cfg)
    x = tokens()
    for name, layout in {**LAYOUTS, **LIVE_ONLY}.items():
        pcfg = ParallelConfig(**layout)
        world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
        runner = parallelize(build_model(mc, init=False), pcfg, world, seed=3)
        opt = torch.optim.AdamW([p for part in runner.parts for p in part.parameters()], lr=1e-2)
        for _ in range(2):  # both ranks see the same batch: fine for a weights round trip
            runner.forward_backward([{"input_ids": x[:, :-1], "labels": x[:, 1:]}])
            opt.step()
            opt.zero_grad(set_to_none=True)
        save_checkpoint(out / name, 2, runner.parts, opt, {"step": 2}, world, text)
        export_live(out / name, 2, runner.parts, cfg, world, None, max_shard_size="40KB")
        if name in LIVE_ONLY:
            continue
        with torch.no_grad():
            logits = runner.model(x)
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        if rank == 0:
            torch.save(logits, out / f"{name}_logits.pt")
        dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_export_of_multi_process_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.hf.export import export_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), str(tmp_path)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in {**LAYOUTS, **LIVE_ONLY}:
        ckpt = tmp_path / name / "checkpoints" / "step_2"
        export_checkpoint(str(ckpt), str(tmp_path / f"hf_sharded_{name}"), max_shard_size="40KB")
        live, ref = tmp_path / name / "hf" / "step_2", tmp_path / f"hf_sharded_{name}"
        weights = sorted(p.name for p in ref.iterdir() if "safetensors" in p.name)
        assert len(weights) > 3 and sorted(p.name for p in live.iterdir() if "safetensors" in p.name) == weights
        for f in weights + ["config.json", "generation_config.json"]:
            assert (live / f).read_bytes() == (ref / f).read_bytes(), (name, f)
        if name in LIVE_ONLY:
            continue
        assert '"world_size": 2' in (ckpt / "meta.json").read_text()
        summary = export_checkpoint(str(ckpt), str(tmp_path / f"hf_{name}"))
        assert summary["architecture"] == "LlamaForCausalLM"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{name}").eval()
        with torch.no_grad():
            theirs = hf(tokens()).logits
        ours = torch.load(tmp_path / f"{name}_logits.pt")
        assert (theirs - ours).abs().max().item() < 1e-4, name


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
