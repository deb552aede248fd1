"""Context parallelism for recurrent mixers (Mamba-2, the ``P`` mixer's Mamba heads, and any
future one such as Gated DeltaNet): exact state passing between sequence shards.

Under context parallelism each cp rank holds a few contiguous *pieces* of every sequence
(with the zig-zag layout, rank ``i`` of ``N`` holds global chunks ``i`` and ``2N-1-i`` of
``2N``, concatenated in that order). A recurrent mixer needs two things from the pieces
before its own:

* its causal conv needs a *halo*: the ``K-1`` pre-conv inputs preceding each piece;
* its scan needs the *state entering* each piece. A linear recurrence
  ``h_t = a_t h_{t-1} + u_t`` lets each piece run from a zero state and report its final
  state ``F`` and its total log-decay ``log prod a_t``; the state entering piece ``g`` is then
  ``S_g = keep_g (F_{g-1} + exp(d_{g-1}) S_{g-1})``, a scan over a few KB per piece.
  One all-gather shares ``(F, d)`` of all pieces; every rank runs the tiny scan redundantly and
  corrects its outputs by the entering state's contribution (linear in the state).

Both exchanges are autograd-aware (:class:`_AllGather`: all-gather forward,
reduce-scatter backward), so the backward flows the same way. Document resets: the shard knows
each piece's first/last document id, whether a document starts inside it, and the length of
its trailing run, so a state or halo never crosses a document boundary.

A mixer uses the shard through :class:`RecurrentShard`'s protocol, in code that reads like
single-device code (see ``Mamba2Mixer._mix_sharded``):

``pieces = shard.split(t)``            local [B, S, ...] -> list of [B, L_j, ...]
``shard.cat(pieces)``                  the inverse
``shard.halo(pieces, width, doc_reset)`` -> per piece [B, width, ...] preceding inputs
``shard.entering_states(finals, log_decays | transitions=, doc_reset)`` -> per piece [B, *state]

Build one per batch with :func:`zigzag_shard` (or :class:`RecurrentShard` for another layout)
and put it on the model's ``ForwardContext.recurrent_shard``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.ssd import segment_ids


class _AllGather(torch.autograd.Function):
    """[*] -> [world, *] over ``group``; backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank's loss may read every rank's pieces: the gradient of a rank's input
        # is the sum over ranks of their gradients for its slice (a reduce-scatter)
        out = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_tensor(out, grad.contiguous().view(-1), group=ctx.group)
        return out.view(grad.shape[1:]), None


