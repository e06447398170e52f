"""Checkpoints of the authors' code, REPA and the original SiT release, mapped exactly onto our model.

The authors' DFM-SiT and SiT training script (REPA's layout: ``{"model", "ema", "opt", "args", "steps"}``),
REPA checkpoints with their ``projectors.*`` heads, and the original SiT release (a bare state dict) are
read with the weights-only loader (:mod:`dfm.safe_load`), renamed to our keys, checked against the
architecture inferred from their shapes and ``args``, and written by :func:`import_checkpoint` as a
directory :func:`dfm.load_pretrained` and every command read. Whatever cannot be mapped exactly is
refused, naming the keys, before anything is written. Three things need more than renaming, each exact:

- ``pos_embed`` is a frozen parameter there and a fixed buffer here: it is checked against our sin-cos
  embedding and dropped. An EMA copy may carry rounding drift up to ~2e-4 (their EMA update averages it
  too), so an imported EMA model runs with the exact embedding where theirs ran with the drifted one.
- SiT models built with ``learn_sigma`` (the original SiT-XL/2 256 px release) predict 2C channels and
  use the first C; the head keeps those rows.
- The original SiT code runs time the other way (``t = 1`` is the data, ``v = x - eps``). Ours (the
  authors' and REPA's) has ``t = 0`` at the data and ``v = eps - x``, so ``v_ours(x, t) = -v_sit(x, 1 - t)``.
  Both sides of that identity are linear in the weights: the time sinusoid of ``1 - t`` is a fixed
  rotation of the sinusoid of ``t`` (``cos(f - ft)``, ``sin(f - ft)``), folded into the first timestep
  layer, and the sign into the head.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from dfm.checkpoint import check_finite
from dfm.config import Config, ConfigError, config_from_dict
from dfm.files import atomic_folder, check_can_create, default_mode
from dfm.models import MODELS, PATCHES, SIZES, DFMSiT, sincos_pos_embed, timestep_frequencies
from dfm.pretrained import check_state_dict
from dfm.safe_load import load_torch_file

# -- reading ---------------------------------------------------------------------------------------------

IMPORT_ALLOW = (argparse.Namespace,)  # their training script saves its argparse arguments beside the weights
LAYOUTS = {
    "dfm-sit": "the authors' DFM-SiT",
    "sit": "SiT from the authors' or REPA's training script (t = 0 at the data)",
    "sit-original": "the original SiT release (t = 1 at the data)",
}
SAMPLING_ARGS = ("num_steps_per_scale", "stage_sampling_thresholds", "cfg_scale", "guidance_low", "guidance_high",
                 "mode", "num_steps")  # fmt: skip
LIST_ARGS = {"num_steps_per_scale", "stage_sampling_thresholds", "stage_weights"}
VAE_DOWNSAMPLING = 8  # SD-VAE latents: image side / 8, as their args.resolution is the image side


class ImportRefused(ValueError):
    """A checkpoint that cannot be mapped onto our model exactly; the message names the keys."""


@dataclass
class Source:
    """A checkpoint file as read: one set of weights under their keys, plus the training arguments."""

    path: Path
    weights: dict[str, Tensor]
    args: dict
    entry: str  # "ema" / "model": the entry of a training checkpoint; "state dict": a bare state dict
    steps: int | None = None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def read_source(path: str | Path, weights: str | None = None) -> Source:
    """Read ``path`` with the weights-only loader; ``weights`` picks the ``"ema"`` (default) or ``"model"`` entry."""
    path = Path(path)
    obj = load_torch_file(path, allow=IMPORT_ALLOW)
    if _is_state_dict(obj):
        if weights not in (None, "ema"):
            raise ImportRefused(f"{path}: a bare state dict holds one set of weights, not an 'ema' and a 'model'")
        return Source(path, dict(obj), {}, "state dict")
    if not isinstance(obj, dict) or not ({"ema", "model"} & set(obj)):
        top = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ImportRefused(f"{path}: neither a state dict nor a training checkpoint with 'ema'/'model' (found {top})")
    entry = weights or ("ema" if "ema" in obj else "model")
    if entry not in obj:
        raise ImportRefused(f"{path}: has no '{entry}' entry (entries: {', '.join(sorted(map(str, obj)))})")
    if not _is_state_dict(obj[entry]):
        raise ImportRefused(f"{path}: entry '{entry}' is not a state dict of tensors")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if args is not None and not isinstance(args, dict):
        raise ImportRefused(f"{path}: 'args' is a {type(args).__name__}, expected argparse arguments")
    steps = obj.get("steps")
    return Source(path, dict(obj[entry]), args or {}, entry, int(steps) if isinstance(steps, int) else None)


def detect_layout(source: Source, layout: str | None = None) -> str:
    """Which of :data:`LAYOUTS` ``source`` is in (``layout`` forces one; it must fit the keys)."""
    keys = source.weights
    multi = any(k.startswith("x_embedder.embedders.") for k in keys)
    single = any(k.startswith("x_embedder.proj.") for k in keys)
    if multi == single:
        sample = ", ".join(sorted(keys)[:5])
        raise ImportRefused(
            f"{source.path}: no SiT or DFM-SiT patch embedding (x_embedder.proj.* or x_embedder.embedders.*) "
            f"among its {len(keys)} keys ({sample}, ...)"
        )
    if layout is not None:
        if layout not in LAYOUTS:
            raise ImportRefused(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        if (layout == "dfm-sit") != multi:
            raise ImportRefused(f"{source.path}: --layout {layout} does not fit its keys (x_embedder.*)")
        return layout
    if multi:
        return "dfm-sit"
    args = source.args
    if any(k.startswith("projectors.") for k in keys) or {"enc_type", "stages_count", "cfg_prob"} & set(args):
        return "sit"  # REPA's lineage, which the authors' code builds on
    if not args and source.entry == "state dict" or {"train_eps", "sample_eps"} & set(args):
        return "sit-original"  # SiT's own repository: the released bare state dict, or its train.py's args
    raise ImportRefused(
        f"{source.path}: cannot tell whether this SiT checkpoint has t = 0 at the data (the authors', REPA) or at "
        "the noise (the original SiT code): pass --layout sit or --layout sit-original"
    )


def check_training_args(source: Source) -> None:
    """Refuse objectives our sampler does not solve: another path, another prediction target."""
    args = source.args
    path_type = str(args.get("path_type", "linear")).lower()
    if path_type != "linear":
        raise ImportRefused(f"{source.path}: args.path_type is {args['path_type']!r}; only the linear path maps")
    prediction = str(args.get("prediction", "v")).lower()
    if prediction not in ("v", "velocity"):
        raise ImportRefused(f"{source.path}: args.prediction is {args['prediction']!r}; only velocity is supported")


# -- key mapping ----------------------------------------------------------------------------------------

_W = r"\.(weight|bias)"
STAGE_RULES = {  # their key -> ours, per layout family
    "dfm-sit": [
        (rf"x_embedder\.embedders\.(\d+)\.proj{_W}", r"x_embedders.\1.proj.\2"),
        (rf"t_embedder\.embedders\.(\d+)\.mlp\.([02]){_W}", r"t_embedders.\1.mlp.\2.\3"),
        (rf"final_layer\.projections\.(\d+)\.(linear|adaLN_modulation\.1){_W}", r"final_layers.\1.\2.\3"),
    ],
    "sit": [
        (rf"x_embedder\.proj{_W}", r"x_embedders.0.proj.\1"),
        (rf"t_embedder\.mlp\.([02]){_W}", r"t_embedders.0.mlp.\1.\2"),
        (rf"final_layer\.(linear|adaLN_modulation\.1){_W}", r"final_layers.0.\1.\2"),
    ],
}
COMMON_RULES = [
    (r"y_embedder\.embedding_table\.weight", "y_embedder.table.weight"),
    (
        rf"blocks\.(\d+)\.(attn\.qkv|attn\.proj|attn\.q_norm|attn\.k_norm|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1){_W}",
        r"blocks.\1.\2.\3",
    ),
]
PROJECTORS = re.compile(r"projectors\.")  # REPA's representation-alignment heads: a training-only loss


def _listing(keys: list[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_keys(source: Source, layout: str) -> tuple[dict[str, Tensor], list[str]]:
    """Their state dict under our keys (``pos_embed`` kept aside), and notes on the keys that were dropped."""
    rules = [(re.compile(p), r) for p, r in STAGE_RULES["dfm-sit" if layout == "dfm-sit" else "sit"] + COMMON_RULES]
    mapped, unknown, projectors = {}, [], []
    for key, value in source.weights.items():
        if key == "pos_embed":
            mapped[key] = value
        elif PROJECTORS.match(key):
            projectors.append(key)
        else:
            ours = next((rule.fullmatch(key).expand(r) for rule, r in rules if rule.fullmatch(key)), None)
            if ours is None:
                unknown.append(key)
            else:
                mapped[ours] = value
    if unknown:
        raise ImportRefused(f"{source.path}: keys with no counterpart in our model: {_listing(sorted(unknown))}")
    notes = [f"dropped {len(projectors)} projectors.* tensors (REPA alignment heads, training only)"]
    return mapped, notes if projectors else []


# -- architecture inference -------------------------------------------------------------------------


@dataclass
class Options:
    """What the command line may add to (or impose on) what the file says."""

    model: str | None = None  # a registered name; shapes that differ from its size become arch.* overrides
    resolution: int | None = None  # image side (their args.resolution); latents are 1/8 of it
    num_heads: int | None = None  # attention heads: the one architecture number the weights do not show
    num_classes: int | None = None
    weights: str | None = None  # "ema" (default) or "model"
    layout: str | None = None


@dataclass
class Architecture:
    name: str
    stages: int
    patch: int
    depth: int
    hidden: int
    heads: int
    mlp_ratio: float
    channels: int
    latent: int  # latent side
    num_classes: int
    null_row: bool  # the label table has the null (CFG) row
    qk_norm: bool  # the blocks have q/k LayerNorms (timm's qk_norm in the authors' code)


def _indices(mapped: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in mapped if (m := rx.fullmatch(k))})


def _require(mapped: dict, key: str, path: Path) -> Tensor:
    if key not in mapped:
        raise ImportRefused(f"{path}: missing {key} (or its counterpart in the file's layout)")
    return mapped[key]


def _stage_shapes(mapped: dict, path: Path) -> tuple[int, int, int, int]:
    """(stages S, finest patch p, hidden D, channels C) from the patch embeddings, checking p_s = p / 2^(S-1-s)."""
    stages = _indices(mapped, r"x_embedders\.(\d+)\.proj\.weight")
    if stages != list(range(len(stages))):
        raise ImportRefused(f"{path}: patch embeddings for stages {stages}; expected 0..{len(stages) - 1}")
    S = len(stages)
    finest = _require(mapped, f"x_embedders.{S - 1}.proj.weight", path)
    if finest.dim() != 4:
        raise ImportRefused(
            f"{path}: the patch embedding has shape {tuple(finest.shape)}; expected a conv (D, C, p, p)"
        )
    D, C, p, q = finest.shape
    if p != q:
        raise ImportRefused(f"{path}: non-square patch {p}x{q} in the finest stage's embedding")
    for s in range(S):
        shape = tuple(mapped[f"x_embedders.{s}.proj.weight"].shape)
        want = (D, C, p >> (S - 1 - s), p >> (S - 1 - s))
        if shape != want or want[2] < 1:
            raise ImportRefused(
                f"{path}: stage {s} patch embedding has shape {shape}; a {S}-stage model with finest patch {p} "
                f"needs {want} (stage 0 coarsest, patch p / 2^(S-1-s))"
            )
    return S, p, D, C


def _latent_side(mapped: dict, source: Source, options: Options, patch: int, hidden: int) -> int:
    """The latent side from ``pos_embed``'s token grid, ``--resolution`` and ``args.resolution``, which must agree."""
    found = {}
    pos = mapped.get("pos_embed")
    if pos is not None:
        tokens = pos.shape[-2]
        grid = math.isqrt(tokens)
        if pos.shape[-1] != hidden or grid * grid != tokens:
            raise ImportRefused(f"{source.path}: pos_embed has shape {tuple(pos.shape)}; expected (1, g*g, {hidden})")
        found["pos_embed"] = grid * patch
    for name, image in (("--resolution", options.resolution), ("args.resolution", source.args.get("resolution"))):
        if image is not None:
            if int(image) % VAE_DOWNSAMPLING:
                raise ImportRefused(f"{name} {image} is not a multiple of {VAE_DOWNSAMPLING} (SD-VAE latents)")
            found[name] = int(image) // VAE_DOWNSAMPLING
    if not found:
        raise ImportRefused(f"{source.path}: no pos_embed and no args.resolution: pass --resolution (image side)")
    if len(set(found.values())) > 1:
        said = ", ".join(f"{k} -> {v}x{v} latents" for k, v in found.items())
        raise ImportRefused(f"{source.path}: the input size sources disagree: {said}")
    return next(iter(found.values()))


