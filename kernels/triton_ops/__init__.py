"""Triton kernels, each wrapped in a ``torch.autograd.Function`` with a Triton forward
and backward. Imported only by ``kernels.dispatch`` when a Triton path is chosen, so a
missing Triton never breaks ``import kernels``.

On CPU they run only under the interpreter: ``TRITON_INTERPRET=1`` must be set before
these modules are imported (``triton.jit`` reads it when a kernel is decorated).
"""
