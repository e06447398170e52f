"""Typed run configuration: dataclasses are the schema, YAML files and ``key=value`` overrides fill them.

Keys keep the seed's vocabulary (``model``, ``exp_name``, ``data_dir``, ``stages_count``, ``stage_weights``,
``num_steps_per_scale``, ``stage_sampling_thresholds``, ``cfg_scale``, ``guidance_low``, ``guidance_high``,
``mode``, ``num_steps``). Unknown keys, wrong types and impossible combinations are errors that name the
key, raised by :func:`load_config` before any work starts. The DeepSpeed JSON is generated from this
config (``dfm.launch.engine.deepspeed_config``), never kept by hand.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from dfm.errors import ArgumentError
from dfm.fast_sampling import ModelSampler
from dfm.models import MODELS, model_config_from
from dfm.objective import DFMObjective, TSampler
from dfm.precision import Precision
from dfm.sampling import Method

DataKind = Literal["digits", "latents"]
LoaderChoice = Literal["auto", "dali", "torch"]
SampleMode = Literal["ode", "sde"]
ZeroStage = Literal[0, 1, 2, 3]
LRSchedule = Literal["constant", "cosine", "linear"]
ReportTo = Literal["tensorboard", "wandb", "none"]
DIGITS_CLASSES = 10
# The digits as the embedded loader serves them: 8x8 digits resized to 16x16, one channel, ten classes.
DIGITS_SHAPE = {"resolution": 16, "channels": 1, "num_classes": DIGITS_CLASSES}
MAX_SEED = 2**63  # seeds feed torch generators (64-bit) and draw_seed's arithmetic modulo 2**63


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


@dataclass
class ArchConfig:
    """Optional overrides of the registered architecture (None keeps the registry's value)."""

    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    qk_norm: bool | None = None  # LayerNorm on q and k per head, as the authors' option (default off)
    pos_embed: Literal["sincos", "rope"] | None = None  # DiT's fixed sin-cos (default) or the paper's 2-D RoPE
    stage_embedding: bool | None = None  # the paper's stage-index embedding in the adaLN conditioning (off)


@dataclass
class DataConfig:
    kind: DataKind = "digits"  # the embedded scikit-learn digits, or prepared SD-VAE latents
    data_dir: str | None = None  # latent store for kind=latents
    # None: from the data -- the latent store's manifest (latents) or DIGITS_SHAPE. A value given for a latent
    # store must match it (num_classes may exceed the store's: a model may know classes a store lacks).
    resolution: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    loader: LoaderChoice = "auto"  # latents: DALI on CUDA when installed, else the torch DataLoader
    num_workers: int = 2


@dataclass
class DFMConfig:
    stages_count: int | None = None  # None: from the model name (SiT 1, DFM-SiT 2)
    stage_weights: list[float] | None = None  # None: [0.9, 0.1] for 2 stages, uniform otherwise
    per_sample_stage: bool = False
    t_sampler: TSampler = "logit_normal"
    # Earlier stages (s < k) draw t = sigmoid(n - location), n ~ N(0, 1): 2.0 in the authors' code, 1.5 in the paper
    # (which measured 2.0 worse: FDD 589 vs 571).
    earlier_stage_location: float = 2.0
    class_dropout: float = 0.1
    # Per-stage normalisation (dfm.normalization): the flow runs on bands[s] / stage_rms[s]. Off in the
    # reference and the ImageNet configs. stage_rms: null is measured from the training data when a run starts
    # and written into its config.yaml (and every checkpoint's), which is where sampling reads it.
    normalize_stages: bool = False
    stage_rms: list[float] | None = None


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
    precision: Precision = "auto"  # bf16 autocast over fp32 weights on CUDA, fp32 on CPU (dfm.precision)
    compile: bool = False
    # Recompute the activations of every k-th transformer block in backward instead of keeping them (dfm.recompute):
    # 0 off, 1 every block (least memory, about one more forward of the blocks per step), k every k-th.
    activation_checkpointing: int = 0
    zero_stage: ZeroStage = 0
    offload: bool = False  # ZeRO-Offload: optimizer states and fp32 master weights on the host (ZeRO >= 1)
    # ZeRO >= 1 gradient communication (launch/engine.py: deepspeed_config). Buckets of 5e7 elements (200 MB of
    # fp32), not DeepSpeed's 5e8: with 5e8 the first bucket of SiT-XL/2 (675 M gradients) fills only after three
    # quarters of backward, leaving little to overlap; 5e7 gives 14 reductions per step, each large enough for
    # NCCL to run near its bandwidth, and overlap_comm's two bucket buffers cost 400 MB instead of 4 GB.
    overlap_comm: bool = True  # reduce gradient buckets during backward (ZeRO 2, 3) instead of after it
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000  # elements per reduction bucket
    allgather_bucket_size: int = 50_000_000  # elements per all-gather of updated weights (ZeRO 1, 2)
    # Learning rate of step i (dfm.schedule.lr_at): linear warmup over lr_warmup_steps, then constant (the
    # reference), or a cosine / linear decay to lr_min at max_steps.
    lr_schedule: LRSchedule = "constant"
    lr_warmup_steps: int = 0
    lr_min: float = 0.0
    # EMA warmup (dfm.schedule.ema_decay_at): decay_i = min(ema_decay, 1 - (1 + i) ** -power); 0 keeps the
    # fixed ema_decay of the reference. 3/4 suits runs up to ~200k steps, 2/3 runs of a million.
    ema_warmup_power: float = 0.0
    threads: int | None = None  # intra-op CPU threads per rank; None: $OMP_NUM_THREADS, else dfm.launch.threads
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    keep_ckpts: int = 2
    # Evaluation during training (dfm.evaluation.training): every eval_every steps (0: never) the EMA samples
    # eval_samples images from fixed seeds, scored by the digits classifier (digits) or against eval_ref with
    # the Inception weights at eval_inception_weights (latents: FID, sFID, IS).
    eval_every: int = 0
    eval_samples: int = 500
    eval_inception_weights: str | None = None
    eval_ref: str | None = None


@dataclass
class SampleConfig:
    mode: SampleMode = "ode"  # staged Euler/Heun, or Euler-Maruyama (single-stage models only)
    method: Method = "euler"  # ODE integrator
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
    report_to: ReportTo = "tensorboard"  # where the metrics go (the seed's key; wandb is optional)
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


def _coerce_union(value, tp, key: str):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    real = [arg for arg in args if arg is not type(None)]
    if len(real) == 1:  # Optional[X]: X's own, more precise message
        return _coerce(value, real[0], key)
    for arg in real:
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            pass
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _coerce_literal(value, tp, key: str):
    allowed = typing.get_args(tp)
    # type() too: True == 1 and 1.0 == 1, but neither is the ZeRO stage 1
    if any(value == a and type(value) is type(a) for a in allowed):
        return value
    raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


def _coerce_list(value, tp, key: str):
    (item,) = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{key}': expected a list of {_type_name(item)}, got {value!r}")
    return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_bool(value, key: str):
    if isinstance(value, bool):
        return value
    raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")


def _coerce_int(value, key: str):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:  # 5e7 (YAML reads it as a string) or 5.0e7: an integer written as a number
        number = float(value) if isinstance(value, (str, float)) else None
    except ValueError:
        number = None
    if number is not None and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")


def _coerce_float(value, key: str):
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if not math.isfinite(number):  # no setting of a run means anything at inf or nan (lr=.inf trains to nan)
        raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
    return number


def _coerce_str(value, key: str):
    if isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}': expected a string, got {value!r}")


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}
_GENERICS = {typing.Union: _coerce_union, types.UnionType: _coerce_union, Literal: _coerce_literal, list: _coerce_list}