POS_EMBED_TOLERANCE = 1e-3


def check_pos_embed(pos: Tensor, hidden: int, grid: int, path: Path) -> float:
    """Max |pos - our fixed 2-D sin-cos embedding|; refused above :data:`POS_EMBED_TOLERANCE`.

    Both sides compute the embedding in float64 and store it in float32, so a model's own copy agrees to
    fp32 rounding. An EMA copy drifts a little further: REPA's update (``ema.mul_(d).add_(p, alpha=1 - d)``
    over every parameter) also averages this frozen one, and the rounding of those two steps settles at a
    max |diff| of 1.7e-4 for a 16x16 grid of width 1152 (400k fp32 steps at d = 0.9999, measured on CPU).
    A learned or differently laid-out embedding differs by O(1).
    """
    ours = sincos_pos_embed(hidden, grid, grid).unsqueeze(0)
    diff = (pos.float().reshape(ours.shape) - ours).abs().max().item()
    if diff > POS_EMBED_TOLERANCE:
        raise ImportRefused(
            f"{path}: pos_embed differs from the fixed 2-D sin-cos embedding (max |diff| {diff:.3g}); a learned or "
            "differently laid-out positional embedding cannot be mapped"
        )
    return diff


def _label_classes(rows: int, source: Source, options: Options) -> tuple[int, bool]:
    """(classes, whether the table has the null row) from the table's rows and the stated class count."""
    stated = options.num_classes if options.num_classes is not None else source.args.get("num_classes")
    if stated is None:
        if rows not in (1000, 1001):
            raise ImportRefused(
                f"{source.path}: the label table has {rows} rows and nothing states the class count: pass --num-classes"
            )
        stated = 1000  # ImageNet, the only data set their checkpoints are trained on
    stated = int(stated)
    if rows not in (stated, stated + 1):
        raise ImportRefused(
            f"{source.path}: y_embedder.embedding_table.weight has {rows} rows for {stated} classes "
            f"(expected {stated} without the CFG null row or {stated + 1} with it)"
        )
    return stated, rows == stated + 1


