"""Expert computation for the MoE sublayer, and the expert-parallel communication seam.

Tokens arrive sorted by expert (``counts[e]`` consecutive rows per local expert), so
every implementation here works on contiguous slices, never on single tokens:

- ``grouped_mm``: ``torch._grouped_mm`` (one kernel for all experts; CUDA sm90+ with
  bf16, and CPU in recent torch). Needs fp32/bf16/fp16 and rows aligned to 16 bytes;
  availability is probed once per (device type, dtype) at runtime.
- ``loop``: one matmul per expert on its slice (a Python loop over experts only).
- ``bmm``: pad every expert to the largest count and run one batched matmul.
- ``auto``: ``grouped_mm`` where it works, else ``loop``.
"""

from __future__ import annotations

import torch

import kernels

IMPLS = ("auto", "grouped_mm", "loop", "bmm")
_PROBED: dict[tuple[str, torch.dtype], bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the grouped-mm
    backward rejects stride-0 (expanded) gradients such as those of ``.sum()``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    return (t.shape[-1] * t.element_size()) % 16 == 0


def grouped_mm_available(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (dtype, alignment, device)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type == "meta":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if any(w.dtype != x.dtype or not _aligned(w) for w in weights) or not _aligned(x):
        return False
    key = (x.device.type, x.dtype)
    if key not in _PROBED:
        try:
            a = torch.zeros(8, 8, device=x.device, dtype=x.dtype)
            b = torch.zeros(2, 8, 8, device=x.device, dtype=x.dtype)
            torch._grouped_mm(a, b, offs=torch.tensor([4, 8], device=x.device, dtype=torch.int32))
            _PROBED[key] = True
        except (RuntimeError, NotImplementedError):
            _PROBED[key] = False
    return _PROBED[key]


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    # _grouped_mm is not on the autocast lists, so apply the autocast dtype by hand.
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return w.dtype


def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))


def experts_grouped_mm(x, counts, w_gate, w_up, w_down):
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = kernels.swiglu(_gmm(x, w_gate, offs), _gmm(x, w_up, offs))
    return _gmm(h, w_down, offs)


def experts_loop(x, counts, w_gate, w_up, w_down):
    # split/unbind (not slicing per expert) so backward builds each gradient in one piece
    # instead of one full-size zero tensor per expert.
    outs = []
    for xe, wg, wu, wd in zip(x.split(counts.tolist()), w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)):
        if xe.shape[0]:
            outs.append(kernels.swiglu(xe @ wg, xe @ wu) @ wd)
    if not outs:
        return x.new_zeros(x.shape[0], w_down.shape[-1])
    return torch.cat(outs)


def experts_bmm(x, counts, w_gate, w_up, w_down):
    n_exp = counts.shape[0]
    cap = int(counts.max()) if x.shape[0] else 0
    if cap == 0:
        return x.new_zeros(x.shape[0], w_down.shape[-1])
    eid = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(x.shape[0], device=x.device) - starts[eid]
    padded = x.new_zeros(n_exp, cap, x.shape[-1]).index_put((eid, pos), x)
    h = kernels.swiglu(torch.bmm(padded, w_gate), torch.bmm(padded, w_up))
    return torch.bmm(h, w_down)[eid, pos]


def run_experts(x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """SwiGLU experts on expert-sorted rows: rows ``[sum(counts[:e]), sum(counts[:e+1]))``
    go through expert ``e``. ``x [N, d]``, ``w_gate/w_up [E, d, h]``, ``w_down [E, h, d]``."""
    if impl not in IMPLS:
        raise ValueError(f"expert impl '{impl}' not in {'|'.join(IMPLS)}")
    dtype = _compute_dtype(x, w_gate)
    x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    if x.shape[0] == 0:
        # No rows for any local expert: keep the output attached to ``x`` and the weights
        # anyway, so backward still runs the expert-parallel exchange that produced ``x``
        # (its peers wait for it) and every weight gets a (zero) gradient for data parallelism.
        tie = x.sum() + w_gate.sum() + w_up.sum() + w_down.sum()
        return x.new_zeros(0, w_down.shape[-1]) + tie * 0
    if impl in ("auto", "grouped_mm"):
        if grouped_mm_available(x, w_gate, w_up, w_down):
            return experts_grouped_mm(x, counts, w_gate, w_up, w_down)
        if impl == "grouped_mm":
            raise RuntimeError(f"torch._grouped_mm unavailable for {x.dtype} on {x.device.type} "
                               f"with d={x.shape[-1]}, h={w_gate.shape[-1]}")
        impl = "loop"
    return experts_bmm(x, counts, w_gate, w_up, w_down) if impl == "bmm" else \
        experts_loop(x, counts, w_gate, w_up, w_down)


class LocalExpertComm:
    """Single-device expert communication: every expert is local, so both steps are identity.

    Contract for an expert-parallel replacement (set ``moe.ep_comm = YourComm(...)``):

    - ``dispatch(tokens_sorted [N, d], counts_per_expert [E]) -> (local_tokens, local_counts, ctx)``:
      ``tokens_sorted`` holds this rank's routed rows grouped by *global* expert id. Exchange
      ``counts_per_expert`` first (all_to_all of per-rank counts), then the rows
      (``all_to_all_single`` with those splits), and return rows grouped by *local* expert
      in the order of ``moe.local_experts`` with ``local_counts [len(local_experts)]``.
    - ``combine(out [M, d], ctx) -> [N, d]``: the reverse exchange, returning rows in exactly
      the order of ``tokens_sorted``. Both must be differentiable (autograd-aware collectives).
    """

    def dispatch(self, tokens_sorted: torch.Tensor, counts_per_expert: torch.Tensor):
        return tokens_sorted, counts_per_expert, None

    def combine(self, out: torch.Tensor, ctx) -> torch.Tensor:
        return out
