"""Data sources behind one loader interface.

Every loader is an endless iterator of ``(x, y)`` micro-batches (x float32 (B, C, H, W), y int64 (B,)),
sharded by rank and reshuffled each epoch from the seed, with ``state_dict`` / ``load_state_dict`` to
resume mid-epoch exactly.
"""

from __future__ import annotations

from dfm.data.digits import InMemoryLoader, load_digits_tensor


def build_loader(
    data_cfg, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, device=None, accum_steps: int = 1
):
    """The loader named by ``data_cfg.kind``: the embedded digits or a prepared latent store.

    ``accum_steps`` lets the loaders cut each global batch into per-rank, per-accumulation-step slots, so that
    the global batch does not depend on the world size (``InMemoryLoader``, ``ShardedStream``).
    """
    if data_cfg.kind == "digits":
        x, y = load_digits_tensor(data_cfg.resolution)
        return InMemoryLoader(x, y, micro_batch, rank, world_size, seed, accum_steps=accum_steps)
    if data_cfg.kind == "latents":
        from dfm.data.latents import build_latent_loader

        check_store_matches(data_cfg, world_size)
        return build_latent_loader(
            data_cfg.data_dir,
            micro_batch,
            rank,
            world_size,
            seed,
            loader=data_cfg.loader,
            num_workers=data_cfg.num_workers,
            device=device,
            accum_steps=accum_steps,
        )
    raise ValueError(f"unknown data.kind {data_cfg.kind!r}")


def check_store_matches(data_cfg, world_size: int = 1) -> None:
    """Validate the latent store and that its shape and classes are those the config builds the model for."""
    from dfm.config import ConfigError
    from dfm.data.latents import validate_store

    store = validate_store(data_cfg.data_dir, world_size)
    _, h, w = store.shape
    found = {"data.channels": store.channels, "data.resolution": h, "data.num_classes": store.num_classes}
    wanted = {"data.channels": data_cfg.channels, "data.resolution": data_cfg.resolution}
    wanted["data.num_classes"] = data_cfg.num_classes
    if h != w:
        raise ConfigError(f"latent store {store.root} holds {h}x{w} latents; only square latents are supported")
    for key, value in wanted.items():
        # a model may have more classes than a store uses, never fewer
        mismatch = found[key] > value if key == "data.num_classes" else found[key] != value
        if mismatch:
            raise ConfigError(
                f"config key '{key}' is {value} but the latent store {store.root} has {found[key]} "
                f"(latents of {store.channels}x{h}x{w}, {store.num_classes} classes)"
            )