def _registered_size(depth: int, hidden: int) -> str | None:
    return next((s for s, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden)), None)


def _choose_name(S: int, p: int, depth: int, hidden: int, source: Source, options: Options) -> str:
    family = "SiT" if S == 1 else "DFM-SiT"
    if p not in PATCHES:
        raise ImportRefused(f"{source.path}: finest patch size {p}; registered patches are {PATCHES}")
    named = options.model or source.args.get("model")
    if named is not None:
        flag = "--model" if options.model else "args.model"
        if named not in MODELS:
            raise ImportRefused(f"{flag} {named!r} is not a registered model; known: {', '.join(MODELS)}")
        m = MODELS[named]
        if named.startswith("DFM-") != (S > 1) or m.patch_size != p:
            raise ImportRefused(f"{flag} {named} does not fit the weights: {S} stage(s), finest patch {p}")
        if options.model is None and (m.depth, m.hidden_size) != (depth, hidden):
            raise ImportRefused(
                f"{source.path}: args.model {named} has depth {m.depth} / hidden {m.hidden_size} but the weights "
                f"have {depth} / {hidden}: pass --model (and --num-heads) to name the size"
            )
        return named
    size = _registered_size(depth, hidden)
    if size is None:
        raise ImportRefused(
            f"{source.path}: depth {depth} / hidden {hidden} is no registered size ({', '.join(SIZES)}): pass --model "
            "(its arch.* fields are overridden by the shapes) and --num-heads"
        )
    return f"{family}-{size}/{p}"


