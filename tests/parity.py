"""The parity harness: every multi-process layout computes the same model as one process.

A *job* is ``(family, model overrides, parallelize options, layout)``. It trains ``STEPS``
optimizer steps on learnable text (the ``tiny_dataset`` fixture's stdlib source, 128-token
rows, saved once per session by :func:`prepare_tokens`) with settings that make attention
sharp within the run (lr 1e-2, no warmup), and records (a) the per-step loss, (b) every
parameter's gradient after step 1, gathered to full tensors by canonical name, and (c) the
final weights (and MoE expert biases). The one-process reference of each job's numerics
(:func:`ref_key`) runs once per session in the pytest process (:class:`References`), then
again as equivalent computations that differ only in rounding, which give two noise
floors: *split*, the whole batch in one micro-batch (the gradient summed in another order),
and *ulp*, the larger of two runs from initial weights moved by one ulp (:func:`perturb`:
like a layout's reordered matmul sums this perturbs the forward too, and it shows how far
the run itself amplifies rounding, e.g. when a near-tie MoE routing choice flips). A layout
passes within ``max(1e-5, 10 x split floor, 3 x ulp floor)`` per quantity (:func:`tolerance`):
its drift may not exceed the one-process run's own drift under a rounding-level change.

The worker (tests/parity_worker.py) runs many jobs on one torchrun process group and
compares each with the cached reference on rank 0 (:func:`compare`), so only a few numbers
cross back. The layout matrix is generated (tests/parity_matrix.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SEQ, GLOBAL_BATCH, MICRO, STEPS = 128, 8, 2, 10
# lr 2e-2 on a 0.1-std init: within 10 steps the loss falls below the unigram entropy and the
# mean largest attention probability triples (test_parity.py checks both); the noise floor
# stays ~1e-7 (loss, gradients) and a few 1e-6 (weights). A 0.02 init needs lr 3e-2 for the
# same sharpness, where the run turns chaotic (weight floor ~1e-1).
LR, CLIP = 2e-2, 1.0
BASE = dict(vocab_size=512, d_model=64, n_layers=2, pattern="*-", n_heads=4, n_kv_heads=2,
            max_seq_len=SEQ, init_std=0.1)
MAMBA = dict(d_state=16, head_dim=32, n_groups=2, chunk_size=32)
FAMILIES = {
    "dense": {},
    # "M-*-": Mamba-2 (4 heads of 32, 2 groups), MLP, attention, MLP
    "mamba": dict(pattern="M-*-", n_layers=1, mamba=MAMBA),
    # "P-" x 2: 4 attention heads (2 KV) + 4 Mamba heads of 16 side by side (Falcon-H1)
    "heads": dict(pattern="P-", mamba={**MAMBA, "head_dim": 16},
                  hybrid=dict(n_attn_heads=4, n_mamba_heads=4)),
    # Mixtral-style: 8 softmax-routed experts, top-2, Switch + z losses
    "moe": dict(pattern="*E", moe=dict(n_experts=8, top_k=2, aux_loss_coef=1e-2, z_loss_coef=1e-3)),
    "ladder": dict(residual="ladder"),
    # "G-*-": Gated DeltaNet (2 q/k heads, 4 value heads of 16), MLP, attention, MLP
    "gdn": dict(pattern="G-*-", n_layers=1,
                gdn=dict(n_heads=2, n_v_heads=4, head_k_dim=16, head_v_dim=16, chunk_size=32)),
    # DeepSeek-V3-style routing: groups, sigmoid, shared expert, aux-loss-free bias balancing
    "deepseek": dict(pattern="*E", moe=dict(n_experts=16, top_k=4, ffn_hidden=48, score_fn="sigmoid",
                                       n_groups=4, topk_groups=2, n_shared_experts=1,
                                       bias_update_rate=1e-3, aux_loss_coef=1e-4, z_loss_coef=0.0)),
    # DeepSeek-V3 multi-head latent attention: q compressed to 32, KV latent 16, rope key 8
    "mla": dict(attention="mla", mla=dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                                          qk_rope_head_dim=8, v_head_dim=12)),
    # Qwen3-Next attention options: qk_norm, sigmoid output gate, RoPE on half of each head
    "attn_opts": dict(qk_norm=True, attn_output_gate=True, partial_rotary_factor=0.5),
    # DeepSeek-V3 multi-token prediction: two depths after the dense stack (models/mtp.py)
    "mtp": dict(mtp_depth=2),
    # DeepSeek-V3-shaped: the "deepseek" routing with one MTP depth whose block is MoE too
    "mtp_moe": dict(pattern="*E", moe=dict(n_experts=16, top_k=4, ffn_hidden=48, score_fn="sigmoid",
                                          n_groups=4, topk_groups=2, n_shared_experts=1,
                                          bias_update_rate=1e-3, aux_loss_coef=1e-4, z_loss_coef=0.0),
                    mtp_depth=1, mtp_pattern="*E"),
    # Qwen3-Next-shaped: Gated DeltaNet and gated attention (q/k norm, partial RoPE), each
    # followed by softmax-routed experts with a sigmoid-gated shared expert
    "qwen3_next": dict(pattern="GE*E", n_layers=1, qk_norm=True, attn_output_gate=True,
                       partial_rotary_factor=0.5,
                       gdn=dict(n_heads=2, n_v_heads=4, head_k_dim=16, head_v_dim=16, chunk_size=32),
                       moe=dict(n_experts=8, top_k=2, ffn_hidden=32, n_shared_experts=1,
                                shared_expert_gate=True, aux_loss_coef=1e-2, z_loss_coef=1e-3)),
}
# parallelize options that do not change the computed numbers (share the reference)
NUMERICS_FREE = ("ac", "ac_every", "compile")


def model_cfg(family: str = "dense", **over):
    """The family's tiny ModelConfig with ``over`` (nested dicts merge into their section)."""
    from models.config import GDNConfig, HybridHeadsConfig, MLAConfig, MambaConfig, MoEConfig, ModelConfig

    kw = {**BASE, **FAMILIES[family]}
    for k, v in over.items():
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    for key, cls in (("moe", MoEConfig), ("mamba", MambaConfig), ("hybrid", HybridHeadsConfig),
                     ("mla", MLAConfig), ("gdn", GDNConfig)):
        if isinstance(kw.get(key), dict):
            kw[key] = cls(**kw[key])
    return ModelConfig(**kw)