def _coerce(value, tp, key: str):
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    generic = _GENERICS.get(typing.get_origin(tp))
    if generic is not None:
        return generic(value, tp, key)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
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


# -- validation: each component checks its own arguments; here their errors are named by config key ------

MODEL_KEYS = {
    "depth": "arch.depth",
    "hidden_size": "arch.hidden_size",
    "num_heads": "arch.num_heads",
    "mlp_ratio": "arch.mlp_ratio",
    "input_size": "data.resolution",
    "in_channels": "data.channels",
    "num_classes": "data.num_classes",
    "stages": "dfm.stages_count",
    "patch_size": "model",
    "qk_norm": "arch.qk_norm",
    "pos_embed": "arch.pos_embed",
    "stage_embedding": "arch.stage_embedding",
}


def _keyed(build, keys: dict[str, str], default: str):
    """Run a component's constructor; re-raise its error as a ConfigError naming the key at fault.

    A component names the argument it refuses in an :class:`~dfm.errors.ArgumentError`; ``keys`` maps argument
    names to config keys (``stage_weights`` -> ``dfm.stage_weights``). Any other ValueError is reported under
    ``default``.
    """
    try:
        return build()
    except ArgumentError as err:
        if err.argument not in keys:
            raise ConfigError(f"config key '{default}': {err}") from None
        detail = err.detail if err.detail.startswith(":") else f" {err.detail}"
        raise ConfigError(f"config key '{keys[err.argument]}'{detail}") from None  # "... 'dfm.stage_weights' must be"
    except ValueError as err:
        raise ConfigError(f"config key '{default}': {err}") from None


