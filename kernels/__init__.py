"""Triton kernels of DFM, installed as ``dfm.kernels``.

Each ``<op>.py`` holds one fused kernel and its launcher; ``reference.py`` holds the eager PyTorch definition
of every op (see its docstring for why in one Triton-free file). The limits below are the kernels' own, read
by the dispatcher (``dfm.ops``) without importing Triton.
"""

import torch

MAX_NUMEL = 2**31 - 1  # the kernels index tensors with int32
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # arithmetic is fp32; storage in any of these
