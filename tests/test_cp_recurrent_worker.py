"""Worker for tests/test_cp_recurrent.py (holds no tests itself): Mamba-2 / ``P`` models
trained with their sequences split over cp ranks (zig-zag chunks, state passing from
``parallel/cp_recurrent.py``) against the same training in one process, on real text.

``python -m torch.distributed.run --nproc_per_node N tests/test_cp_recurrent_worker.py SPEC OUT``

Attention sublayers are not this module's subject (ring attention is built elsewhere):
here they gather the full K/V over the cp group (:func:`gathered_attention`), which is
exact and simple. Rank 0 saves losses, step-1 gradients and final weights for the test,
which runs the one-process reference itself (:func:`train` with ``cp=1``).
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
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels.ssd import segment_ids  # noqa: E402
from models.layers import ForwardContext, rope_tables  # noqa: E402
from parallel.cp_recurrent import all_gather_autograd, zigzag_chunks, zigzag_shard  # noqa: E402

SEQ, BATCH, LR = 128, 2, 3e-3
_ATTN: dict = {}  # this batch's global layout, read by gathered_attention


def model_cfg(model: dict):
    from test_parallel_worker import model_cfg as build_cfg

    return build_cfg(**{"max_seq_len": SEQ, **model})


def batches(data: str, steps: int, cp: int) -> list[dict]:
    """Real-text batches; extra document boundaries at awkward places relative to the cp
    chunks (exactly at a chunk start, one token after, one before the end, two in a chunk)
    on row 0, none added on row 1 (a document spanning every chunk)."""
    from pretrain.config import DataConfig
    from pretrain.data.loader import TokenBatches

    it = TokenBatches(DataConfig(path=data, seq_len=SEQ, shuffle=False), "train", BATCH, 0, 1, seed=0)
    n = SEQ // (2 * cp)
    cuts = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for pos in (n, 2 * n + 1, 3 * n - 1, 3 * n + 2, 3 * n + 5, SEQ - n):
        cuts[0, pos] = 1
    out = []
    for _ in range(steps):
        b = next(it)
        b["doc_ids"] = b["doc_ids"] + cuts.cumsum(1)
        out.append(b)
    return out


def local_slice(t: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    n = t.shape[1] // (2 * cp)
    return torch.cat([t[:, c * n:(c + 1) * n] for c in zigzag_chunks(cp)[rank]], 1)


def gathered_attention(q, k, v, doc_ids=None):
    """Causal attention of local queries over the K/V of all cp ranks (global positions)."""
    st = _ATTN
    B, S, H, D = q.shape
    kf, vf = (all_gather_autograd(t, st["group"]).transpose(0, 1).reshape(B, -1, *t.shape[2:]) for t in (k, v))
    if kf.shape[2] != H:
        kf, vf = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (kf, vf))
    mask = (st["pos_all"].unsqueeze(0) <= st["pos"].unsqueeze(1)).unsqueeze(0)
    if doc_ids is not None:
        mask = mask & (st["seg"].unsqueeze(2) == st["seg_all"].unsqueeze(1))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                         attn_mask=mask.unsqueeze(1))
    return out.transpose(1, 2)


def forward_loss(model, batch: dict, cp: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the mean token loss, global mean loss detached)."""
    labels, n_tok = batch["labels"], (batch["labels"] != -100).sum()
    if cp == 1:
        logits = model(batch["input_ids"], batch["doc_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_tok
        return loss, loss.detach()
    rank = dist.get_rank(group)
    x, ids, lab = (local_slice(batch[k], cp, rank) for k in ("input_ids", "doc_ids", "labels"))
    shard = zigzag_shard(group, SEQ, ids)
    pos = shard.positions()
    seg = segment_ids(batch["doc_ids"])
    _ATTN.update(group=group, pos=pos, pos_all=torch.cat([local_slice(torch.arange(SEQ)[None], cp, r)[0]
                                                         for r in range(cp)]),
                 seg=local_slice(seg, cp, rank), seg_all=torch.cat([local_slice(seg, cp, r) for r in range(cp)], 1))
    cfg = model.cfg
    ctx = ForwardContext(rope=rope_tables(cfg.head_dim_resolved, x.shape[1], cfg.rope_theta, positions=pos),
                  doc_ids=ids, recurrent_shard=shard)
    h, _ = model.run_stack(model.tok_embeddings(x), ctx, None)
    logits = model.output(model.norm(h))
    loss = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), reduction="sum") / n_tok
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return loss, total


