"""Typed run configuration: dataclasses are the schema, YAML files and ``key=value`` overrides fill them.

Keys keep the seed's vocabulary (``model``, ``exp_name``, ``data_dir``, ``stages_count``, ``stage_weights``,
``num_steps_per_scale``, ``stage_sampling_thresholds``, ``cfg_scale``, ``guidance_low``, ``guidance_high``,
``mode``, ``num_steps``). Unknown keys, wrong types and impossible combinations are errors that name the
key, raised by :func:`load_config` before any work starts. The DeepSpeed JSON is generated from this
config (``dfm.launch.engine.deepspeed_config``), never kept by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dfm.models import MODELS, model_config
from dfm.pyramid import check_divisible
from dfm.sampling import validate_schedule_args


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


@dataclass
class ArchConfig:
    """Optional overrides of the registered architecture (None keeps the registry's value)."""

    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None


@dataclass
class DataConfig:
    kind: str = "digits"  # "digits" (embedded scikit-learn digits) or "latents" (prepared SD-VAE latents)
    data_dir: str | None = None  # latent store for kind=latents
    resolution: int = 16  # digits: image side (8x8 digits resized); latents: read from the store
    channels: int = 1  # digits: 1; latents: read from the store
    num_classes: int = 10
    loader: str = "auto"  # latents: "auto" | "dali" | "torch"
    num_workers: int = 2


@dataclass
class DFMConfig:
    stages_count: int | None = None  # None: from the model name (SiT 1, DFM-SiT 2)
    stage_weights: list[float] | None = None  # None: [0.9, 0.1] for 2 stages, uniform otherwise
    per_sample_stage: bool = False
    t_sampler: str = "logit_normal"
    class_dropout: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 4000
    global_batch_size: int = 64
    micro_batch_size: int | None = None  # None: global batch / world size (no accumulation)
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" (autocast, fp32 weights) | "fp32"
    compile: bool = False
    zero_stage: int = 0
    offload: bool = False  # ZeRO-Offload: optimizer states and fp32 master weights on the host (ZeRO >= 1)
    # ZeRO >= 1 gradient communication (launch/engine.py says why these values)
    overlap_comm: bool = True  # reduce gradient buckets during backward (ZeRO 2, 3) instead of after it
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000  # elements per reduction bucket
    allgather_bucket_size: int = 50_000_000  # elements per all-gather of updated weights (ZeRO 1, 2)
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_ckpts: int = 2


@dataclass
class SampleConfig:
    mode: str = "ode"  # "ode" (staged Euler/Heun) | "sde" (Euler-Maruyama, single-stage models only)
    method: str = "euler"  # ODE integrator: "euler" | "heun"
    num_steps_per_scale: list[int] | None = None  # None: [40, 10] for 2 stages, [50] for 1
    stage_sampling_thresholds: list[float] | None = None  # None: [0.1] for 2 stages
    num_steps: int = 50  # SDE steps
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    per_class: int = 8  # grid columns per class row
    use_ema: bool = True


@dataclass
class Config:
    exp_name: str = "dfm-digits"
    model: str = "DFM-SiT-S/2"
    seed: int = 0
    output_dir: str = "runs"
    arch: ArchConfig = field(default_factory=ArchConfig)
    dfm: DFMConfig = field(default_factory=DFMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    # -- derived values -------------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        if self.dfm.stages_count is not None:
            return self.dfm.stages_count
        return MODELS[self.model].stages

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.exp_name

    def steps_per_stage(self) -> list[int]:
        if self.sample.num_steps_per_scale is not None:
            return list(self.sample.num_steps_per_scale)
        return [50] if self.stages == 1 else [40, 10] if self.stages == 2 else [40] + [10] * (self.stages - 1)

    def thresholds(self) -> list[float]:
        if self.sample.stage_sampling_thresholds is not None:
            return list(self.sample.stage_sampling_thresholds)
        return [0.1 ** (s + 1) for s in range(self.stages - 1)]

    def to_dict(self) -> dict:
        return asdict(self)


# -- typed filling ------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [arg for arg in args if arg is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own, more precise message
            return _coerce(value, real[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _fill(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; expected a mapping, got {value!r}")
            _fill(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _nest(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> dict:
    """``train.lr=3e-4`` -> ``{"train": {"lr": 0.0003}}``; values parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return _nest(key.strip(), yaml.safe_load(raw) if raw.strip() else None)


def _validate_sampling(cfg: Config, S: int) -> None:
    """The ``sample`` section against the model's ``S`` stages and its training (label dropout for CFG)."""
    steps, taus = cfg.steps_per_stage(), cfg.thresholds()
    if len(steps) != S:
        raise ConfigError(f"config key 'sample.num_steps_per_scale' has {len(steps)} entries for {S} stages: {steps}")
    try:
        validate_schedule_args(steps, taus)
    except ValueError as err:
        raise ConfigError(f"config key 'sample.stage_sampling_thresholds': {err}") from None
    if cfg.sample.mode == "sde" and S != 1:
        raise ConfigError("config key 'sample.mode': the SDE sampler is for single-stage (SiT) models only")
    if cfg.sample.cfg_scale != 1.0 and cfg.dfm.class_dropout == 0.0:
        raise ConfigError(
            f"config key 'sample.cfg_scale' is {cfg.sample.cfg_scale} but 'dfm.class_dropout' is 0: a model trained "
            "without label dropout has no unconditional prediction to guide with"
        )
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise ConfigError("config keys 'sample.guidance_low' <= 'sample.guidance_high' must lie in [0, 1]")


def validate(cfg: Config) -> None:
    """Cross-field checks, each naming the keys involved."""

    def choice(key: str, value, allowed) -> None:
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")

    if cfg.model not in MODELS:
        raise ConfigError(f"config key 'model': unknown model {cfg.model!r}; known: {', '.join(MODELS)}")
    choice("data.kind", cfg.data.kind, ("digits", "latents"))
    choice("data.loader", cfg.data.loader, ("auto", "dali", "torch"))
    choice("dfm.t_sampler", cfg.dfm.t_sampler, ("logit_normal", "uniform"))
    choice("train.precision", cfg.train.precision, ("auto", "bf16", "fp32"))
    choice("train.zero_stage", cfg.train.zero_stage, (0, 1, 2, 3))
    if cfg.train.offload and cfg.train.zero_stage == 0:
        raise ConfigError("config key 'train.offload' needs train.zero_stage >= 1 (ZeRO-Offload is a ZeRO feature)")
    choice("sample.mode", cfg.sample.mode, ("ode", "sde"))
    choice("sample.method", cfg.sample.method, ("euler", "heun"))
    if cfg.data.kind == "digits" and cfg.data.channels != 1:
        raise ConfigError(f"config key 'data.channels' must be 1 for the digits, got {cfg.data.channels}")
    S = cfg.stages
    if S < 1:
        raise ConfigError(f"config key 'dfm.stages_count' must be >= 1, got {S}")
    if cfg.model.startswith("SiT-") and S != 1:
        raise ConfigError(
            f"config key 'dfm.stages_count' is {S} but model {cfg.model} is single-stage (use DFM-{cfg.model})"
        )
    try:
        check_divisible(cfg.data.resolution, cfg.data.resolution, S, model_config(cfg.model).patch_size)
    except ValueError as err:
        raise ConfigError(f"config keys 'data.resolution' / 'model' / 'dfm.stages_count': {err}") from None
    if cfg.dfm.stage_weights is not None:
        if len(cfg.dfm.stage_weights) != S:
            raise ConfigError(f"config key 'dfm.stage_weights' has {len(cfg.dfm.stage_weights)} entries for {S} stages")
        if any(w < 0 for w in cfg.dfm.stage_weights) or sum(cfg.dfm.stage_weights) <= 0:
            raise ConfigError("config key 'dfm.stage_weights' must be non-negative with a positive sum")
    if not 0.0 <= cfg.dfm.class_dropout < 1.0:
        raise ConfigError(f"config key 'dfm.class_dropout' must lie in [0, 1), got {cfg.dfm.class_dropout}")
    _validate_sampling(cfg, S)
    t = cfg.train
    for key in ("max_steps", "global_batch_size", "log_every", "sample_every", "ckpt_every", "keep_ckpts"):
        if getattr(t, key) < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1, got {getattr(t, key)}")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1, got {getattr(t, key)}")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise ConfigError(f"config key 'train.micro_batch_size' must be >= 1, got {t.micro_batch_size}")
    if len(t.betas) != 2:
        raise ConfigError(f"config key 'train.betas' needs two values, got {t.betas}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must lie in [0, 1), got {t.ema_decay}")
    arch = model_config(cfg.model, **{k: v for k, v in asdict(cfg.arch).items() if v is not None})
    if arch.hidden_size % arch.num_heads or arch.hidden_size % 4:
        raise ConfigError(
            f"config keys 'arch.hidden_size' ({arch.hidden_size}) / 'arch.num_heads' ({arch.num_heads}): "
            "hidden size must be divisible by the head count and by 4"
        )


def check_training_data(cfg: Config) -> None:
    """What training needs beyond a valid config: the latent store (sampling a saved model does not)."""
    if cfg.data.kind == "latents" and not cfg.data.data_dir:
        raise ConfigError("config key 'data.data_dir' is required for data.kind=latents")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file <- overrides (``key=value`` strings or a nested dict), then validated.

    This is the path of a run config given on the command line, so it also checks the training data
    (:func:`check_training_data`); :func:`config_from_dict` rebuilds a saved config without it.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        try:
            _fill(cfg, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if isinstance(overrides, dict):
        _fill(cfg, overrides)
    else:
        for text in overrides or []:
            _fill(cfg, parse_override(text))
    validate(cfg)
    check_training_data(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with a run (``config.yaml`` or a checkpoint) or by ``dfm import``, validated.

    A latent model's saved config may name no store (an imported model has none): only training needs one.
    """
    cfg = Config()
    _fill(cfg, values)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
