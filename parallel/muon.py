"""Muon for weight matrices, AdamW for everything else, on plain and DTensor parameters.

Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025): Nesterov momentum, then the update
matrix is orthogonalised by a quintic Newton-Schulz iteration and scaled by
``0.2 * sqrt(max(m, n))`` so its RMS matches AdamW's and AdamW's lr and weight decay carry
over. Orthogonalisation needs the whole matrix, which fights sharding: here every sharded
matrix has one owner rank (balanced by Newton-Schulz work). The owner gathers the shards of
its matrices, orthogonalises them whole and scatters the slices back, in buckets, over the
DTensor's own mesh groups (one ``all_to_all_single`` per sharded mesh dim and direction).
Matrices a rank holds whole (single process, replicated, or experts sharded only along the
expert dim) are orthogonalised in place, per expert for 3-D expert weights. Pipeline stages
each own their parameters, so each stage's optimizer handles its own.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: fast rise, singular values ~[0.7, 1.2]
ADAMW_ONLY = ("tok_embeddings", "output", "router")  # module names never given to Muon


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of ``g`` [..., m, n] (batched over leading dims), in fp32."""
    x = g.float()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> float:
    """FLOPs of :func:`newton_schulz` on one m x n matrix."""
    s, l = min(m, n), max(m, n)
    return steps * (2 * s * s * l + 2 * s ** 3 + 2 * s * s * l)


def uses_muon(module_name: str, module: nn.Module, leaf: str, p: torch.Tensor) -> bool:
    """The rule: weights of linear layers and 3-D expert weights, except the embedding, the LM
    head and the router; every 1-D parameter, bias, conv filter and norm goes to AdamW."""
    if module_name.rsplit(".", 1)[-1] in ADAMW_ONLY:
        return False
    if isinstance(module, nn.Linear):
        return leaf == "weight"
    from models.moe import MoE

    return isinstance(module, MoE) and p.ndim == 3