# ---- data ----------------------------------------------------------------------------

def prepare_tokens(dataset: Path, out: Path, steps: int = 16) -> Path:
    """Save ``steps`` global batches of the dataset's train split (``input_ids``, ``labels``,
    ``doc_ids``, each ``[steps, GLOBAL_BATCH, SEQ]``) to ``out``; returns ``out``."""
    from pretrain.config import DataConfig
    from pretrain.data.loader import eval_batches

    batches = eval_batches(DataConfig(path=str(dataset), seq_len=SEQ), "train", GLOBAL_BATCH, steps,
                           cache_dir=str(out.parent / "cache"))
    torch.save({k: torch.stack([b[k] for b in batches]) for k in ("input_ids", "labels", "doc_ids")}, out)
    return out


_TOKENS: dict[str, dict] = {}


def rank_batches(tokens: str, step: int, dp_rank: int, dp_size: int, micro: int) -> list[dict]:
    """This dp rank's rows of global batch ``step``, in micro-batches of ``micro`` rows."""
    if tokens not in _TOKENS:
        _TOKENS[tokens] = torch.load(tokens)
    rows = GLOBAL_BATCH // dp_size
    b = {k: v[step, dp_rank * rows:(dp_rank + 1) * rows] for k, v in _TOKENS[tokens].items()}
    micro = min(micro, rows)
    return [{k: v[i:i + micro] for k, v in b.items()} for i in range(0, rows, micro)]


# ---- one run -------------------------------------------------------------------------