def _section_keys(section: str, obj) -> dict[str, str]:
    return {f.name: f"{section}.{f.name}" for f in dataclasses.fields(obj)}


def _check_model(cfg: Config) -> None:
    if cfg.model not in MODELS:
        raise ConfigError(f"config key 'model': unknown model {cfg.model!r}; known: {', '.join(MODELS)}")
    if cfg.dfm.stages_count is not None and cfg.dfm.stages_count < 1:
        raise ConfigError(f"config key 'dfm.stages_count' must be >= 1, got {cfg.dfm.stages_count}")
    if not math.isfinite(cfg.dfm.earlier_stage_location):
        raise ConfigError(
            f"config key 'dfm.earlier_stage_location' must be a finite number, got {cfg.dfm.earlier_stage_location}"
        )
    _keyed(lambda: model_config_from(cfg).validate(), MODEL_KEYS, "model")


SHAPE_KEYS = ("resolution", "channels", "num_classes")


def apply_store_facts(d: DataConfig, store) -> None:
    """Fill ``data.resolution``, ``data.channels`` and ``data.num_classes`` from an opened latent store, and
    refuse values the config gives that the store contradicts (naming the key and the store)."""
    _, h, w = store.shape
    if h != w:
        raise ConfigError(f"latent store {store.root} holds {h}x{w} latents; only square latents are supported")
    found = {"resolution": h, "channels": store.channels, "num_classes": store.num_classes}
    for key in SHAPE_KEYS:
        value = getattr(d, key)
        if value is None:
            setattr(d, key, found[key])
        # a model may know more classes than a store uses, never fewer
        elif found[key] > value if key == "num_classes" else found[key] != value:
            raise ConfigError(
                f"config key 'data.{key}' is {value} but the latent store {store.root} has {found[key]} "
                f"(latents of {store.channels}x{h}x{w}, {store.num_classes} classes); drop the key to take the "
                "store's value, or use another store"
            )


def resolve_data_shape(cfg: Config, check_store: bool = True) -> None:
    """The data's shape and classes, before anything is built: the digits' (``DIGITS_SHAPE``), or what the latent
    store at ``data.data_dir`` records (its manifest is read, no sample is). Values the config gives are checked
    against an existing store (``check_store``); a latent config without a store must give all three keys (a
    saved or imported config does)."""
    d = cfg.data
    if d.kind == "digits":
        for key in SHAPE_KEYS:
            if getattr(d, key) is None:
                setattr(d, key, DIGITS_SHAPE[key])
        return
    missing = [f"data.{key}" for key in SHAPE_KEYS if getattr(d, key) is None]
    if d.data_dir and (missing or (check_store and Path(d.data_dir).is_dir())):
        from dfm.data.store import StoreError, open_store

        try:
            store = open_store(d.data_dir)
        except StoreError as err:
            raise ConfigError(f"config key 'data.data_dir': {err}") from None
        apply_store_facts(d, store)
    elif missing:
        raise ConfigError(
            f"config key 'data.data_dir' is required for data.kind=latents: the latent store gives {', '.join(missing)}"
        )


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if d.kind == "digits" and d.channels != 1:
        raise ConfigError(f"config key 'data.channels' must be 1 for the digits, got {d.channels}")
    if d.kind == "digits" and d.num_classes < DIGITS_CLASSES:
        raise ConfigError(
            f"config key 'data.num_classes' must be >= {DIGITS_CLASSES} for the digits, got {d.num_classes}"
        )
    if d.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0, got {d.num_workers}")


