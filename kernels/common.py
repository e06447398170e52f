"""Helpers shared by the Triton kernels: tile shapes, rounding to the storage dtype, and the interpreter flag.

``INTERPRETED`` records whether ``TRITON_INTERPRET=1`` was set when these kernels were defined: Triton
decides at ``@triton.jit`` time whether a function runs compiled or in its NumPy interpreter, so a
dispatcher must know which one it got before launching on CPU tensors.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per 2-D tile and warps per program. The stencil kernels hold 9 neighbour tiles of the low level
# plus 18 fine rows: ptxas for sm_90 (Triton 3.7.1) gives 128 registers and no spills at 512 low pixels with
# 8 warps in fp32 (98 in bf16), but 255 registers and ~700 bytes of spills at 1024 with 4 warps. The
# elementwise noising kernel stays far below the register limit at 1024 elements with 4 warps. The
# interpreter costs milliseconds per program instance whatever its size, so there one program covers a
# whole small test tensor.
STENCIL_TILE = 16384 if INTERPRETED else 512
STENCIL_WARPS = 8
TILE_ELEMENTS = 16384 if INTERPRETED else 1024
NUM_WARPS = 4


def tile_shape(rows: int, cols: int, elements: int = TILE_ELEMENTS) -> tuple[int, int]:
    """Power-of-two (BH, BW) tile with BH * BW <= ``elements`` covering up to ``rows`` x ``cols``."""
    bw = min(triton.next_power_of_2(cols), elements)
    bh = min(triton.next_power_of_2(rows), max(1, elements // bw))
    return bh, bw


@triton.jit
def rounded(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``DTYPE``, returned as fp32 (exactly representable in ``DTYPE``).

    bf16 rounding is done on the bits: it is what the hardware conversion computes for finite values, and
    Triton's interpreter otherwise truncates fp32 -> bf16, which would cost up to one ulp instead of half.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def store_rounded(ptr, x, mask):
    """Store fp32 ``x`` into ``ptr``'s element type, rounding to nearest-even."""
    tl.store(ptr, rounded(x, ptr.dtype.element_ty).to(ptr.dtype.element_ty), mask=mask)