def run_config(job: dict):
    """The trainer's Config of ``job`` (model, layout, batch split, sequence length)."""
    from parallel import ParallelConfig
    from pretrain.config import Config, DataConfig, TrainConfig

    return Config(model=model_cfg(job.get("family", "dense"), **job.get("model", {})),
                  parallel=ParallelConfig(**job.get("layout", {})), data=DataConfig(seq_len=SEQ),
                  train=TrainConfig(global_batch=GLOBAL_BATCH, micro_batch=job.get("micro", MICRO)))


_REFUSALS: dict[str, str | None] = {}  # the matrix asks about the same jobs several times


def refusal(job: dict, world_size: int) -> str | None:
    """The line the trainer refuses ``job`` with on ``world_size`` ranks, or None: its one
    layout check (``pretrain.layout_check.check_run``)."""
    from pretrain.errors import UserError
    from pretrain.layout_check import check_run

    key = json.dumps([job.get(k) for k in ("family", "model", "layout", "micro")] + [world_size], sort_keys=True)
    if key not in _REFUSALS:
        try:
            check_run(run_config(job), world_size)
            _REFUSALS[key] = None
        except UserError as e:
            _REFUSALS[key] = str(e)
    return _REFUSALS[key]


def build(job: dict):
    """``(PlainRunner, optimizer, world)`` of ``job`` on the current process group (or one
    process without one), after the trainer's layout check (UserError if it refuses)."""
    import torch.distributed as dist

    from models.transformer import build_model
    from parallel import ParallelConfig, build_world, parallelize
    from pretrain.config import OptimConfig
    from pretrain.errors import UserError
    from pretrain.optim import build_optimizer

    pcfg = ParallelConfig(**job.get("layout", {}))
    ws = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    why = refusal(job, ws)
    if why:
        raise UserError(why)
    world = build_world(pcfg, rank, ws, 0, torch.device("cpu"))
    kw = dict(job.get("kw", {}))
    if pcfg.mixed_precision == "bf16":
        kw["autocast_dtype"] = torch.bfloat16
    model = build_model(model_cfg(job.get("family", "dense"), **job.get("model", {})), init=False)
    runner = parallelize(model, pcfg, world, seed=0, **kw)
    opt = build_optimizer(runner.parts, OptimConfig(lr=LR, warmup_steps=0, weight_decay=0.1))
    return runner, opt, world


def gather_full(runner, what: str) -> dict[str, torch.Tensor]:
    """This rank's parameters' full (gathered) gradients or values by canonical name, plus
    MoE expert biases for ``what == "weights"`` (every rank must call: DTensor gathers)."""
    from torch.distributed.tensor import DTensor

    from parallel.init import canonical_name

    out = {}
    for part in runner.parts:
        for name, p in part.named_parameters():
            t = p.grad if what == "grads" else p
            if t is None:
                continue
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[canonical_name(name)] = full.detach().float().clone()
        if what == "weights":
            for name, b in part.named_buffers():
                if name.endswith("expert_bias"):
                    out[canonical_name(name)] = b.detach().float().clone()
    return out


