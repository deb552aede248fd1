"""Fused ops. The model calls ops only through this module; see ``kernels.dispatch``.

``configure(backend=...)`` sets the choice from the run config,
``available()`` reports which optional accelerators are installed, and
``backend_for(op, device)`` says which implementation an op will use.
"""

from kernels.dispatch import (  # noqa: F401
    BACKENDS,
    OPS,
    apply_rotary,
    attention,
    available,
    backend_for,
    configure,
    cross_entropy,
    gated_rms_norm,
    linear_cross_entropy,
    rms_norm,
    swiglu,
)
