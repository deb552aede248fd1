"""Chooses an implementation per op: ``reference`` (pure torch), ``triton`` or ``vendor``
(flash-attn for attention).

Which backend an op uses, first match wins:
1. env ``PRETRAIN_KERNEL_<OP>`` (e.g. ``PRETRAIN_KERNEL_RMS_NORM=reference``),
2. env ``PRETRAIN_KERNELS``,
3. ``configure(backend=...)`` (the trainer's ``train.kernels``),
4. ``auto``.
``auto`` picks vendor, then Triton, on CUDA when importable, and the reference on
CPU. A global ``triton``/``vendor`` applies to the ops that have such an implementation
(the others stay ``auto``); forcing one op to a path it lacks, or to one that cannot run
here (Triton on CPU without ``TRITON_INTERPRET=1``, flash-attn not installed), raises
an error naming the op and the reason. The choice is cached per (op, device type);
``configure()`` clears the cache and re-reads the environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

import torch
from torch.distributed.tensor import DTensor

from kernels import reference

BACKENDS = ("auto", "reference", "triton", "vendor")
# op -> implementations besides the reference
OPS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("triton",),
    "gated_rms_norm": ("triton",),
    "apply_rotary": ("triton",),
    "swiglu": ("triton",),
    "cross_entropy": ("triton",),
    "linear_cross_entropy": ("triton",),
    "attention": ("vendor",),
}
_TRITON_MODULE = {
    "rms_norm": "norms", "gated_rms_norm": "norms",
    "apply_rotary": "rotary", "swiglu": "swiglu",
    "cross_entropy": "cross_entropy", "linear_cross_entropy": "cross_entropy",
}
ENV_ALL = "PRETRAIN_KERNELS"

_config: dict = {"backend": "auto"}
_cache: dict[tuple[str, str], Callable] = {}


def env_key(op: str) -> str:
    return "PRETRAIN_KERNEL_" + op.upper()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def interpret_enabled() -> bool:
    """Whether Triton kernels run in the interpreter (as decided when they were imported)."""
    common = sys.modules.get("kernels.triton_ops._common")
    if common is not None:
        return common.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available() -> dict[str, bool]:
    """What is present, without importing any of it."""
    return {
        "cuda": torch.cuda.is_available(),
        "triton": _installed("triton"),
        "triton_interpret": interpret_enabled(),
        "flash_attn": _installed("flash_attn"),
        "mamba_ssm": _installed("mamba_ssm"),
        "causal_conv1d": _installed("causal_conv1d"),
    }


def _check_backend(name: str, where: str) -> str:
    b = str(name).strip().lower()
    if b not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend '{name}' (choose {'|'.join(BACKENDS)})")
    return b


def configure(backend: str = "auto") -> None:
    """Set the config-level choice (env vars still win) and forget cached choices."""
    _config["backend"] = _check_backend(backend, "kernels backend")
    _cache.clear()


def _requested(op: str) -> tuple[str, str, bool]:
    """(backend, where it came from, whether it is specific to this op)."""
    if os.environ.get(env_key(op)):
        return _check_backend(os.environ[env_key(op)], env_key(op)), env_key(op), True
    if os.environ.get(ENV_ALL):
        return _check_backend(os.environ[ENV_ALL], ENV_ALL), ENV_ALL, False
    return _config["backend"], "kernels backend", False


def _why_not(op: str, backend: str, device: str) -> str | None:
    """Reason ``backend`` cannot run ``op`` on ``device`` (None if it can)."""
    if backend == "triton":
        if not _installed("triton"):
            return "triton is not installed (pip install triton)"
        if device != "cuda" and not interpret_enabled():
            return (f"triton kernels need a CUDA device (got {device}); set TRITON_INTERPRET=1 "
                    "before importing kernels to run them in the interpreter")
    if backend == "vendor":
        if not _installed("flash_attn"):
            return "flash-attn is not installed (pip install .[gpu] on a CUDA machine)"
        if device != "cuda":
            return f"flash-attn needs a CUDA device (got {device})"
    return None


def _load(op: str, backend: str, strict: bool) -> Callable:
    if backend == "reference":
        return getattr(reference, op)
    if backend == "triton":
        mod = importlib.import_module(f"kernels.triton_ops.{_TRITON_MODULE[op]}")
        return getattr(mod, op)
    from kernels.flash import make_flash_attention
    return make_flash_attention(strict)


def resolve(op: str, device: str | torch.device) -> tuple[str, Callable]:
    """(backend name, implementation) for ``op`` on tensors of ``device``."""
    device = torch.device(device).type if not isinstance(device, str) else device
    if op not in OPS:
        raise ValueError(f"unknown kernel op '{op}' (ops: {', '.join(OPS)})")
    want, source, specific = _requested(op)
    if want not in ("auto", "reference") and want not in OPS[op]:
        if specific:
            raise ValueError(f"kernel '{op}': no '{want}' implementation (set by {source}; "
                             f"choose {'|'.join(('auto', 'reference') + OPS[op])})")
        want = "auto"
    if want == "auto":
        for cand in OPS[op] if device == "cuda" else ():
            if _why_not(op, cand, device) is None:
                try:
                    return cand, _load(op, cand, strict=False)
                except ImportError:  # installed but broken (e.g. CUDA ABI mismatch): fall back
                    continue
        return "reference", _load(op, "reference", False)
    why = _why_not(op, want, device)
    if why is not None:
        raise RuntimeError(f"kernel '{op}': backend '{want}' (set by {source}) unavailable: {why}")
    try:
        return want, _load(op, want, strict=True)
    except ImportError as e:
        raise RuntimeError(f"kernel '{op}': backend '{want}' (set by {source}) failed to import: "
                           f"{e}") from None


def backend_for(op: str, device: str | torch.device = "cpu") -> str:
    """Name of the backend ``op`` uses on ``device`` (for logs and tests)."""
    return resolve(op, device)[0]


def _impl(op: str, device: torch.device) -> Callable:
    key = (op, device.type)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = resolve(op, device.type)[1]
    return fn


def _impl_for(op: str, t: torch.Tensor) -> Callable:
    """The chosen implementation, except for DTensors (tensor parallel norms), which the
    fused kernels cannot take: their sharding is handled by the reference's torch ops."""
    if isinstance(t, DTensor):
        return getattr(reference, op)
    return _impl(op, t.device)


# ---- the ops (signatures as in kernels.reference) --------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _impl_for("rms_norm", x)(x, weight, eps)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    return _impl_for("gated_rms_norm", x)(x, z, weight, eps, group_size)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return _impl_for("apply_rotary", q)(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _impl_for("swiglu", gate)(gate, up)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    return _impl_for("cross_entropy", logits)(logits, labels, ignore_index, z_loss, reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, z_loss: float = 0.0, chunk_size: int = 0,
                         reduction: str = "mean", process_group=None,
                         reduce_hidden_grad: bool = True) -> torch.Tensor:
    return _impl_for("linear_cross_entropy", hidden)(
        hidden, weight, labels, ignore_index, z_loss, chunk_size, reduction, process_group,
        reduce_hidden_grad)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    return _impl_for("attention", q)(q, k, v, doc_ids)


for _op in OPS:  # one docstring, kept with the reference
    globals()[_op].__doc__ = getattr(reference, _op).__doc__
del _op