def merge_ranks(local: dict, world=None) -> dict | None:
    """Rank 0 gets the union of every rank's ``local`` (pipeline stages hold different names).
    With ``world``, only the first rank of each pipeline stage sends its tensors (the others
    hold the same full tensors: gathered DTensors, replicated parameters)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return local
    if world is not None and (world.tp_rank, world.dp_rank, world.cp_rank) != (0, 0, 0):
        local = {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if parts is None:
        return None
    merged = {}
    for p in parts:
        for k, v in p.items():
            merged.setdefault(k, v)
    return merged


@torch.no_grad()
def perturb(runner, seed: int) -> None:
    """Move every initial weight by about one float32 ulp (relative 2^-23, random sign): the
    same model up to rounding (one process only)."""
    g = torch.Generator().manual_seed(seed)
    for part in runner.parts:
        for p in part.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1
            p.mul_(1 + sign * 2.0 ** -23)


def default_micro(world) -> int:
    """Micro-batch rows of a layout run: ``MICRO``, or half the rows of one rank when it holds
    the whole batch outside a pipeline (two micro-batches still accumulate; each pass costs
    about the same at these sizes, so half the passes). The reference's other split is
    one of the noise floors, so the tolerance covers it."""
    if world.pp_size == 1 and world.dp_size == 1 and world.world_size > 1:
        return max(MICRO, GLOBAL_BATCH // 2)
    return MICRO


def train(job: dict, micro: int | None = None, on_step=None, perturb_seed: int | None = None) -> dict:
    """Run ``job``: per-step loss and grad norm, step-1 gradients and final weights (on rank
    0; None elsewhere). ``on_step(runner, step)`` runs after each backward (before clipping)."""
    runner, opt, world = build(job)
    if perturb_seed is not None:
        perturb(runner, perturb_seed)
    micro = micro or job.get("micro") or default_micro(world)
    losses, norms, grads = [], [], None
    for step in range(job.get("steps", STEPS)):
        loss = runner.forward_backward(rank_batches(job["tokens"], step, world.dp_rank, world.dp_size, micro))
        losses.append(runner.reduce_loss(loss))
        if on_step is not None:
            on_step(runner, step)
        if step == 0:
            grads = merge_ranks(gather_full(runner, "grads"), world)
        norms.append(float(runner.clip_grad_norm_(CLIP)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        runner.after_optimizer_step()
    return {"loss": losses, "grad_norm": norms, "grads": grads,
            "weights": merge_ranks(gather_full(runner, "weights"), world)}


# ---- comparison ----------------------------------------------------------------------

def rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ``|got - want| / |want|`` (L2 norms) over tensors matched by name, and its name."""
    if got.keys() != want.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise AssertionError(f"parameter names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    worst, where = 0.0, ""
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape:
            raise AssertionError(f"{k}: shape {tuple(g.shape)} vs {tuple(w.shape)}")
        d = float((g - w).norm() / w.norm().clamp_min(1e-12))
        if d > worst:
            worst, where = d, k
    return worst, where


def compare(got: dict, want: dict) -> dict:
    """The three parity numbers of a run against a reference: per-step loss (largest relative
    difference), step-1 gradients and final weights (largest per-tensor relative difference)."""
    n = len(want["loss"])
    assert len(got["loss"]) == n, (len(got["loss"]), n)
    loss = max(abs(g - w) / abs(w) for g, w in zip(got["loss"], want["loss"]))
    grad, grad_at = rel_diff(got["grads"], want["grads"])
    weight, weight_at = rel_diff(got["weights"], want["weights"])
    bias = [float((got["weights"][k] - w).abs().max()) for k, w in want["weights"].items()
            if k.endswith("expert_bias")]
    return {"loss": loss, "grad": grad, "weight": weight, "grad_at": grad_at, "weight_at": weight_at,
            "loss_curve": list(got["loss"]), "expert_bias": max(bias, default=0.0)}


QUANTITIES = ("loss", "grad", "weight")
PERTURB_SEEDS = (1, 2)


def tolerance(floor: dict) -> dict:
    """Per quantity: ``max(1e-5, 10 x the split floor, 3 x the ulp floor)`` (:class:`References`;
    3x: the ulp floor is the larger of only two samples of a chaotic spread)."""
    return {q: max(1e-5, 10 * floor["split"][q], 3 * floor["ulp"][q]) for q in QUANTITIES}


def check(name: str, diff: dict, floor: dict) -> None:
    """Assert a job's parity numbers are within tolerance; print them with the floors."""
    tol = tolerance(floor)
    print(f"{name}: " + ", ".join(f"{q} {diff[q]:.2e} (floors {floor['split'][q]:.1e} split, "
                                  f"{floor['ulp'][q]:.1e} ulp; tol {tol[q]:.1e})" for q in QUANTITIES))
    for q in QUANTITIES:
        where = diff.get(f"{q}_at", "")
        assert diff[q] <= tol[q], f"{name}: {q} differs by {diff[q]:.3e} {where} > {tol[q]:.1e} ({floor})"


# ---- references ----------------------------------------------------------------------

def ref_key(job: dict) -> dict:
    """What determines a job's one-process numbers (layout and numerics-free options aside)."""
    kw = {k: v for k, v in job.get("kw", {}).items() if k not in NUMERICS_FREE}
    return {"family": job.get("family", "dense"), "model": job.get("model", {}), "kw": kw,
            "steps": job.get("steps", STEPS)}


def key_name(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def reference(key: dict, tokens: str, out: Path) -> None:
    """The one-process run of ``key`` and its noise-floor runs (:class:`References`), saved
    to ``out`` (written whole, then renamed: another process may be waiting for it)."""
    torch.set_num_threads(1)
    job = {**key, "tokens": tokens}
    ref = train(job, micro=MICRO)
    floors = {"split": compare(train(job, micro=GLOBAL_BATCH), ref)}
    for seed in PERTURB_SEEDS:
        floors[f"ulp{seed}"] = compare(train(job, micro=MICRO, perturb_seed=seed), ref)
    tmp = out.with_suffix(".tmp")
    torch.save({"ref": ref, "floors": floors}, tmp)
    tmp.rename(out)


class References:
    """One-process reference runs and their noise floors, computed once per key per session
    and saved in ``root`` (the worker loads ``path(key)``)."""

    def __init__(self, root: Path, tokens: Path):
        self.root, self.tokens = root, str(tokens)
        self.floors: dict[str, dict] = {}

    def path(self, job: dict) -> Path:
        p = self.root / f"ref_{key_name(ref_key(job))}.pt"
        if not p.is_file():
            reference(ref_key(job), self.tokens, p)
        return p

    def prepare(self, jobs: list[dict], workers: int = 2) -> None:
        """Compute the missing references of ``jobs`` in ``workers`` processes at once (each
        one-threaded: the machine's cores would otherwise idle while one process runs)."""
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        todo = {}
        for j in jobs:
            p = self.root / f"ref_{key_name(ref_key(j))}.pt"
            if not p.is_file():
                todo[str(p)] = ref_key(j)
        if len(todo) < 2:
            return
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn")) as ex:
            for f in [ex.submit(reference, key, self.tokens, Path(p)) for p, key in todo.items()]:
                f.result()

    def floor(self, job: dict) -> dict:
        """``{"split": numbers, "ulp": largest numbers of the perturbed runs}``."""
        p = self.path(job)
        if str(p) not in self.floors:
            runs = torch.load(p)["floors"]
            ulp = [v for k, v in runs.items() if k.startswith("ulp")]
            keys = (*QUANTITIES, "expert_bias")
            self.floors[str(p)] = {"split": {q: runs["split"][q] for q in keys},
                                   "ulp": {q: max(r[q] for r in ulp) for q in keys}}
        return self.floors[str(p)]

    def ref(self, job: dict) -> dict:
        return torch.load(self.path(job))["ref"]


# ---- sharpness -----------------------------------------------------------------------

@torch.no_grad()
def attention_sharpness(model, batch: dict) -> float:
    """Mean over heads and queries of the largest attention probability in one forward of a
    one-process ``model`` (uniform causal attention over 128 keys gives about 0.04)."""
    import kernels

    seen, orig = [], kernels.attention

    def probe(q, k, v, doc_ids=None):
        H, Hkv = q.shape[2], k.shape[2]
        qh, kh = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        s = (qh @ kh.transpose(-1, -2)) / q.shape[-1] ** 0.5
        S = s.shape[-1]
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        if doc_ids is not None:
            mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        seen.append(s.masked_fill(~mask, float("-inf")).softmax(-1).amax(-1).mean())
        return orig(q, k, v, doc_ids)

    kernels.attention = probe
    try:
        model(batch["input_ids"], doc_ids=batch["doc_ids"])
    finally:
        kernels.attention = orig
    return float(torch.stack(seen).mean())
