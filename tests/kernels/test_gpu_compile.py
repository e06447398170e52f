"""Without a GPU the parity tests run the kernels in Triton's interpreter, which accepts some programs that
the compiler rejects. This compiles every kernel variant ahead of time for an H100 (sm_90) with the ptxas
bundled in the Triton wheel, so the CUDA path is at least known to lower to machine code on every CI run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dfm.kernels import common, laplacian, noising

    assert not common.INTERPRETED
    target = GPUTarget("cuda", 90, 32)

    def build(fn, constexprs, dtype, num_warps):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.startswith(("T_", "KEEP_")):  # per-sample t and mask are fp32
                signature[name] = "*fp32"
            elif name.endswith("_ptr"):
                signature[name] = "*" + dtype
            else:
                signature[name] = "i32"
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=target, options={"num_warps": num_warps})
        assert kernel.asm["cubin"]

    bh, bw = common.tile_shape(64, 16, common.STENCIL_TILE)
    nh, nw = common.tile_shape(64, 32)
    plain = dict(STORE_LOW=True, STORE_BAND=True, NOISE_BAND=False, NOISE_LOW=False)
    fused_last = dict(STORE_LOW=False, STORE_BAND=False, NOISE_BAND=True, NOISE_LOW=True)
    fused_mid = dict(STORE_LOW=True, STORE_BAND=False, NOISE_BAND=True, NOISE_LOW=False)
    # Every variant the launchers use, each storage dtype at least once (compiling takes seconds each).
    variants = [(plain, "fp32"), (plain, "bf16"), (fused_last, "bf16"), (fused_last, "fp32"), (fused_mid, "fp16")]
    for flags, dtype in variants:
        build(laplacian._down_level_kernel, dict(flags, BH=bh, BW=bw), dtype, common.STENCIL_WARPS)
    for dtype in ("fp32", "bf16"):
        build(laplacian._up_add_kernel, dict(BH=bh, BW=bw), dtype, common.STENCIL_WARPS)
    for dtype in ("fp32", "bf16"):
        build(noising._noise_stage_kernel, dict(BH=nh, BW=nw), dtype, common.NUM_WARPS)
    print("compiled")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the parity tests compile and run the kernels")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named 'triton.backends.nvidia'" in result.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
