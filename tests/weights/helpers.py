"""Shared helpers of the weights tests: diffusers reference models and weight randomisation."""

from __future__ import annotations

import torch
from torch import nn


def perturb_(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add seeded noise to EVERY parameter (norm affines, zero-initialised temporal convs and biases included) and
    draw each ``mix_factor`` from N(0, 1), so that any two tensors a converter could confuse differ in value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("mix_factor"):
                p.copy_(noise)
            else:
                p.add_(noise * scale)
    return model


def diffusers_kl(diffusers, block_out_channels, layers_per_block, seed: int = 0, **kwargs):
    """A seeded diffusers ``AutoencoderKL`` (eval mode) with every parameter perturbed."""
    n = len(block_out_channels)
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, **{"latent_channels": 4, "norm_num_groups": 32, **kwargs},
    )
    return perturb_(model, seed + 1).eval()


def diffusers_temporal(diffusers, block_out_channels, layers_per_block=2, seed: int = 0, **kwargs):
    """A seeded diffusers ``AutoencoderKLTemporalDecoder`` (eval mode) with every parameter perturbed (its fresh
    temporal parts are near-trivial)."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        **{"latent_channels": 4, **kwargs},
    )
    return perturb_(model, seed + 1).eval()
