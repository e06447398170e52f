"""Decomposable Flow Matching: Laplacian-pyramid staged flow matching on SiT/DiT transformers."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name: str):
    # `import dfm` stays light: the model (and through it Triton) loads on first use of `dfm.load_pretrained`.
    # Triton decides between interpreter and compiler when its functions are defined, so importing it as a
    # side effect of `import dfm` would fix that choice before a caller sets TRITON_INTERPRET.
    if name == "load_pretrained":
        from dfm.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'dfm' has no attribute {name!r}")
