"""DINOv2 ViT in plain PyTorch for FDD, the Fréchet distance on DINOv2 features.

FDD (Stein et al., 2023, "Exposing flaws of generative model evaluation metrics") replaces Inception
features by the CLS token of DINOv2 ViT-L/14: images resized to 224x224 (bicubic), scaled to [0, 1] and
normalised with the ImageNet mean / std, then the final-LayerNorm CLS token (1024-d for ViT-L) of each
image; the Fréchet distance of the two feature Gaussians is the score (see :mod:`dfm.evaluation.frechet`).

Weights are the user's file in the layout of the official checkpoints (``dinov2_vitl14_pretrain.pth``,
the ``facebookresearch/dinov2`` hub models with ``block_chunks=0``)::

    cls_token (1, 1, D)            pos_embed (1, 1 + M*M, D)       mask_token (1, D)
    register_tokens (1, R, D)      (``*_reg`` variants only)
    patch_embed.proj.weight (D, 3, 14, 14), patch_embed.proj.bias (D,)
    blocks.{i}.norm1.{weight,bias}   blocks.{i}.attn.qkv.{weight,bias} (3D, D)   blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.ls1.gamma (D,)        blocks.{i}.norm2.{weight,bias}             blocks.{i}.mlp.fc1.{weight,bias}
    blocks.{i}.mlp.fc2.{weight,bias} blocks.{i}.ls2.gamma (D,)
    norm.{weight,bias}

A checkpoint saved with chunked blocks (``blocks.{chunk}.{i}.…``) is accepted and renamed. The
architecture is read off the state dict (width, depth, patch, position grid, registers); the heads are
``D / 64`` as in every released DINOv2 model. ViT-g's SwiGLU MLP is not supported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.evaluation.weights import load_state_dict_file, load_strict

FDD_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DINOv2Config:
    """ViT hyper-parameters; defaults are ViT-L/14 (``dinov2_vitl14``, 518 px training grid of 37x37)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    img_size: int = 518
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1  # DINOv2's position-grid interpolation kludge, kept for identical features


DINOV2_CONFIGS = {
    "vits14": DINOv2Config(embed_dim=384, depth=12, num_heads=6),
    "vitb14": DINOv2Config(embed_dim=768, depth=12, num_heads=12),
    "vitl14": DINOv2Config(),
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, h*w, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU() in DINOv2


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))  # DINOv2's init_values

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2ViT(nn.Module):
    """DINOv2 backbone; ``forward(x)`` maps normalised images (N, 3, H, W) (H, W multiples of the patch)
    to the final-LayerNorm CLS token (N, D). ``forward_images`` takes uint8 (N, H, W, 3) as FDD does."""

    def __init__(self, cfg: DINOv2Config | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DINOv2Config()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        d, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # used only in DINOv2 training; kept for strict loading
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embeddings for an h x w patch grid: DINOv2's bicubic resize of its M x M grid."""
        pos = self.pos_embed.float()
        M = math.isqrt(pos.shape[1] - 1)
        if h == M and w == M:
            return self.pos_embed
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        # DINOv2 passes scale factors (h + 0.1) / M rather than a size; kept since it changes the sampled points.
        off = self.cfg.interpolate_offset
        patch_pos = F.interpolate(
            patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2),
            scale_factor=((h + off) / M, (w + off) / M) if off else None,
            size=None if off else (h, w),
            mode="bicubic",
        )
        if patch_pos.shape[-2:] != (h, w):
            raise ValueError(f"position grid resized to {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        N, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)  # (N, h*w, D)
        tokens = torch.cat([self.cls_token.expand(N, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(H // p, W // p)
        if self.cfg.num_register_tokens:  # registers sit after CLS and carry no position embedding
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(N, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def forward_images(self, images: Tensor) -> Tensor:
        """CLS features (N, D) of uint8 images (N, H, W, 3), preprocessed as FDD does (see :func:`preprocess`)."""
        return self(preprocess(images))


def preprocess(images: Tensor, size: int = FDD_SIZE) -> Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, size, size): bicubic resize, [0, 1], ImageNet normalisation.

    FDD's reference pipeline (dgm-eval) resizes PIL images with ``Resize((224, 224), BICUBIC)``. PyTorch's
    ``antialias=True`` bicubic is PIL's filter (a = -0.5, support widened when shrinking), and rounding to
    the uint8 grid reproduces PIL's 8-bit output before ``ToTensor``: on pixel noise the two differ by 0.25
    grey levels on average (against 4-19 for torch's default bicubic), on any device and batched.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def config_from_state_dict(state: dict[str, Tensor]) -> DINOv2Config:
    """The architecture a DINOv2 state dict describes (heads = width / 64, as in all released models)."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"not a DINOv2 state dict: no '{key}'")
    d = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise ValueError("not a DINOv2 state dict with an MLP block: no 'blocks.0.mlp.fc1.weight' (ViT-g uses SwiGLU)")
    reg = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    return DINOv2Config(
        embed_dim=d,
        depth=depth,
        num_heads=max(1, d // 64),
        patch_size=patch,
        img_size=grid * patch,
        mlp_ratio=fc1.shape[0] / d,
        num_register_tokens=reg,
    )


def load_dinov2(path: str | Path, device: str | torch.device = "cpu") -> DINOv2ViT:
    """DINOv2 ViT with the weights in ``path`` (official layout, see the module docstring), eval mode."""
    state = load_state_dict_file(path)
    state = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in state.items()}
    try:
        cfg = config_from_state_dict(state)
    except ValueError as e:  # a user error of the CLI: one line naming the file
        raise ValueError(f"{path}: {e.args[0]}") from e
    model = DINOv2ViT(cfg)
    load_strict(model, state, path)
    return model.eval().requires_grad_(False).to(device)
