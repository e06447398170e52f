"""Command-line values the sampling commands share (``dfm sample``, ``dfm generate``): checked where they are
parsed, so a bad one is one line naming the argument, before any checkpoint is read."""

from __future__ import annotations

import argparse
import re

from dfm.config import ConfigError, SampleConfig

SAMPLE_KEYS = frozenset(SampleConfig.__dataclass_fields__)
# the one key beyond sample.* a sampling command may set: where the latent store (and so its VAE) now is
STORE_KEY = "data.data_dir"
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1 (a count of samples, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def device_name(text: str) -> str:
    """argparse ``type``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE.match(text.strip()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text.strip()


def sampling_overrides(texts: list[str]) -> list[str]:
    """``key=value`` overrides of the sampling keys, as ``sample.<key>=value`` (the prefix may be left out),
    and of ``data.data_dir`` (a latent store that moved: it names the VAE).

    Any other key is refused by name: the model a checkpoint holds is fixed by its saved config, and changing
    ``arch.*`` or the data's shape there would only fail later, when the weights do not fit."""
    out = []
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.strip()
        bare = key.removeprefix("sample.")
        if not sep:
            raise ConfigError(f"{text!r} is not a key=value override")
        if key == STORE_KEY:
            out.append(f"{key}={value}")
            continue
        if bare not in SAMPLE_KEYS:
            raise ConfigError(
                f"{key!r} cannot be overridden when sampling a checkpoint: only the sampling keys "
                f"(sample.*: {', '.join(sorted(SAMPLE_KEYS))}) and {STORE_KEY}"
            )
        out.append(f"sample.{bare}={value}")
    return out


__all__ = ["SAMPLE_KEYS", "device_name", "positive_int", "sampling_overrides"]