def _mlp_width(mapped: dict[str, Tensor]) -> int:
    """The MLP width most of the tensors that show it agree on (every block's fc1 rows and bias, fc2 columns),
    not block 0's alone: one misshapen tensor is then the one ``check_state_dict`` names, rather than making
    every correct MLP tensor of the other blocks look wrong."""
    widths = []
    for key, value in mapped.items():
        if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.(weight|bias)", key):
            widths.append(value.shape[0])
        elif re.fullmatch(r"blocks\.\d+\.mlp\.fc2\.weight", key) and value.dim() == 2:
            widths.append(value.shape[1])
    return max(set(widths), key=lambda w: (widths.count(w), -widths.index(w)))  # a tie: the first seen


def infer_architecture(mapped: dict[str, Tensor], source: Source, options: Options) -> Architecture:
    """Everything the model config needs, from the shapes, ``args`` and ``options``; refuses what disagrees."""
    path = source.path
    S, p, D, C = _stage_shapes(mapped, path)
    blocks = _indices(mapped, r"blocks\.(\d+)\.attn\.qkv\.weight")
    if not blocks or blocks != list(range(len(blocks))):
        raise ImportRefused(f"{path}: transformer blocks {blocks[:8]}...; expected blocks 0..depth-1")
    depth = len(blocks)
    _require(mapped, "blocks.0.mlp.fc1.weight", path)
    inner = _mlp_width(mapped)
    rows = _require(mapped, "y_embedder.table.weight", path).shape[0]
    num_classes, null_row = _label_classes(rows, source, options)
    name = _choose_name(S, p, depth, D, source, options)
    reg = MODELS[name]
    if options.num_heads is not None:
        heads = options.num_heads
    elif (reg.depth, reg.hidden_size) == (depth, D):
        heads = reg.num_heads
    else:
        raise ImportRefused(
            f"{name} has depth {reg.depth} / hidden {reg.hidden_size} but the weights have {depth} / {D}: pass "
            "--num-heads (attention heads cannot be read from the weights)"
        )
    if heads < 1 or D % heads:
        raise ImportRefused(f"--num-heads {heads} does not divide the hidden size {D}")
    stated = source.args.get("stages_count")
    if stated is not None and int(stated) != S:
        raise ImportRefused(f"{path}: args.stages_count is {stated} but the weights have {S} stage(s)")
    latent = _latent_side(mapped, source, options, p, D)
    qk_norm = any(re.fullmatch(r"blocks\.\d+\.attn\.[qk]_norm\.weight", k) for k in mapped)
    if "qk_norm" in source.args and bool(source.args["qk_norm"]) != qk_norm:
        have = "have" if qk_norm else "have no"
        raise ImportRefused(f"{path}: args.qk_norm is {source.args['qk_norm']} but the weights {have} q/k norms")
    return Architecture(name, S, p, depth, D, heads, inner / D, C, latent, num_classes, null_row, qk_norm)


