"""Residual blocks and resampling layers shared by the autoencoder and the UNets.

``ResBlock`` is the pre-activation block of the SD VAE / DDPM family (norm -> SiLU -> conv, twice, with a
1x1 skip when the channel count changes). With ``dims=3`` and ``kernel_size=(3, 1, 1)`` it is the
temporal block SVD inserts after each spatial block: a convolution over time only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.nn.norms import NormKind, make_norm


def _padding(kernel_size: int | tuple[int, ...]) -> int | tuple[int, ...]:
    if isinstance(kernel_size, int):
        return kernel_size // 2
    return tuple(k // 2 for k in kernel_size)


class ResBlock(nn.Module):
    """Pre-activation residual block (norm-SiLU-conv x2) over 2D ``(N, C, H, W)`` or 3D ``(N, C, T, H, W)`` maps."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        norm: NormKind = "group",
        eps: float = 1e-6,
        dropout: float = 0.0,
        dims: int = 2,
        kernel_size: int | tuple[int, ...] = 3,
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"ResBlock: dims must be 2 or 3, got {dims}")
        out_channels = out_channels or in_channels
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pad = _padding(kernel_size)
        self.norm1 = make_norm(norm, in_channels, eps)
        self.conv1 = conv(in_channels, out_channels, kernel_size, padding=pad)
        self.norm2 = make_norm(norm, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size, padding=pad)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, ...)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, C_out, ...)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the SD VAE's asymmetric (right/bottom) zero padding: (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
