"""Embeddings shared by the transformers: timesteps, class labels, patches, sin-cos tables and RoPE.

Conventions (chosen to match facebookresearch/DiT and RERV/VDT so their checkpoints mean the same):

- timestep features are ``[cos, sin]`` (GLIDE order); position tables are ``[sin, cos]`` (MAE order);
- a 2D table over an ``(h, w)`` grid, flattened row-major, spends its first half of channels on the
  column index ``w`` and its second half on the row index ``h`` (MAE's ``meshgrid(w, h)`` order);
- RoPE rotates consecutive channel pairs ``(2i, 2i+1)`` by ``position * theta**(-2i/dim)``; 2D RoPE
  gives the first half of the pairs to the row index and the second half to the column index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#################################################################################
#                      Timestep, class-label and patch embedders                #
#################################################################################


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``(N, dim)`` of ``(N,)`` scalars ``t`` (fractional values allowed), ``[cos, sin]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding


class TimestepEmbedder(nn.Module):
    """Embeds ``(N,)`` scalar noise levels into ``(N, hidden_size)`` vectors (sinusoid -> MLP)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds ``(N,)`` class labels into ``(N, hidden_size)``; with ``dropout_prob > 0`` it owns a null
    class (index ``num_classes``) and drops labels to it at training time for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder: num_classes must be >= 1, got {num_classes}")
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def null_class(self) -> int | None:
        """Index of the unconditional ("dropped") label, or None when the table has none."""
        return self.num_classes if self.dropout_prob > 0 else None

    def forward(self, labels: Tensor) -> Tensor:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"LabelEmbedder: labels must be an integer tensor, got {labels.dtype}")
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # (N,)
        return self.embedding_table(labels)  # (N, D)


class PatchEmbed2d(nn.Module):
    """Cuts ``(N, C, H, W)`` maps into ``p x p`` patches and projects them to ``(N, H/p * W/p, D)`` tokens
    (row-major). Unlike timm's ``PatchEmbed`` the input size is not fixed; the parameter is ``proj``
    (a strided Conv2d) as in timm, so DiT/VDT checkpoints load."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"PatchEmbed2d: height and width {tuple(x.shape[-2:])} must be multiples of patch_size {p}")
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, h*w, D)


#################################################################################
#                       Fixed sine-cosine position tables                       #
#################################################################################


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sin-cos table ``(M, dim)`` (``[sin, cos]``) of ``(M,)`` positions, computed in float64."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)  # (dim/2,)
    omega = 1.0 / 10000.0**omega  # (dim/2,)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_2d(dim: int, height: int, width: int) -> Tensor:
    """Sin-cos table ``(height*width, dim)`` over a row-major grid: first half encodes the column, second
    half the row (the MAE/DiT layout), in float64."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)  # (h*w,)
    cols = torch.arange(width, dtype=torch.float64).repeat(height)  # (h*w,)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (h*w, dim)


#################################################################################
#                          Rotary position embeddings                           #
#################################################################################


def rope_angles_1d(positions: Tensor, dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles ``(M, dim/2)`` for ``(M,)`` positions and a head dimension ``dim`` (even)."""
    if dim % 2:
        raise ValueError(f"rope_angles_1d: head dim must be even, got {dim}")
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    return positions.reshape(-1).to(torch.float64)[:, None] * freqs[None]  # (M, dim/2)


def rope_angles_2d(height: int, width: int, dim: int, theta: float = 10000.0) -> Tensor:
    """Axial 2D rotation angles ``(height*width, dim/2)`` over a row-major grid; ``dim % 4 == 0``.
    The first ``dim/4`` pairs rotate with the row index, the rest with the column index."""
    if dim % 4:
        raise ValueError(f"rope_angles_2d: head dim must be a multiple of 4, got {dim}")
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)  # (h*w,)
    cols = torch.arange(width, dtype=torch.float64).repeat(height)  # (h*w,)
    return torch.cat([rope_angles_1d(rows, dim // 2, theta), rope_angles_1d(cols, dim // 2, theta)], dim=1)  # (h*w, dim/2)


def rope_cos_sin(angles: Tensor, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of ``(M, dim/2)`` angles, each ``(M, dim/2)`` in ``dtype`` on ``device``."""
    return torch.cos(angles).to(device=device, dtype=dtype), torch.sin(angles).to(device=device, dtype=dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of ``x (..., M, dim)`` by the angles behind ``cos, sin (M, dim/2)``."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., M, dim/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (..., M, dim/2) each
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (..., M, dim/2, 2)
    return out.flatten(-2)  # (..., M, dim)
