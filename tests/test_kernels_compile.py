"""Every Triton kernel, in every constexpr variant the wrappers launch, compiles ahead of
time for a CUDA target (sm_80) down to a cubin, without a GPU.

The interpreter tests check the math; this checks what the interpreter cannot: that the
kernels pass Triton's compiler (types of loop-carried values, masks, casts). It runs in a
subprocess because TRITON_INTERPRET must be unset when the kernels are decorated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _signature(fn, constexprs: dict, types: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name[0].isupper() and name not in ("M", "N", "G", "NG", "R", "S", "H", "V", "HALF"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _cases():
    from kernels.triton_ops import cross_entropy, norms, rotary, swiglu

    bf = "*bf16"
    scalars = {"eps": "fp32", "z_loss": "fp32"}
    for has_z in (False, True):
        yield norms._norm_fwd, dict(HAS_Z=has_z, BLOCK_M=4, BLOCK=1024), dict(scalars, X=bf, Z=bf, Y=bf)
    for has_z in (False, True):
        yield norms._norm_bwd, dict(HAS_Z=has_z, BLOCK_M=1, BLOCK=8192), dict(scalars, DY=bf, X=bf, Z=bf, DX=bf, DZ=bf)
    for sign in (1, -1):
        yield rotary._rotary, dict(SIGN=sign, BLOCK_R=32, BLOCK_D=64), dict(X=bf, Y=bf)
    yield swiglu._swiglu_fwd, dict(BLOCK_M=4, BLOCK=1024), dict(G=bf, U=bf, Y=bf)
    yield swiglu._swiglu_bwd, dict(BLOCK_M=4, BLOCK=1024), dict(G=bf, U=bf, DY=bf, DG=bf, DU=bf)
    yield cross_entropy._ce_stats, dict(BLOCK=4096), dict(X=bf, LABELS="*i64")
    yield cross_entropy._ce_grad, dict(BLOCK=4096), dict(scalars, X=bf, OUT=bf, LABELS="*i64")


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 80, 32)
    n = 0
    for fn, constexprs, types in _cases():
        src = ASTSource(fn=fn, signature=_signature(fn, constexprs, types), constexprs=constexprs)
        compiled = triton.compile(src, target=target)
        assert compiled.asm.get("cubin"), fn.__name__
        n += 1
    print(f"compiled {n} kernel variants for sm_80")


@pytest.mark.timeout(300)
def test_all_kernels_compile_for_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled 10 kernel variants" in out.stdout


if __name__ == "__main__":
    main()
