"""Triton kernels of DFM, installed as ``dfm.kernels``; each file holds its PyTorch reference."""
