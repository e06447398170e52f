"""Decomposable Flow Matching: Laplacian-pyramid staged flow matching on SiT/DiT transformers."""

__version__ = "0.1.0"
