"""SiT and DFM-SiT transformers (spec §4).

A DFM-SiT is a SiT whose input, timestep embedding and output head are duplicated per pyramid stage:
stage s is patchified with ``p_s = p / 2^(S-1-s)`` so every stage yields the same token grid, the
token sequence is the sum of the per-stage embeddings, the conditioning vector is the sum of the
per-stage timestep embeddings and the label embedding, and each stage has its own adaLN final layer
reading the shared final tokens. With one stage this is exactly SiT.

The model knows nothing of compile, CUDA graphs or DeepSpeed; those wrap it from the outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dfm.attention import attention
from dfm.errors import ArgumentError
from dfm.pyramid import check_divisible, check_patch, stage_shapes

# -- helpers ----------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens (B, N, D) by per-sample shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding, (grid_h * grid_w, dim), row-major over the grid.

    Half the channels encode the row, half the column, each as [sin, cos] of 1/10000^(2i/d) frequencies
    (the DiT/MAE layout, so released checkpoints keep their meaning).
    """
    if dim % 4 != 0:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim/2)

    gy, gx = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    # MAE/DiT order: the first half of the channels embeds the column (w) coordinate.
    return torch.cat([embed_1d(gx), embed_1d(gy)], dim=1).float()


def rope_angles(head_dim: int, grid: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """Rotation angles (N, head_dim // 2) of an axial rotary embedding over a token grid of any rank.

    The head dim is read as head_dim // 2 channel pairs, shared out among the grid's axes (row and column; a
    3-D grid adds time) as evenly as possible, the first axes taking one pair more where they do not divide.
    Pair i of an axis with P pairs turns by ``pos * theta^(-i / P)``, pos the token's index along that axis;
    tokens are row-major over the grid, as the patch embedding lays them out.
    """
    pairs = head_dim // 2
    if pairs < len(grid):
        raise ValueError(f"head dim {head_dim} is too small for a rotary embedding over a {len(grid)}-D grid")
    counts = [pairs // len(grid) + (a < pairs % len(grid)) for a in range(len(grid))]
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    angles = []
    for pos, count in zip(coords, counts):
        freqs = theta ** (-torch.arange(count, dtype=torch.float64) / count)
        angles.append(pos.reshape(-1, 1) * freqs.reshape(1, -1))
    return torch.cat(angles, dim=1).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the channel pairs (2i, 2i + 1) of ``x`` (..., N, head_dim) by the angles whose cos and sin are
    given, each (N, head_dim // 2); computed in float32, returned in ``x``'s dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, head_dim / 2) each
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def timestep_frequencies(dim: int, max_period: float = 10000.0, device=None) -> Tensor:
    """The dim // 2 float32 frequencies ``max_period^(-i / (dim // 2))`` of :func:`timestep_sinusoid`."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features (B, dim) of times t (B,), [cos, sin] halves as in DiT."""
    freqs = timestep_frequencies(dim, max_period, t.device)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# -- embedders --------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of (B, C, H, W) -> tokens (B, H/p * W/p, D)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256-d sinusoid -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, D); index ``num_classes`` is the null label used for classifier-free guidance.

    Label dropout is drawn by the objective (not here) so that it is part of the injectable draw.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


# -- block ------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention. ``qk_norm``: q and k each through a LayerNorm over the head dim before the dot
    product, as the authors' code has it (timm 0.9's ``Attention(qk_norm=True)``: affine, eps 1e-5)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        head_dim = hidden_size // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-5) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim); views of one projection without qk_norm
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # positions enter as rotations of q and k (after their norms, as in FLUX)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: shift/scale/gate for attention and MLP from the conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


# -- final layer ------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear to p*p*C values per token (one per stage in DFM)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: Tensor, patch_size: int, channels: int, grid_h: int, grid_w: int) -> Tensor:
    """Tokens (B, gh*gw, p*p*C) -> image (B, C, gh*p, gw*p)."""
    B = x.shape[0]
    p = patch_size
    x = x.view(B, grid_h, grid_w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, channels, grid_h * p, grid_w * p)


# -- model ------------------------------------------------------------------------------------------


POS_EMBEDS = ("sincos", "rope")


@dataclass
class ModelConfig:
    """Architecture of a (DFM-)SiT. ``input_size`` is the finest stage's (H, W) or one int for square."""

    input_size: int | tuple[int, int] = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    stages: int = 1
    qk_norm: bool = False  # LayerNorm on q and k per head (the authors' option; off in their configs and ours)
    pos_embed: str = "sincos"  # "sincos": DiT's fixed additive embedding; "rope": 2-D rotary on q and k (the paper)
    stage_embedding: bool = False  # the paper's stage-index embedding added to the adaLN conditioning

    @property
    def hw(self) -> tuple[int, int]:
        return (self.input_size, self.input_size) if isinstance(self.input_size, int) else tuple(self.input_size)

    @property
    def stage_patch_sizes(self) -> list[int]:
        return [self.patch_size >> (self.stages - 1 - s) for s in range(self.stages)]

    def validate(self) -> None:
        """Every check the modules' constructors would make, without building them; each message starts with
        the field at fault."""
        for name in ("depth", "hidden_size", "num_heads", "in_channels", "num_classes", "stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(name, f"must be a positive integer, got {value!r}")
        for flag in ("qk_norm", "stage_embedding"):
            if not isinstance(getattr(self, flag), bool):
                raise ArgumentError(flag, f"must be true or false, got {getattr(self, flag)!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ArgumentError("pos_embed", f"must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if not math.isfinite(self.mlp_ratio) or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ArgumentError("mlp_ratio", f"must be a positive number, got {self.mlp_ratio!r}")
        if self.hidden_size % self.num_heads:
            raise ArgumentError(
                "num_heads",
                f": hidden size {self.hidden_size} is not divisible by {self.num_heads} heads; "
                "it must be divisible by the head count",
            )
        if self.hidden_size % 4:
            raise ArgumentError(
                "hidden_size", f": hidden size {self.hidden_size} must be divisible by 4 for the 2-D sin-cos embedding"
            )
        try:
            check_patch(self.patch_size, self.stages)
        except ValueError as err:
            raise ArgumentError("patch_size", f": {err}") from None
        try:
            check_divisible(*self.hw, self.stages, self.patch_size)
        except ValueError as err:
            raise ArgumentError("input_size", f": {err}") from None


class DFMSiT(nn.Module):
    """SiT backbone with per-stage patch embeddings, timestep embedders and output heads.

    ``forward(x, t, y, mask)``: ``x`` is the list of S stage tensors (coarsest first, stage s of shape
    (B, C, H / 2^(S-1-s), W / 2^(S-1-s))), ``t`` (B, S) per-stage times, ``y`` (B,) labels, ``mask``
    (B, S) bool with True for active stages (None = all active). Returns the S per-stage velocities.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        D, C = config.hidden_size, config.in_channels
        H, W = config.hw
        self.grid = (H // config.patch_size, W // config.patch_size)
        self.x_embedders = nn.ModuleList(PatchEmbed(C, D, p) for p in config.stage_patch_sizes)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(D) for _ in range(config.stages))
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        # The stage index (the number of active stages - 1) as a learned vector added to the conditioning.
        self.stage_embedder = nn.Embedding(config.stages, D) if config.stage_embedding else None
        if config.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(D, *self.grid).unsqueeze(0), persistent=False)
            self.rope_cos = self.rope_sin = None
        else:  # rotations computed once for the fixed token grid, applied in every block's attention
            self.pos_embed = None
            angles = rope_angles(D // config.num_heads, self.grid)
            self.register_buffer("rope_cos", torch.cos(angles), persistent=False)
            self.register_buffer("rope_sin", torch.sin(angles), persistent=False)
        self.blocks = nn.ModuleList(
            SiTBlock(D, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.final_layers = nn.ModuleList(FinalLayer(D, p, C) for p in config.stage_patch_sizes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every special initialisation in one place (adaLN-Zero, as DiT/SiT)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):  # xavier for every linear, zero bias ...
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for embed in self.x_embedders:  # ... and for the patch projections seen as linears
            nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        if self.stage_embedder is not None:  # as the label table: a small random vector per stage index
            nn.init.normal_(self.stage_embedder.weight, std=0.02)
        for t_embedder in self.t_embedders:
            nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in self.final_layers:  # zero heads: the model outputs v = 0 at initialisation
            nn.init.zeros_(head.adaLN_modulation[-1].weight)
            nn.init.zeros_(head.adaLN_modulation[-1].bias)
            nn.init.zeros_(head.linear.weight)
            nn.init.zeros_(head.linear.bias)

    @property
    def stages(self) -> int:
        return self.config.stages

    def input_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H_s, W_s) of the model's input for every stage, coarsest first (a sampler's noise shapes)."""
        return [(self.config.in_channels, h, w) for h, w in stage_shapes(*self.config.hw, self.config.stages)]

    @classmethod
    def from_config(cls, cfg) -> DFMSiT:
        """The model of run config ``cfg`` (see :func:`model_config_from`)."""
        return cls(model_config_from(cfg))

    def forward(self, x: list[Tensor], t: Tensor, y: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        if len(x) != self.stages:
            raise ValueError(f"model has {self.stages} stages but got {len(x)} stage tensors")
        tokens = self.pos_embed.to(x[0].dtype) if self.pos_embed is not None else 0
        c = self.y_embedder(y)
        for s in range(self.stages):
            x_s = x[s]
            if mask is not None:  # masked stages enter as zeros (their embedding bias still counts)
                x_s = x_s * mask[:, s].to(x_s.dtype).view(-1, 1, 1, 1)
            tokens = tokens + self.x_embedders[s](x_s)
            c = c + self.t_embedders[s](t[:, s])
        if self.stage_embedder is not None:  # stage k: stages 0..k active (no host read: the index stays on device)
            k = mask.sum(dim=1) - 1 if mask is not None else torch.full_like(y, self.stages - 1)
            c = c + self.stage_embedder(k)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.blocks:
            tokens = block(tokens, c, rope)
        C = self.config.in_channels
        return [
            unpatchify(head(tokens, c), p, C, *self.grid)
            for head, p in zip(self.final_layers, self.config.stage_patch_sizes)
        ]


# -- size registry ----------------------------------------------------------------------------------

SIZES = {  # depth, hidden, heads
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (1, 2, 4, 8)


def _registry() -> dict[str, ModelConfig]:
    names = {}
    for size, (depth, hidden, heads) in SIZES.items():
        for p in PATCHES:
            base = ModelConfig(patch_size=p, hidden_size=hidden, depth=depth, num_heads=heads)
            names[f"SiT-{size}/{p}"] = replace(base, stages=1)
            names[f"DFM-SiT-{size}/{p}"] = replace(base, stages=2)
    return names


MODELS: dict[str, ModelConfig] = _registry()


def model_config(name: str, **overrides) -> ModelConfig:
    """The registered config for ``name`` (``SiT-XL/2``, ``DFM-SiT-B/2``, ...) with fields overridden."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    fields = set(ModelConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    config = replace(MODELS[name], **overrides)
    if name.startswith("SiT-") and config.stages != 1:
        raise ArgumentError("stages", f": {name} is a single-stage model; use DFM-{name} for stages={config.stages}")
    return config


def model_config_from(cfg) -> ModelConfig:
    """The architecture a run config describes: ``model`` with its ``arch.*`` overrides, the data's resolution,
    channels and classes, and the run's stage count (``cfg.stages``, the one place it is decided)."""
    arch = {k: v for k, v in vars(cfg.arch).items() if v is not None}
    return model_config(
        cfg.model,
        **arch,
        input_size=cfg.data.resolution,
        in_channels=cfg.data.channels,
        num_classes=cfg.data.num_classes,
        stages=cfg.stages,
    )


def build_model(name: str, **overrides) -> DFMSiT:
    """Build a registered model, e.g. ``build_model("DFM-SiT-B/2", input_size=32, num_classes=1000)``."""
    return DFMSiT(model_config(name, **overrides))


__all__ = ["DFMSiT", "ModelConfig", "MODELS", "build_model", "model_config", "model_config_from"]