# -- conversion -------------------------------------------------------------------------------------


def keep_learned_mean(mapped: dict[str, Tensor], arch: Architecture, notes: list[str]) -> None:
    """Heads with 2C outputs per pixel (``learn_sigma``): keep the first C, the only ones their forward uses.

    Their unpatchify reads the head's output as (p, p, channels) with channels fastest, so the kept rows are
    those with channel index < C.
    """
    C = arch.channels
    for s in range(arch.stages):
        p = arch.patch >> (arch.stages - 1 - s)
        for kind in ("weight", "bias"):
            key = f"final_layers.{s}.linear.{kind}"
            value = mapped.get(key)
            if value is not None and value.shape[0] == p * p * 2 * C:
                rest = value.shape[1:]  # (D,) for the weight, () for the bias
                mapped[key] = value.reshape(p, p, 2 * C, *rest)[:, :, :C].reshape(p * p * C, *rest)
                if kind == "weight":
                    notes.append(f"stage {s} head: kept the {C} predicted channels of {2 * C} (learn_sigma)")


def reverse_time(mapped: dict[str, Tensor], frequency_size: int) -> None:
    """Fold the original SiT convention (``t = 1`` at the data, ``v = x - eps``) into the weights, in place.

    With ``s = 1 - t`` and frequencies ``f``: ``cos(f s) = cos f cos(f t) + sin f sin(f t)`` and
    ``sin(f s) = sin f cos(f t) - cos f sin(f t)``: the sinusoid of ``s`` is a fixed linear map of the sinusoid
    of ``t``, applied to the first timestep layer (in float64). ``v_ours = -v_sit``: the head changes sign.
    The frequencies are our embedder's float32 ones, which are also theirs.
    """
    w = mapped["t_embedders.0.mlp.0.weight"].double()  # (D, frequency_size): [cos | sin] halves
    half = frequency_size // 2
    f = timestep_frequencies(frequency_size).double()
    cos_f, sin_f = torch.cos(f), torch.sin(f)
    w_cos, w_sin = w[:, :half], w[:, half : 2 * half]
    out = w.clone()
    out[:, :half] = w_cos * cos_f + w_sin * sin_f
    out[:, half : 2 * half] = w_cos * sin_f - w_sin * cos_f
    mapped["t_embedders.0.mlp.0.weight"] = out.float()  # the imported weights are float32 whatever theirs were
    for kind in ("weight", "bias"):
        key = f"final_layers.0.linear.{kind}"
        mapped[key] = -mapped[key]