def split_parameters(modules: list[nn.Module]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters by optimizer group: ``muon``, ``adamw_decay``, ``adamw_no_decay``."""
    groups = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    seen = set()
    for part in modules:
        for mname, mod in part.named_modules():
            for leaf, p in mod.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{mname}.{leaf}" if mname else leaf
                if uses_muon(mname, mod, leaf, p):
                    groups["muon"].append((name, p))
                elif p.ndim < 2 or "tok_embeddings" in name:
                    groups["adamw_no_decay"].append((name, p))
                else:
                    groups["adamw_decay"].append((name, p))
    return groups


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _Matrix:
    """One sharded Muon parameter: its layout and, for the gather, its owner coordinate."""

    def __init__(self, p: DTensor, shard_dims: tuple[int, ...]):
        self.shape = tuple(p.shape)
        self.mesh = p.device_mesh
        self.placements = p.placements
        self.shard_dims = shard_dims
        self.coord = tuple(self.mesh.get_coordinate())
        self.owner: dict[int, int] = {}
        self.cost = newton_schulz_flops(*self.shape[-2:]) * math.prod(self.shape[:-2])

    def block(self, coord) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(shape, offset) of the shard held at mesh coordinate ``coord``."""
        return _compute_local_shape_and_global_offset(self.shape, tuple(self.mesh.shape), list(coord),
                                                      self.placements)

    def on_path(self, coord, step: int) -> bool:
        """Whether the rank at ``coord`` holds blocks before gather step ``step``."""
        return all(coord[d] == self.owner[d] for d in self.shard_dims[:step])

    def held(self, coord, step: int) -> list[tuple[int, ...]]:
        """Coordinates whose blocks a rank on the path holds before gather step ``step``."""
        dims = self.shard_dims[:step]
        out = []
        for values in itertools.product(*(range(self.mesh.shape[d]) for d in dims)):
            c = list(coord)
            for d, v in zip(dims, values):
                c[d] = v
            out.append(tuple(c))
        return sorted(out)

    def numel(self, coords) -> int:
        return sum(math.prod(self.block(c)[0]) for c in coords)


def _shard_dims(p: torch.Tensor) -> tuple[int, ...] | None:
    """Mesh dims that split a matrix of ``p`` (None: every rank holds whole matrices)."""
    if not isinstance(p, DTensor):
        return None
    dims = []
    for d, pl in enumerate(p.placements):
        if pl.is_shard() or type(pl).__name__ == "_StridedShard":
            if p.device_mesh.shape[d] == 1:
                continue
            if p.ndim == 3 and getattr(pl, "dim", None) == 0 and type(pl).__name__ != "_StridedShard":
                continue  # experts split along the expert dim: each rank holds whole experts
            dims.append(d)
    return tuple(dims) or None


def _assign_owners(mats: list[_Matrix]) -> None:
    """Greedy longest-processing-time assignment of owners over the sharding coordinates."""
    by_layout: dict[tuple, list[_Matrix]] = {}
    for m in mats:
        by_layout.setdefault((id(m.mesh), m.shard_dims), []).append(m)
    for (_, dims), group in by_layout.items():
        mesh_shape = group[0].mesh.shape
        slots = list(itertools.product(*(range(mesh_shape[d]) for d in dims)))
        load = {s: 0.0 for s in slots}
        for m in sorted(group, key=lambda m: -m.cost):  # stable: equal costs keep parameter order
            slot = min(slots, key=lambda s: (load[s], s))
            load[slot] += m.cost
            m.owner = dict(zip(dims, slot))


SENT_BYTES = [0]  # bytes this process sent to other ranks for orthogonalisation (benchmarks)


def _all_to_all(send: list[list[torch.Tensor]], recv_sizes: list[int], group) -> torch.Tensor:
    """Exchange flat fp32 buffers: ``send[j]`` goes to group rank j; returns all received,
    source-major."""
    pieces = [t.reshape(-1).float() for dest in send for t in dest]
    inp = torch.cat(pieces) if pieces else torch.empty(0)
    out = torch.empty(sum(recv_sizes), dtype=inp.dtype)
    send_sizes = [sum(t.numel() for t in d) for d in send]
    me = dist.get_rank(group)
    SENT_BYTES[0] += 4 * (sum(send_sizes) - send_sizes[me])
    dist.all_to_all_single(out, inp, recv_sizes, send_sizes, group=group)
    return out


def _gather_to_owners(mats: list[_Matrix], locals_: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Full matrices on their owners (None elsewhere), one all-to-all per sharded mesh dim."""
    held = [{m.coord: t.float()} for m, t in zip(mats, locals_)]
    dims = mats[0].shard_dims
    for step, d in enumerate(dims):
        n = mats[0].mesh.shape[d]
        send = [[] for _ in range(n)]
        recv_sizes = [0] * n
        for m, h in zip(mats, held):
            if not m.on_path(m.coord, step):
                continue
            send[m.owner[d]].extend(h[c] for c in m.held(m.coord, step))
            if m.coord[d] == m.owner[d]:
                for y in range(n):
                    recv_sizes[y] += m.numel(m.held(_with(m.coord, d, y), step))
        flat = _all_to_all(send, recv_sizes, mats[0].mesh.get_group(d))
        offset = 0
        for y in range(n):  # unpack in the order the sources packed
            for m, h in zip(mats, held):
                if not (m.on_path(m.coord, step) and m.coord[d] == m.owner[d]):
                    continue
                for c in m.held(_with(m.coord, d, y), step):
                    shape = m.block(c)[0]
                    size = math.prod(shape)
                    h[c] = flat[offset:offset + size].view(shape)
                    offset += size
        for m, h in zip(mats, held):  # senders no longer hold what they sent
            if m.on_path(m.coord, step) and m.coord[d] != m.owner[d]:
                h.clear()
    fulls = []
    for m, h in zip(mats, held):
        if not m.on_path(m.coord, len(dims)):
            fulls.append(None)
            continue
        full = torch.empty(m.shape)
        for c, t in h.items():
            shape, off = m.block(c)
            full[tuple(slice(o, o + s) for o, s in zip(off, shape))] = t
        fulls.append(full)
    return fulls


def _scatter_from_owners(mats: list[_Matrix], fulls: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Each rank's block of the owners' full results (the gather's steps in reverse)."""
    held: list[dict] = []
    for m, full in zip(mats, fulls):
        h = {}
        if full is not None:
            for c in m.held(m.coord, len(m.shard_dims)):
                shape, off = m.block(c)
                h[c] = full[tuple(slice(o, o + s) for o, s in zip(off, shape))]
        held.append(h)
    dims = mats[0].shard_dims
    for step in reversed(range(len(dims))):
        d = dims[step]
        n = mats[0].mesh.shape[d]
        send = [[] for _ in range(n)]
        recv_sizes = [0] * n
        for m, h in zip(mats, held):
            if not m.on_path(m.coord, step):
                continue
            if m.coord[d] == m.owner[d]:
                for y in range(n):
                    send[y].extend(h[c] for c in m.held(_with(m.coord, d, y), step))
            recv_sizes[m.owner[d]] += m.numel(m.held(m.coord, step))
        flat = _all_to_all(send, recv_sizes, mats[0].mesh.get_group(d))
        offset = 0
        new_held = list(held)
        for y in range(n):  # source-major, as packed
            for i, m in enumerate(mats):
                if not m.on_path(m.coord, step) or m.owner[d] != y:
                    continue
                mine = {}
                for c in m.held(m.coord, step):
                    shape = m.block(c)[0]
                    size = math.prod(shape)
                    mine[c] = flat[offset:offset + size].view(shape)
                    offset += size
                new_held[i] = mine
        held = new_held
    return [h[m.coord] for m, h in zip(mats, held)]


def _with(coord, d: int, v: int) -> tuple[int, ...]:
    c = list(coord)
    c[d] = v
    return tuple(c)


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``muon=True``, AdamW (torch's update rule) on the others.

    All groups share ``lr`` and ``weight_decay`` semantics (decoupled decay), so a schedule
    and the AdamW hyper-parameters carry over. ``bucket_numel`` bounds how many full-matrix
    elements are gathered at once.
    """

    def __init__(self, groups: list[dict], lr: float, *, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 bucket_numel: int = 1 << 26):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas,
                        eps=eps, weight_decay=weight_decay, muon=False)
        super().__init__(groups, defaults)
        self.bucket_numel = bucket_numel
        self._plans: dict[int, _Matrix] = {}

    def _plan(self, params: list[torch.Tensor]) -> None:
        new = [p for p in params if id(p) not in self._plans and _shard_dims(p) is not None]
        mats = [_Matrix(p, _shard_dims(p)) for p in new]
        _assign_owners(mats)
        self._plans.update({id(p): m for p, m in zip(new, mats)})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = st["step"].item()
            w, g, m, v = _local(p), _local(p.grad), _local(st["exp_avg"]), _local(st["exp_avg_sq"])
            w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        updates = {}
        for p in params:
            st = self.state[p]
            if not st:
                st["momentum_buffer"] = torch.zeros_like(p)
            buf, g = _local(st["momentum_buffer"]), _local(p.grad)
            buf.mul_(mu).add_(g)
            updates[p] = g.add(buf, alpha=mu) if group["nesterov"] else buf.clone()
        self._plan(params)
        ortho = self._orthogonalise(params, updates, group["ns_steps"])
        for p in params:
            m, n = p.shape[-2:]
            w = _local(p)
            w.mul_(1 - lr * wd)
            w.add_(ortho[p].to(w.dtype), alpha=-lr * 0.2 * math.sqrt(max(m, n)))

    def _orthogonalise(self, params, updates: dict, steps: int) -> dict:
        out = {}
        sharded: dict[tuple, list] = {}
        for p in params:
            mat = self._plans.get(id(p))
            if mat is None:
                out[p] = newton_schulz(updates[p], steps)
            else:
                sharded.setdefault((id(mat.mesh), mat.shard_dims), []).append(p)
        for layout_params in sharded.values():
            for bucket in self._buckets(layout_params):
                mats = [self._plans[id(p)] for p in bucket]
                fulls = _gather_to_owners(mats, [updates[p] for p in bucket])
                fulls = [None if f is None else newton_schulz(f, steps) for f in fulls]
                for p, block in zip(bucket, _scatter_from_owners(mats, fulls)):
                    out[p] = block
        return out

    def _buckets(self, params: list[torch.Tensor]):
        bucket, size = [], 0
        for p in params:
            if bucket and size + p.numel() > self.bucket_numel:
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        if bucket:
            yield bucket


def build_muon(modules: list[nn.Module], ocfg) -> tuple[Muon, dict[str, list[str]]]:
    """The Muon optimizer over ``modules`` and the parameter names in each group."""
    split = split_parameters(modules)
    groups = [
        {"params": [p for _, p in split["muon"]], "muon": True, "weight_decay": ocfg.weight_decay},
        {"params": [p for _, p in split["adamw_decay"]], "muon": False, "weight_decay": ocfg.weight_decay},
        {"params": [p for _, p in split["adamw_no_decay"]], "muon": False, "weight_decay": 0.0},
    ]
    opt = Muon([g for g in groups if g["params"]], lr=ocfg.lr, momentum=ocfg.muon_momentum,
               nesterov=ocfg.muon_nesterov, ns_steps=ocfg.muon_ns_steps, betas=(ocfg.beta1, ocfg.beta2),
               eps=ocfg.eps, bucket_numel=int(ocfg.muon_bucket_mb * (1 << 20) / 4))
    return opt, {k: [n for n, _ in v] for k, v in split.items()}
