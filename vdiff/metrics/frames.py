"""Per-frame image metrics over video tensors, restricted to chosen frames.

torchmetrics' SSIM treats 5-D input as 3-D volumes, so videos are folded to ``(B*T, C, H, W)``
before every call here. Videos are float ``(B, T, C, H, W)`` in ``[-1, 1]`` unless stated.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _fold(video: Tensor) -> Tensor:
    return video.flatten(0, 1).float()  # (B*T, C, H, W)


def frame_psnr(pred: Tensor, target: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR of every frame: ``(B, T)``. Inputs ``(B, T, C, H, W)`` with values spanning ``data_range``."""
    b, t = pred.shape[:2]
    values = peak_signal_noise_ratio(
        _fold(pred), _fold(target), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )
    return values.reshape(b, t)


def frame_ssim(pred: Tensor, target: Tensor, data_range: float = 2.0) -> Tensor:
    """SSIM of every frame (Gaussian window 11, sigma 1.5): ``(B, T)``."""
    b, t = pred.shape[:2]
    values = structural_similarity_index_measure(
        _fold(pred), _fold(target), data_range=data_range, reduction="none"
    )
    return values.reshape(b, t)


def masked_frame_mean(values: Tensor, frame_mask: Tensor | None) -> Tensor:
    """Mean over the frames where ``frame_mask`` (bool ``(B, T)``) is true, per clip: ``(B,)``."""
    if frame_mask is None:
        return values.mean(dim=1)
    # where(), not a product: excluded frames may hold inf (PSNR of an exact copy) and inf * 0 is NaN.
    total = torch.where(frame_mask, values, torch.zeros_like(values)).sum(dim=1)
    return total / frame_mask.sum(dim=1).clamp_min(1).to(values.dtype)


def copy_last_given_frame(video: Tensor, given_frames: Tensor) -> Tensor:
    """The copy-last-frame baseline: every frame becomes the latest given frame at or before it.

    video ``(B, T, C, H, W)``; given_frames bool ``(B, T)``. Frames before the first given frame
    copy the first given frame. Clips with no given frame are returned unchanged.
    """
    b, t = given_frames.shape
    index = torch.arange(t, device=video.device).expand(b, t)
    last = torch.where(given_frames, index, torch.full_like(index, -1)).cummax(dim=1).values  # (B, T)
    first = torch.where(given_frames, index, torch.full_like(index, t)).min(dim=1, keepdim=True).values
    source = torch.where(last >= 0, last, first.expand(b, t)).clamp(max=t - 1)  # (B, T)
    gathered = video.gather(1, source.view(b, t, 1, 1, 1).expand_as(video))
    has_given = given_frames.any(dim=1).view(b, 1, 1, 1, 1)
    return torch.where(has_given, gathered, video)
