"""Live tensor bytes on any device, CPU included: a dispatch mode that records the storage
of every tensor an op creates and drops it when the storage is freed (weak reference).

It counts exactly the tensor storages created while it is active (not the allocator's
caching or fragmentation, not memory allocated outside torch ops): after a forward pass,
``current`` is what the forward keeps alive for backward (saved activations, outputs,
the loss); ``peak`` is the most ever alive at once, transients included.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing (and may alias a parameter)
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t.untyped_storage())
        return out

    def _track(self, st: torch.UntypedStorage) -> None:
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self._refs:
            return
        self._refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._free(k, n))
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, n: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.current -= n

    def reset_peak(self) -> None:
        self.peak = self.current
