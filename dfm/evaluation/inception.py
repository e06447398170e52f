"""InceptionV3 in plain PyTorch, giving the features ADM's evaluation suite reads from the TF graph.

ADM (guided-diffusion ``evaluations/evaluator.py``) feeds float images in [0, 255] into the 2015 TF
Inception graph (``classify_image_graph_def.pb``) right after its JPEG decoder, so every image goes through
the graph's own ``ResizeBilinear`` to 299x299 (TF1, ``align_corners=False``: the legacy mapping
``src = dst * in / out`` without half-pixel centres) and ``(x - 128) / 128``. It reads:

- ``pool_3``: the 2048-d average-pooled features (FID, precision / recall);
- ``mixed_6/conv``: the ReLU output of the 1x1 branch of the third 17x17 block (``Mixed_6d.branch1x1``,
  192 x 17 x 17), of which the first 7 channels, flattened in NHWC order (17 * 17 * 7 = 2023), are the
  sFID features;
- ``softmax/logits/MatMul``: its weight alone (no bias) multiplies the pool features to give the 1008
  logits of the Inception Score.

The network is the TF graph's structure as ported by pytorch-fid (``FIDInceptionA/C/E_1/E_2``): average
pools that exclude padding from the count, and a max pool in the last block's pool branch. Weights are
the user's file (this project downloads nothing), in the key layout of pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (torchvision's ``Inception3`` names, no aux head, 1008 classes):

- stem: ``Conv2d_1a_3x3``, ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``, ``Conv2d_4a_3x3``, each
  with ``.conv.weight`` and ``.bn.{weight, bias, running_mean, running_var}`` (``num_batches_tracked``
  optional);
- blocks: ``Mixed_5b/5c/5d`` (A), ``Mixed_6a`` (B), ``Mixed_6b..6e`` (C), ``Mixed_7a`` (D), ``Mixed_7b/7c`` (E),
  each branch a conv + bn as above, e.g. ``Mixed_6d.branch7x7dbl_3.conv.weight`` (160, 160, 1, 7);
- classifier: ``fc.weight`` (1008, 2048), ``fc.bias`` (1008,).

BatchNorm uses eps = 1e-3. ``.safetensors`` files with the same keys load too.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.evaluation.weights import load_state_dict_file, load_strict

INCEPTION_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes plus 8 unused
POOL_DIM = 2048
SPATIAL_CHANNELS = 7


class InceptionFeatures(NamedTuple):
    """Per-image features: ``pool`` (N, 2048), ``spatial`` (N, 2023), ``logits`` (N, 1008)."""

    pool: Tensor
    spatial: Tensor
    logits: Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Input pipeline of the TF graph
# ---------------------------------------------------------------------------------------------------------------------


def _legacy_coords(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices (lower, upper) and lerp weights of TF1's ``ResizeBilinear(align_corners=False)``."""
    scale = n_in / n_out
    src = torch.arange(n_out, device=device, dtype=torch.float32) * scale  # no half-pixel offset
    lower = src.floor()
    upper = src.ceil().clamp(max=n_in - 1)
    return lower.long(), upper.long(), src - lower


def resize_bilinear_tf(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """(N, C, H, W) float -> (N, C, size, size) as TF1's ``ResizeBilinear`` (legacy, no antialias).

    Differs from ``F.interpolate(mode="bilinear", align_corners=False)``, which samples at half-pixel
    centres; using the graph's own mapping keeps our features equal to the ones ADM's numbers came from.
    The same order of operations as TF's kernel: lerp along W on the two source rows, then along H.
    """
    y0, y1, wy = _legacy_coords(x.shape[-2], size, x.device)
    x0, x1, wx = _legacy_coords(x.shape[-1], size, x.device)
    rows_top, rows_bottom = x[..., y0, :], x[..., y1, :]  # (N, C, size, W)
    top = rows_top[..., x0] + (rows_top[..., x1] - rows_top[..., x0]) * wx
    bottom = rows_bottom[..., x0] + (rows_bottom[..., x1] - rows_bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(images: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) images -> float32 (N, 3, 299, 299) network input, as the TF graph does it."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()
    x = resize_bilinear_tf(x, INCEPTION_SIZE)
    return (x - 128.0) / 128.0


# ---------------------------------------------------------------------------------------------------------------------
# Blocks (torchvision's names, so the pytorch-fid state dict loads as is)
# ---------------------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) inputs under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def branches(self, x: Tensor) -> list[Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: Tensor) -> list[Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_tf(x))]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 outputs.

    ``pool="max"`` for Mixed_7c: the 2015 graph max-pools in that block's pool branch (unlike the paper),
    and the features depend on it.
    """

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], 1)


# ---------------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------------


class InceptionV3(nn.Module):
    """The FID Inception network; ``forward(images)`` maps uint8 (N, H, W, 3) to :class:`InceptionFeatures`."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def forward_preprocessed(self, x: Tensor) -> InceptionFeatures:
        """Features of already preprocessed input (N, 3, 299, 299) (see :func:`preprocess`)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        # mixed_6/conv: first 7 channels of the 1x1 branch, flattened in the graph's NHWC order so that the
        # features line up with the mu_s / sigma_s of ADM's reference batches.
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7)
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # pool_3
        # The Inception Score reads softmax(pool @ W) with the MatMul's weight only, as improved-gan and ADM do.
        logits = F.linear(pool, self.fc.weight)
        return InceptionFeatures(pool, spatial, logits)

    def forward(self, images: Tensor) -> InceptionFeatures:
        """Features of uint8 images (N, H, W, 3) of any size (resized to 299 inside, as the TF graph does)."""
        return self.forward_preprocessed(preprocess(images))


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionV3:
    """InceptionV3 with the weights in ``path`` (layout in the module docstring), in eval mode on ``device``."""
    model = InceptionV3()
    load_strict(model, load_state_dict_file(path), path)
    return model.eval().requires_grad_(False).to(device)