def add_null_row(mapped: dict[str, Tensor], notes: list[str]) -> None:
    """Append the null-label row our table has (index num_classes), as the mean class embedding.

    A model trained without label dropout never learned an unconditional prediction, so the row only gives
    fine-tuning with ``dfm.class_dropout > 0`` a neutral start; ``dfm.class_dropout: 0`` in the written config
    makes the config refuse ``sample.cfg_scale != 1``.
    """
    table = mapped["y_embedder.table.weight"]
    mapped["y_embedder.table.weight"] = torch.cat([table, table.mean(dim=0, keepdim=True)])
    notes.append("no CFG null row: appended the mean class embedding; CFG is refused (dfm.class_dropout: 0)")


def _listify(value, key: str):
    """Their list arguments as lists: they may be saved as lists, tuples or comma-separated strings."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [yaml.safe_load(v) for v in value.strip().strip("[]()").replace(",", " ").split()]
    if isinstance(value, (int, float)):
        return [value]
    raise ImportRefused(f"args.{key} is {value!r}; expected a list")


def _class_dropout(arch: Architecture, args: dict) -> float:
    """``dfm.class_dropout`` of the imported config: what the label table and ``args`` say about CFG training."""
    if not arch.null_row:
        return 0.0  # trained without CFG: the config then refuses sample.cfg_scale != 1
    if args.get("cfg_prob") is not None:
        return float(args["cfg_prob"])  # 0 too: a null row that was never trained
    return 0.1  # a null row and no recorded rate: SiT's and REPA's default label dropout, the one that adds the row


def _schedule_args(args: dict, stages: int, notes: list[str]) -> tuple[dict, dict]:
    """(``dfm``, ``sample``) entries from their arguments. A list that does not fit the stage count is skipped
    with a note: a script that parses DFM's arguments for every model may carry the 2-stage defaults
    ([40, 10], [0.1]) in the arguments of a SiT run."""
    wanted = {"stage_weights": stages, "num_steps_per_scale": stages, "stage_sampling_thresholds": stages - 1}
    dfm, sample = {}, {}
    for key in ("stage_weights", *SAMPLING_ARGS):
        if args.get(key) is None:
            continue
        value = _listify(args[key], key) if key in LIST_ARGS else args[key]
        if key in wanted and len(value) != wanted[key]:
            notes.append(f"ignored args.{key} {value}: {len(value)} entries for {stages} stage(s)")
            continue
        (dfm if key == "stage_weights" else sample)[key] = value
    if stages == 1 and "num_steps_per_scale" not in sample and "num_steps" in sample:
        sample["num_steps_per_scale"] = [sample["num_steps"]]  # their num_steps serves the ODE and the SDE
    if args.get("heun") is not None:
        sample["method"] = "heun" if args["heun"] else "euler"
    return dfm, sample


def config_values(arch: Architecture, source: Source, exp_name: str, notes: list[str]) -> dict:
    """The run config of the imported model: architecture, latent data, and their sampling defaults."""
    reg = MODELS[arch.name]
    fields = {"depth": (arch.depth, reg.depth), "hidden_size": (arch.hidden, reg.hidden_size),
              "num_heads": (arch.heads, reg.num_heads), "mlp_ratio": (arch.mlp_ratio, reg.mlp_ratio),
              "qk_norm": (arch.qk_norm, reg.qk_norm)}  # fmt: skip
    dfm, sample = _schedule_args(source.args, arch.stages, notes)
    dfm.update(stages_count=arch.stages, class_dropout=_class_dropout(arch, source.args))
    data = {"kind": "latents", "resolution": arch.latent, "channels": arch.channels, "num_classes": arch.num_classes}
    return {
        "exp_name": exp_name,
        "model": arch.name,
        "arch": {k: ours for k, (ours, registered) in fields.items() if ours != registered},
        "dfm": dfm,
        "data": data,
        "sample": sample,
    }


@dataclass
class Converted:
    """An imported model before it is written: our weights, its run config, and what was done to get them."""

    weights: dict[str, Tensor]
    config: Config
    layout: str
    source: Source
    notes: list[str]


def convert_checkpoint(src: str | Path, options: Options | None = None, exp_name: str | None = None) -> Converted:
    """Read, map, infer and check ``src``; nothing is written. Raises ImportRefused (or UnsafeFileError,
    CorruptFileError, ConfigError) naming the file and keys of anything that does not map exactly."""
    options = options or Options()
    source = read_source(src, options.weights)
    layout = detect_layout(source, options.layout)
    check_training_args(source)
    mapped, notes = map_keys(source, layout)
    arch = infer_architecture(mapped, source, options)
    pos = mapped.pop("pos_embed", None)
    if pos is not None:
        diff = check_pos_embed(pos, arch.hidden, arch.latent // arch.patch, source.path)
        drift = " (the rounding drift of an EMA that also averaged it; ours is exact)" if diff > 1e-6 else ""
        notes.append(f"dropped pos_embed: the fixed sin-cos embedding to max |diff| {diff:.2g}{drift}")
    keep_learned_mean(mapped, arch, notes)
    if not arch.null_row:
        add_null_row(mapped, notes)
    try:
        cfg = config_from_dict(config_values(arch, source, exp_name or source.path.stem, notes))
    except ConfigError as err:
        raise ImportRefused(f"{source.path}: its arguments do not make a valid config: {err}") from None
    model = DFMSiT.from_config(cfg)
    check_state_dict(model, mapped, source.path)
    check_finite(mapped, source.path)  # non-finite weights are never written
    if layout == "sit-original":
        reverse_time(mapped, model.t_embedders[0].frequency_size)
        notes.append("time convention (t = 1 at the data, v = x - eps) folded into the weights, exact to fp32 rounding")
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in mapped.items()}
    model.load_state_dict(weights)  # strict: every key of the model, none else
    return Converted(weights, cfg, layout, source, notes)


# -- writing ----------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    """Before the read of the source: ``out`` is new (or an empty folder) and its folder can be written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not empty; remove it or choose another --out")
    check_can_create(out, f"--out {out}")


