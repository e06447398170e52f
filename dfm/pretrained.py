"""Our own pretrained weights: :func:`load_pretrained` builds the model a saved config describes and loads it.

Weights come as a run directory (its latest checkpoint), a checkpoint directory, a directory written by
``dfm import`` (``ema.safetensors`` + ``config.yaml``, :mod:`dfm.importer`), or an exported
``F.safetensors`` (``F.yaml`` beside it, or the config in its metadata). Every key and shape is checked
against the architecture the config describes before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from torch import Tensor

from dfm import checkpoint
from dfm.config import Config, ConfigError, config_from_dict, load_config, parse_override
from dfm.models import DFMSiT


def resolve_pretrained(path: str | Path) -> Path:
    """The weights ``path`` names: a directory holding ``ema.safetensors`` (checkpoint or imported), an
    exported ``.safetensors`` file, or the latest checkpoint of a run directory (or its checkpoints folder)."""
    path = Path(path)
    if (path / "ema.safetensors").is_file() or (path.suffix == ".safetensors" and path.is_file()):
        return path
    for root in (path / "checkpoints", path):
        if (root / checkpoint.LATEST).is_file():
            return checkpoint.latest_checkpoint(root)
    raise FileNotFoundError(
        f"{path} is neither a checkpoint or imported directory (ema.safetensors), an exported .safetensors, "
        "nor a run with a 'latest' checkpoint"
    )


def check_intact(weights: Path, *names: str) -> None:
    """Check the files ``names`` of a checkpoint directory against its manifest (size and SHA-256), as a resume
    does, before they are read. An imported directory (``ema.safetensors`` and ``config.yaml`` only) and an
    exported file carry no manifest; a directory holding a checkpoint's other files without one is refused."""
    if not weights.is_dir():
        return
    if (weights / checkpoint.MANIFEST).is_file():
        checkpoint.verify(weights, only=names)
    elif any(weights.glob("trainer_rank*.json")) or (weights / checkpoint.MODEL_FILE).is_file():
        checkpoint.read_manifest(weights)  # raises: the manifest, written last, is missing


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _saved_config_values(weights: Path) -> dict:
    """The config saved with ``weights``: ``config.yaml`` in a directory, ``F.yaml`` or the metadata of ``F``."""
    cfg_file = weights / "config.yaml" if weights.is_dir() else weights.with_suffix(".yaml")
    if cfg_file.is_file():
        check_intact(weights, checkpoint.CONFIG_FILE)
        text, where = cfg_file.read_text(), cfg_file
    else:
        text, where = None, weights
        if weights.is_file():
            with safe_open(str(weights), framework="pt") as f:
                text = (f.metadata() or {}).get("config")
        if text is None:
            raise ConfigError(f"no config.yaml beside {weights} (nor in its metadata); pass --config")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys")
    return values


def pretrained_config(path: str | Path, config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The run config of the weights at ``path`` (see :func:`resolve_pretrained`), with ``key=value``
    overrides; or the config file ``config`` instead of the saved one."""
    if config is not None:
        return load_config(config, overrides)
    values = _saved_config_values(resolve_pretrained(path))
    for text in overrides or []:
        values = _merge(values, parse_override(text))
    return config_from_dict(values)


def check_state_dict(model: torch.nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """Raise ValueError, in one line naming the keys and shapes, unless ``state`` fits ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            more = f" and {len(items) - 6} more" if len(items) > 6 else ""
            problems.append(f"{what} {', '.join(items[:6])}{more}")
    if problems:
        raise ValueError(f"{source}: weights do not fit the model: {'; '.join(problems)}")


def load_pretrained(path: str | Path, cfg: Config | None = None, ema: bool | None = None) -> DFMSiT:
    """The model saved at ``path`` in eval mode on the CPU, with its EMA weights by default.

    ``path``: a run directory (its latest checkpoint), a checkpoint directory, an exported ``.safetensors``
    or a directory written by ``dfm import``. ``cfg``: the run config to build the model from (default: the
    one saved with the weights, :func:`pretrained_config`). ``ema``: False takes the raw (non-EMA) weights
    of a checkpoint directory; None follows ``cfg.sample.use_ema``. Weights that do not fit the architecture
    the config describes raise ValueError naming the keys and shapes. A checkpoint's files are checked
    against its manifest first (:func:`check_intact`), and weights holding NaN or inf are refused by name.
    """
    weights = resolve_pretrained(path)
    cfg = cfg if cfg is not None else pretrained_config(weights)
    use_ema = cfg.sample.use_ema if ema is None else ema
    if not use_ema and not weights.is_dir():
        raise ValueError(f"{weights} is an exported file holding one set of weights; raw weights need a checkpoint")
    name = checkpoint.EMA_FILE if use_ema else checkpoint.MODEL_FILE
    if weights.is_dir() and (weights / name).is_file():  # (a missing file is named by the loader below)
        check_intact(weights, name)  # the saved config was checked when it was read
    state = checkpoint.load_ema_weights(weights) if use_ema else checkpoint.load_model_weights(weights)
    checkpoint.check_finite(state, weights / name if weights.is_dir() else weights)
    model = DFMSiT.from_config(cfg)
    check_state_dict(model, state, weights)
    model.load_state_dict(state)
    return model.eval()


__all__ = ["check_intact", "check_state_dict", "load_pretrained", "pretrained_config", "resolve_pretrained"]
