"""The SD-VAE (diffusers' ``AutoencoderKL``): it encodes the latent store (``dfm prepare encode``) and decodes
generated latents (``dfm generate``). diffusers is imported on first use only: pixel runs never need it."""

from __future__ import annotations

import torch

from dfm.data.store import LATENT_SCALE

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # the SD VAE the seed's encode step uses


def load_vae(vae: str, subfolder: str | None = None, device: str | torch.device = "cpu"):
    """diffusers ``AutoencoderKL`` from a local folder or a hub name, in eval mode on ``device``, fp32."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(vae, subfolder=subfolder, low_cpu_mem_usage=False)
    return model.to(device).eval().requires_grad_(False)


def vae_scale(vae: str, subfolder: str | None = None) -> float:
    """The VAE's ``scaling_factor`` from its config (0.18215 for the SD VAE), without loading weights; the SD
    value when the config cannot be read."""
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(vae, subfolder=subfolder)
    except Exception:
        return LATENT_SCALE
    return float(config.get("scaling_factor", LATENT_SCALE))