def all_gather_autograd(t: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather: ``t`` [*] on every rank -> [world, *] (gloo and NCCL)."""
    return _AllGather.apply(t, group)


def zigzag_chunks(cp: int) -> list[list[int]]:
    """Global chunk indices (of ``2*cp``) each cp rank holds, in local order."""
    return [[i, 2 * cp - 1 - i] for i in range(cp)]


class RecurrentShard:
    """A rank's pieces of every sequence and the exchanges a recurrent mixer needs.

    ``chunks[r]`` lists the global chunk indices rank ``r`` holds (in its local order);
    ``lengths[c]`` is chunk ``c``'s length (chunks tile the sequence in index order).
    ``doc_ids`` [B, S_local] are the rank's document ids (global values), or None.
    Construction is collective over ``group`` when ``doc_ids`` is given.
    """

    def __init__(self, group, chunks: list[list[int]], lengths: list[int],
                 doc_ids: torch.Tensor | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if len(chunks) != self.world:
            raise ValueError(f"layout names {len(chunks)} ranks, the cp group has {self.world}")
        flat = sorted(c for cs in chunks for c in cs)
        if flat != list(range(len(lengths))) or len({len(cs) for cs in chunks}) != 1:
            raise ValueError(f"chunks {chunks} must cover 0..{len(lengths) - 1} once, equally per rank")
        self.chunks, self.lengths = chunks, list(lengths)
        self.mine = chunks[self.rank]
        self.where = {c: (r, j) for r, cs in enumerate(chunks) for j, c in enumerate(cs)}
        self.piece_lengths = [self.lengths[c] for c in self.mine]
        self.local_len = sum(self.piece_lengths)
        self.meta = None if doc_ids is None else self._doc_meta(doc_ids)

    # ---- layout --------------------------------------------------------------------
    def split(self, t: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """The local tensor's pieces along ``dim`` (views), in local order."""
        if t.shape[dim] != self.local_len:
            raise ValueError(f"local length {t.shape[dim]} != the shard's {self.local_len}")
        return list(t.split(self.piece_lengths, dim=dim))

    def cat(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        return torch.cat(pieces, dim=dim)

    def global_starts(self) -> list[int]:
        """Global position of each local piece's first token."""
        starts = [0]
        for n in self.lengths[:-1]:
            starts.append(starts[-1] + n)
        return [starts[c] for c in self.mine]

    def positions(self, device=None) -> torch.Tensor:
        """Global positions [S_local] of the local tokens (e.g. for RoPE)."""
        return torch.cat([torch.arange(s, s + n, device=device)
                          for s, n in zip(self.global_starts(), self.piece_lengths)])

    # ---- document boundaries (collective once per batch) --------------------------------
    def _doc_meta(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """[world, n_local, B, 4] int64: first id, last id, trailing-run length, starts-inside."""
        rows = []
        for ids in self.split(doc_ids.long()):
            seg = segment_ids(ids)
            run = (seg == seg[:, -1:]).sum(1)
            rows.append(torch.stack([ids[:, 0], ids[:, -1], run, (seg[:, -1] > 0).long()], -1))
        mine = torch.stack(rows).cpu()
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return torch.stack(out)

    def _info(self, c: int) -> torch.Tensor:
        r, j = self.where[c]
        return self.meta[r, j]  # [B, 4]

    def _keep(self, c: int) -> torch.Tensor:
        """[B] bool: chunk ``c`` continues the document chunk ``c-1`` ends in."""
        return self._info(c - 1)[:, 1] == self._info(c)[:, 0]

    # ---- conv halo ---------------------------------------------------------------------
    def halo(self, pieces: list[torch.Tensor], width: int, doc_reset: bool = True) -> list[torch.Tensor]:
        """For each local piece [B, L, ...], the ``width`` inputs preceding it in the global
        sequence [B, width, ...]: zeros before the sequence start and where they belong to
        an earlier document than the piece's first token (so a conv may treat the halo as
        part of that token's document)."""
        if width == 0:
            return [p[:, :0] for p in pieces]
        if min(self.lengths) < width:
            raise ValueError(f"cp chunks of {min(self.lengths)} tokens are shorter than the conv halo "
                             f"of {width}: use a shorter conv or fewer cp ranks for this length")
        tails = all_gather_autograd(torch.stack([p[:, -width:] for p in pieces]), self.group)
        out = []
        for p, c in zip(pieces, self.mine):
            if c == 0:
                out.append(torch.zeros_like(p[:, :width]))
                continue
            r, j = self.where[c - 1]
            h = tails[r, j]
            if doc_reset and self.meta is not None:
                run = self._info(c - 1)[:, 2].clamp(max=width)
                pos = torch.arange(width).unsqueeze(0)  # halo row k is keepable iff k >= width - run
                keep = (pos >= width - run.unsqueeze(1)) & self._keep(c).unsqueeze(1)
                h = h * keep.to(device=h.device, dtype=h.dtype).view(*keep.shape, *[1] * (h.dim() - 2))
            out.append(h)
        return out

    # ---- state passing -----------------------------------------------------------------
    def entering_states(self, finals: list[torch.Tensor], log_decays: list[torch.Tensor] | None = None,
                        doc_reset: bool = True, transitions: list[torch.Tensor] | None = None
                        ) -> list[torch.Tensor]:
        """States entering each local piece (differentiable; collective over the cp group).

        ``finals[j]`` [B, *state]: piece j's final state when started from zero. How the
        piece maps its entering state to its end, one of:
        ``log_decays[j]`` [B, *prefix of state]: a diagonal decay, ``S -> exp(d) * S``
        (Mamba-2: the sum of ``dt * A`` over the piece);
        ``transitions[j]`` [B, *state[:-1], k]: a matrix on the last state dim, ``S -> S @ M``
        (delta-rule mixers: the product of ``alpha_t (I - beta_t k_t k_t^T)``).
        Both ignore document resets: with ``doc_reset`` the shard applies them itself.
        Returns [B, *state] per piece (finals' dtype).
        """
        if (log_decays is None) == (transitions is None):
            raise ValueError("give exactly one of log_decays and transitions")
        moves = log_decays if log_decays is not None else transitions
        shape, mshape = finals[0].shape, moves[0].shape
        n_state = finals[0][0].numel()
        packed = torch.stack([torch.cat([f.reshape(shape[0], -1), m.reshape(shape[0], -1).to(f.dtype)], 1)
                              for f, m in zip(finals, moves)])
        allp = all_gather_autograd(packed, self.group)  # [world, n_local, B, n_state + n_move]
        if log_decays is not None:
            mshape = (*mshape, *[1] * (len(shape) - len(mshape)))
        reset = doc_reset and self.meta is not None
        states, S = {}, None
        for c in range(max(self.mine) + 1):
            if c > 0:
                r, j = self.where[c - 1]
                F = allp[r, j, :, :n_state].view(shape)
                if S is None:
                    S = F
                else:
                    m = allp[r, j, :, n_state:].view(mshape)
                    S = F + (m.exp() * S if log_decays is not None else S @ m)
                    if reset:  # a document starting inside chunk c-1 cut what entered it
                        inside = self._info(c - 1)[:, 3].bool().to(F.device)
                        S = torch.where(inside.view(-1, *[1] * (len(shape) - 1)), F, S)
                if reset:
                    keep = self._keep(c).to(device=F.device, dtype=F.dtype)
                    S = S * keep.view(-1, *[1] * (len(shape) - 1))
            states[c] = S
        return [states[c] if states[c] is not None else torch.zeros_like(finals[0]) for c in self.mine]


def zigzag_shard(group, seq_len: int, doc_ids: torch.Tensor | None = None) -> RecurrentShard:
    """The shard of the zig-zag cp layout (rank ``i`` holds chunks ``i`` and ``2N-1-i`` of
    ``2N`` equal chunks of ``seq_len``), for one batch with local ``doc_ids`` [B, seq_len/N]
    (global id values) or None. Collective over ``group`` (the cp process group)."""
    cp = dist.get_world_size(group)
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len {seq_len} is not divisible by 2*cp = {2 * cp}")
    return RecurrentShard(group, zigzag_chunks(cp), [seq_len // (2 * cp)] * (2 * cp), doc_ids)