def _check_sampling(cfg: Config) -> None:
    s = cfg.sample
    _keyed(lambda: ModelSampler.check(cfg), _section_keys("sample", s), "sample")
    if s.cfg_scale != 1.0 and cfg.dfm.class_dropout == 0.0:
        raise ConfigError(
            f"config key 'sample.cfg_scale' is {s.cfg_scale} but 'dfm.class_dropout' is 0: a model trained "
            "without label dropout has no unconditional prediction to guide with"
        )
    # the interval's order is the sampler's own check (above, naming the key); the config adds the range
    if not (0.0 <= s.guidance_low <= 1.0 and 0.0 <= s.guidance_high <= 1.0):
        raise ConfigError("config keys 'sample.guidance_low' <= 'sample.guidance_high' must lie in [0, 1]")
    for key in ("num_steps", "per_class"):
        if getattr(s, key) < 1:
            raise ConfigError(f"config key 'sample.{key}' must be >= 1, got {getattr(s, key)}")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    positive = ("max_steps", "global_batch_size", "log_every", "sample_every", "ckpt_every", "keep_ckpts")
    for key in positive + ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1, got {getattr(t, key)}")
    if t.activation_checkpointing < 0:
        raise ConfigError(
            f"config key 'train.activation_checkpointing' must be 0 (off) or a block interval >= 1, "
            f"got {t.activation_checkpointing}"
        )
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise ConfigError(f"config key 'train.micro_batch_size' must be >= 1, got {t.micro_batch_size}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"config key 'train.betas' needs two values in [0, 1), got {t.betas}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must lie in [0, 1), got {t.ema_decay}")
    for key in ("lr", "weight_decay", "grad_clip"):
        if getattr(t, key) < 0:
            raise ConfigError(f"config key 'train.{key}' must be >= 0, got {getattr(t, key)}")
    if t.offload and t.zero_stage == 0:
        raise ConfigError("config key 'train.offload' needs train.zero_stage >= 1 (ZeRO-Offload is a ZeRO feature)")
    _check_schedule(t)
    _check_eval(t)


def _check_schedule(t: TrainConfig) -> None:
    if t.lr_warmup_steps < 0:
        raise ConfigError(f"config key 'train.lr_warmup_steps' must be >= 0, got {t.lr_warmup_steps}")
    if not 0.0 <= t.lr_min <= t.lr:
        raise ConfigError(f"config key 'train.lr_min' must lie in [0, train.lr = {t.lr}], got {t.lr_min}")
    if t.ema_warmup_power < 0:
        raise ConfigError(f"config key 'train.ema_warmup_power' must be >= 0 (0: off), got {t.ema_warmup_power}")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"config key 'train.threads' must be >= 1 (or null: chosen per rank), got {t.threads}")


def _check_eval(t: TrainConfig) -> None:
    if t.eval_every < 0:
        raise ConfigError(f"config key 'train.eval_every' must be >= 0 (0: no evaluation), got {t.eval_every}")
    if t.eval_samples < 2:  # a covariance needs two samples
        raise ConfigError(f"config key 'train.eval_samples' must be >= 2, got {t.eval_samples}")
    if (t.eval_inception_weights is None) != (t.eval_ref is None):
        raise ConfigError(
            "config keys 'train.eval_inception_weights' and 'train.eval_ref' go together: the Inception weights "
            "and the reference batch (or its statistics) to compare the samples with"
        )


def validate(cfg: Config) -> None:
    """Every check before any work, each error naming its key: choices and types were enforced when filling;
    here the components (model, objective, sampler) are built from the config and the rest is checked."""
    if not 0 <= cfg.seed < MAX_SEED:
        raise ConfigError(f"config key 'seed' must lie in [0, 2^63), got {cfg.seed}")
    if cfg.exp_name in ("", ".", "..") or any(sep in cfg.exp_name for sep in ("/", "\\", "\0")):
        raise ConfigError(f"config key 'exp_name' must be a plain folder name inside output_dir, got {cfg.exp_name!r}")
    _check_model(cfg)
    _check_data(cfg)
    _keyed(lambda: DFMObjective.from_config(cfg), _section_keys("dfm", cfg.dfm), "dfm")
    if cfg.dfm.stage_rms is not None and not cfg.dfm.normalize_stages:
        raise ConfigError(
            "config key 'dfm.stage_rms' is set but 'dfm.normalize_stages' is false: the statistics would be unused"
        )
    _check_sampling(cfg)
    _check_train(cfg)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges a mapping: not a key given twice
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path):
    """The content of a YAML file read safely (no Python objects), duplicate keys refused, errors naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:  # a binary file (a checkpoint, an image) given by mistake
        raise ConfigError(f"config file {path} is not a text YAML file (byte {err.start} is not UTF-8)") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None


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
        values = read_yaml(path)
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"config file {path} must hold a non-empty mapping at the top level")
        try:
            _fill(cfg, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if isinstance(overrides, dict):
        _fill(cfg, overrides)
    else:
        for text in overrides or []:
            _fill(cfg, parse_override(text))
    resolve_data_shape(cfg)
    validate(cfg)
    check_training_data(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with a run (``config.yaml`` or a checkpoint) or by ``dfm import``, validated.

    A latent model's saved config may name no store (an imported model has none): only training needs one.
    """
    cfg = Config()
    _fill(cfg, values)
    resolve_data_shape(cfg, check_store=False)  # a saved config names its shape: the store is read only if not
    validate(cfg)
    return cfg


def config_text(cfg: Config) -> str:
    """The YAML text of ``cfg`` as :func:`save_config` writes it (and checkpoints keep it)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    from dfm.files import write_text_atomic

    write_text_atomic(path, config_text(cfg))
