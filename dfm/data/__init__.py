"""Data sources behind one loader interface.

Every loader is an endless iterator of ``(x, y)`` micro-batches (x float32 (B, C, H, W), y int64 (B,)),
sharded by rank and reshuffled each epoch from the seed, with ``state_dict`` / ``load_state_dict`` to
resume mid-epoch exactly.
"""

from __future__ import annotations

from dfm.data.digits import InMemoryLoader, load_digits_tensor


def build_loader(data_cfg, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, device=None):
    """The loader named by ``data_cfg.kind``: the embedded digits or a prepared latent store."""
    if data_cfg.kind == "digits":
        x, y = load_digits_tensor(data_cfg.resolution)
        return InMemoryLoader(x, y, micro_batch, rank, world_size, seed)
    if data_cfg.kind == "latents":
        from dfm.data.latents import build_latent_loader

        return build_latent_loader(
            data_cfg.data_dir,
            micro_batch,
            rank,
            world_size,
            seed,
            loader=data_cfg.loader,
            num_workers=data_cfg.num_workers,
            device=device,
        )
    raise ValueError(f"unknown data.kind {data_cfg.kind!r}")