def train(model_kw: dict, data: list[dict], cp: int, group=None) -> dict:
    """Train on the list of batches ``data`` (from :func:`batches`) with the sequence over ``cp`` ranks."""
    from models.transformer import build_model

    model = build_model(model_cfg(model_kw), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, grads = [], {}
    saved = kernels.attention
    if cp > 1:
        kernels.attention = gathered_attention
    try:
        for step, batch in enumerate(data):
            loss, total = forward_loss(model, batch, cp, group)
            loss.backward()
            for p in model.parameters():
                if cp > 1:  # each rank's loss covers its tokens: gradients add up
                    dist.all_reduce(p.grad, group=group)
            losses.append(float(total))
            if step == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        kernels.attention = saved
    return {"losses": losses, "grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest elementwise difference over same-named tensors, and the name where it occurs."""
    return max(((float((a[k] - b[k]).abs().max()), k) for k in a), default=(0.0, ""))


def delta_rule(q, k, v, alpha, beta, ids, S0=None):
    """A toy gated delta rule, token by token: ``S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T)
    + beta_t v_t k_t^T``, ``o_t = S_t q_t`` (S [B, H, dv, dk]), the state reset where ``ids``
    changes. Returns (o, final state, the product of the transitions, o's part due to S0)."""
    B, L, H, dk = k.shape
    eye = torch.eye(dk, dtype=k.dtype)
    S = torch.zeros(B, H, v.shape[-1], dk, dtype=k.dtype)
    P = eye.expand(B, H, dk, dk)
    live = torch.ones(B, dtype=torch.bool)
    outs, corr = [], []
    for t in range(L):
        if t > 0:
            same = ids[:, t] == ids[:, t - 1]
            S, live = S * same.view(B, 1, 1, 1), live & same
        kt = k[:, t]
        M = alpha[:, t, :, None, None] * (eye - beta[:, t, :, None, None] * kt.unsqueeze(-1) * kt.unsqueeze(-2))
        S = S @ M + beta[:, t, :, None, None] * v[:, t].unsqueeze(-1) * kt.unsqueeze(-2)
        P = P @ M
        outs.append((S @ q[:, t].unsqueeze(-1)).squeeze(-1))
        if S0 is not None:
            corr.append((S0 @ P @ q[:, t].unsqueeze(-1)).squeeze(-1) * live.view(B, 1, 1))
    o = torch.stack(outs, 1)
    return o, S, P, (torch.stack(corr, 1) if S0 is not None else None)


def run_delta(job: dict) -> dict:
    """The shard's matrix transitions (``transitions=``) on the toy delta rule: outputs and
    input gradients equal the one-process recurrence."""
    cp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(7)
    B, L, H, dk, dv = 2, 8 * cp, 2, 4, 3
    k = F.normalize(torch.randn(B, L, H, dk, generator=g, dtype=torch.float64), dim=-1)
    full = {"q": torch.randn(B, L, H, dk, generator=g, dtype=torch.float64), "k": k,
            "v": torch.randn(B, L, H, dv, generator=g, dtype=torch.float64),
            "alpha": 0.5 + 0.5 * torch.rand(B, L, H, generator=g, dtype=torch.float64),
            "beta": torch.rand(B, L, H, generator=g, dtype=torch.float64)}
    ids = torch.zeros(B, L, dtype=torch.long)
    for pos in (8, 17, 23, 24):  # row 0: at a chunk start, inside, twice in one chunk
        if pos < L:
            ids[0, pos:] += 1
    w = torch.randn(B, L, H, dv, generator=g, dtype=torch.float64)
    ref_in = {n: t.clone().requires_grad_() for n, t in full.items()}
    ref_o = delta_rule(*ref_in.values(), ids)[0]
    (ref_o * w).sum().backward()
    mine = {n: t.clone().requires_grad_() for n, t in full.items()}
    shard = zigzag_shard(dist.group.WORLD, L, local_slice(ids, cp, rank))
    pieces = {n: shard.split(local_slice(t, cp, rank)) for n, t in mine.items()}
    id_pieces = shard.split(local_slice(ids, cp, rank))
    runs = [delta_rule(*(pieces[n][j] for n in full), id_pieces[j]) for j in range(len(id_pieces))]
    states = shard.entering_states([r[1] for r in runs], transitions=[r[2] for r in runs])
    outs = [r[0] + delta_rule(*(pieces[n][j] for n in full), id_pieces[j], S0=states[j])[3]
            for j, r in enumerate(runs)]
    o = shard.cat(outs)
    (o * local_slice(w, cp, rank)).sum().backward()
    got = all_gather_autograd(o.detach(), dist.group.WORLD)
    o_full = torch.cat([got[r] for r in range(cp)], 1)
    want = torch.cat([local_slice(ref_o.detach(), cp, r) for r in range(cp)], 1)
    grads = {}
    for n, t in mine.items():
        dist.all_reduce(t.grad)
        grads[n] = float((t.grad - ref_in[n].grad).abs().max())
    return {"out_diff": float((o_full - want).abs().max()), "grad_diffs": grads}


def run_job(job: dict) -> dict:
    """Train ``job["model"]`` with cp = world size; rank 0 saves the results; or a delta job."""
    if job.get("kind") == "delta":
        return run_delta(job)
    torch.manual_seed(0)
    # the batches come from the test process: opening the streaming store here adds nothing
    got = train(job["model"], torch.load(job["batches"]), dist.get_world_size(), dist.group.WORLD)
    path = Path(job["out"]) / f"{job['name']}.pt"
    if dist.get_rank() == 0:  # the test compares it with one process (run there, not here)
        torch.save(got, path)
    return {"saved": str(path)}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torchrun_jobs import serve_jobs

    serve_jobs(run_job, sys.argv[1], sys.argv[2])