def write_imported(converted: Converted, out: str | Path) -> Path:
    """Write ``out/ema.safetensors`` and ``out/config.yaml``: staged in a sibling folder, fsynced, renamed."""
    out = Path(out)
    _check_out(out)
    config_yaml = yaml.safe_dump(converted.config.to_dict(), sort_keys=False)
    src = converted.source
    metadata = {"config": config_yaml, "model": converted.config.model, "weights": src.entry,
                "layout": converted.layout, "source": src.path.name,
                "step": "" if src.steps is None else str(src.steps)}  # fmt: skip
    try:
        if out.is_dir():
            out.rmdir()  # empty (checked above): the staged folder takes its place
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(out) as staging:
            save_file(converted.weights, str(staging / "ema.safetensors"), metadata=metadata)
            default_mode(staging / "ema.safetensors")  # safetensors writes 0600; config.yaml follows the umask
            (staging / "config.yaml").write_text(config_yaml)
    except OSError as err:  # a full disk, say: name the user's path, not the staging folder
        raise OSError(f"--out {out}: writing failed ({err.strerror or err})") from None
    return out


def import_checkpoint(src: str | Path, out: str | Path, options: Options | None = None) -> Converted:
    """``dfm import``: convert ``src`` (every check first) and write it as the imported directory ``out``."""
    out = Path(out)
    _check_out(out)  # before the (possibly long) read of src
    converted = convert_checkpoint(src, options, exp_name=out.name)
    write_imported(converted, out)
    return converted


__all__ = ["Converted", "ImportRefused", "Options", "convert_checkpoint", "import_checkpoint", "write_imported"]
