"""Channel normalisations for channel-first feature maps ``(N, C, ...)`` and the factory that picks one.

Three choices, all usable on 2D ``(N, C, H, W)`` and 3D ``(N, C, T, H, W)`` maps:

``"group"``  ``nn.GroupNorm`` as in the SD VAE. Statistics span channels-in-group and *every* spatial
             (and temporal) position, so a 3D map's statistics span time.
``"layer"``  LayerNorm over channels at each position (per pixel, per frame).
``"rms"``    per-pixel channel RMS norm (Wan's VAE): no mean subtraction, no cross-position statistics;
             removes the "blob" artifacts that GroupNorm's per-feature-map statistics invite.

A :class:`NormSpec` carries a kind with its options (the GroupNorm group count) and is accepted wherever a
kind is, so blocks that only forward ``norm`` to :func:`make_norm` (e.g. ``ResBlock``) honour it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormKind = Literal["group", "layer", "rms"]
NORM_KINDS: tuple[str, ...] = ("group", "layer", "rms")


@dataclass(frozen=True)
class NormSpec:
    """A norm kind with its options: ``NormSpec("group", groups=16)`` is GroupNorm with 16 groups."""

    kind: NormKind = "group"
    groups: int = 32


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis (dim 1) of a channel-first map, with per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x.movedim(1, -1)  # (N, ..., C)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)  # (N, C, ...)


class ChannelRMSNorm(nn.Module):
    """Per-pixel RMS norm over channels (dim 1): ``x / sqrt(mean_c(x^2) + eps) * weight``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        rms = torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps)  # (N, 1, ...)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x.float() * rms).to(x.dtype) * self.weight.view(shape)


def make_norm(kind: NormKind | NormSpec, channels: int, eps: float = 1e-6, groups: int = 32) -> nn.Module:
    """Build the normalisation ``kind`` for ``channels`` channel-first features ``(N, C, ...)``.

    ``groups`` is GroupNorm's group count; a :class:`NormSpec` ``kind`` brings its own (and overrides it).
    """
    if isinstance(kind, NormSpec):
        kind, groups = kind.kind, kind.groups
    if kind == "group":
        if channels % groups != 0:
            raise ValueError(f"norm='group': channels={channels} is not divisible by groups={groups}")
        return nn.GroupNorm(groups, channels, eps=eps, affine=True)
    if kind == "layer":
        return ChannelLayerNorm(channels, eps=eps)
    if kind == "rms":
        return ChannelRMSNorm(channels, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORM_KINDS}")
