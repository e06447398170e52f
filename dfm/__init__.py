"""Decomposable Flow Matching: Laplacian-pyramid staged flow matching on SiT/DiT transformers."""

from dfm.pretrained import load_pretrained

__version__ = "0.1.0"
__all__ = ["load_pretrained"]
