"""Scaled dot-product attention used by the transformer blocks.

The eager reference is PyTorch SDPA on (B, heads, N, head_dim) tensors, which itself falls back to
the math kernel on CPU. Faster backends are chosen here, behind one predicate, so the model file never
changes when a backend is added.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, q/k/v shaped (B, heads, N, head_dim); returns the same shape."""
    return F.scaled_dot_product_attention(q, k, v)
