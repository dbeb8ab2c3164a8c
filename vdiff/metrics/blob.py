"""Blob indicator: how far the largest feature-norm spike of a sample stands above its median.

"Blob" artifacts of autoencoders and GANs (StyleGAN2; SD-VAE discussions) show up, before they are visible
in pixels, as a few spatial positions whose feature vector has a norm many times that of everywhere else.
The indicator of one sample is

    ratio = max_p ||f(p)||_2 / median_p ||f(p)||_2

over all positions ``p`` (frames x rows x columns) of a latent or feature map, the norm taken over channels.
A clean map gives a small ratio (a few units for Gaussian-like features); a planted spike gives its own
norm over the median. :class:`FeatureNormProbe` collects it from intermediate layers with forward hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

DEFAULT_BLOB_THRESHOLD = 10.0  # ratios above this are flagged; clean 4-channel Gaussian latents give ~2-3


def channel_norms(features: Tensor, channel_dim: int) -> Tensor:
    """L2 norm over ``channel_dim`` (float32): the channel axis is removed."""
    return torch.linalg.vector_norm(features.float(), dim=channel_dim)


def blob_ratio(features: Tensor, channel_dim: int = -3, eps: float = 1e-8) -> Tensor:
    """Per-sample ratio of the largest channel-norm to the median channel-norm: ``(B,)``.

    ``features``: ``(B, ..., C, h, w)`` with channels at ``channel_dim`` (default -3, so both latents
    ``(B, T, c, h, w)`` and feature maps ``(B, C, h, w)`` work); every other non-batch axis counts as a position.
    """
    if features.ndim < 3:
        raise ValueError(f"blob_ratio: expected (B, ..., C, h, w), got {tuple(features.shape)}")
    norms = channel_norms(features, channel_dim).flatten(1)  # (B, positions)
    peak = norms.amax(dim=1)  # (B,)
    median = norms.median(dim=1).values  # (B,)
    return peak / median.clamp_min(eps)


def flag_blobs(ratio: Tensor, threshold: float = DEFAULT_BLOB_THRESHOLD) -> Tensor:
    """Bool ``(B,)``: samples whose blob ratio exceeds ``threshold``."""
    return ratio > threshold


class FeatureNormProbe:
    """Context manager recording :func:`blob_ratio` of the outputs of chosen modules.

    Modules may see frames folded into the batch (``(B*T, C, h, w)``); pass ``batch_size=B`` and each
    output is unfolded to ``(B, T, C, h, w)`` first, so the ratio stays per sample over all its frames.
    After the ``with`` block, ``ratios[name]`` is ``(B,)`` per probed module (the last call, if several)::

        with FeatureNormProbe({"up0": decoder.up[0]}, batch_size=b) as probe:
            decoder(z)
        worst = probe.max_ratio()  # (B,)
    """

    def __init__(self, modules: dict[str, nn.Module] | Iterable[tuple[str, nn.Module]], batch_size: int) -> None:
        self.modules = dict(modules)
        self.batch_size = int(batch_size)
        self.ratios: dict[str, Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if not isinstance(output, Tensor) or output.ndim != 4:
                raise TypeError(f"FeatureNormProbe: {name} must output (N, C, h, w), got {type(output).__name__}")
            n = output.shape[0]
            if n % self.batch_size:
                raise ValueError(f"FeatureNormProbe: {name} output batch {n} is not a multiple of {self.batch_size}")
            video = output.detach().reshape(self.batch_size, n // self.batch_size, *output.shape[1:])  # (B, T, C, h, w)
            self.ratios[name] = blob_ratio(video, channel_dim=2)

        return record

    def __enter__(self) -> FeatureNormProbe:
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def max_ratio(self) -> Tensor:
        """Per sample, the largest ratio over the probed modules: ``(B,)``."""
        if not self.ratios:
            raise RuntimeError("FeatureNormProbe recorded nothing: none of the probed modules ran")
        return torch.stack(list(self.ratios.values())).amax(dim=0)
