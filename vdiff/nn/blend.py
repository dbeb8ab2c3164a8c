"""The learned blend of a spatial and a temporal output (SVD's ``AlphaBlender``), one convention for every model.

A spatio-temporal layer computes a spatial output ``s`` (per frame) and a temporal output ``t`` (across frames)
of the same shape and returns ``alpha*s + (1-alpha)*t``: ``alpha`` is always the SPATIAL weight. Where it comes
from is the model's choice:

- SVD's UNet (:mod:`vdiff.nn.unet_blocks`): ``alpha = sigmoid(mix_factor)``, forced to 1 for frames an
  ``image_only_indicator`` marks as images (:func:`mix_alpha`);
- SVD's temporal VAE decoder (:class:`vdiff.models.autoencoder.VideoResBlock`): its ``mix_factor`` weights the
  temporal path (sgm/diffusers' ``switch_spatial_to_temporal_mix``), so ``alpha = 1 - sigmoid(mix_factor)``.

The two evaluation orders of :func:`blend` give the same sum up to float rounding; each is exact where a model
relies on it:

- ``"lerp"`` (the default, the UNet): ``torch.lerp(s, t, 1 - alpha)`` returns ``s`` bit for bit where ``alpha`` is
  1 (image-only frames) and where ``t == s`` whatever ``alpha`` (an inflated image UNet, whose temporal branches
  return their input: :mod:`vdiff.weights.inflate`);
- ``"weighted_sum"`` (the VAE): ``alpha*s + (1-alpha)*t`` with ``alpha`` cast to the activations' dtype first, the
  order sgm and diffusers evaluate, so converted models compute their values bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

BlendOrder = Literal["lerp", "weighted_sum"]


def mix_alpha(mix_factor: Tensor, image_only_indicator: Tensor | None, batch: int, frames: int) -> Tensor:
    """Spatial weight ``alpha``: ``sigmoid(mix_factor)`` ``()`` (float32), or ``(B, T)`` with 1 where
    ``image_only_indicator`` ``(B, T)`` is true (nonzero)."""
    alpha = torch.sigmoid(mix_factor.float()).reshape(())  # ()
    if image_only_indicator is None:
        return alpha
    return torch.where(image_only_indicator.bool(), torch.ones_like(alpha), alpha).reshape(batch, frames)  # (B, T)


def blend(spatial: Tensor, temporal: Tensor, alpha: Tensor, order: BlendOrder = "lerp") -> Tensor:
    """``alpha*spatial + (1-alpha)*temporal``: ``alpha`` is the spatial weight and broadcasts against both
    (``()`` or e.g. ``(B, T, 1, 1, 1)``); ``order`` as in the module docstring. The output has ``spatial``'s
    memory layout."""
    if order == "lerp":
        return torch.lerp(spatial, temporal, (1.0 - alpha).to(spatial.dtype))
    if order == "weighted_sum":
        alpha = alpha.to(spatial.dtype)
        return alpha * spatial + (1.0 - alpha) * temporal
    raise ValueError(f"blend: order must be 'lerp' or 'weighted_sum', got {order!r}")
