"""Lateral image motion of a video: how far the picture scrolls sideways from frame to frame.

A camera that yaws moves every distant point sideways in the picture by about ``focal * d_yaw`` pixels, so the
horizontal scroll of the horizon band is a direct, model-free readout of how a (generated) drive turns. This module
measures it, to check that an action-conditioned world model turns where it is told (``vdiff.callbacks.steering``).

Sign convention: **positive = the picture content moves to the RIGHT** (towards larger column indices). A camera
yawing LEFT sees the world move right (vdiff's synthetic camera, :mod:`vdiff.data.synthetic`, and any real
windscreen), so with vdiff's action convention (``steering`` and ``yaw_rate``: + = left) a left turn gives a positive
shift: ``sign(lateral_shift) == sign(steering)``.

How a shift is measured, for every pair of consecutive frames ``(t, t+1)`` of every clip:

1. both frames are turned grey (the mean over channels) and cut to a band of rows (``rows``: fractions of the height,
   e.g. the band around the horizon; default all rows);
2. the shift ``s`` minimising the mean squared difference ``mean_x (I_{t+1}(x) - I_t(x - s))^2`` over the band is
   searched among whole pixels in ``[-max_shift, max_shift]``, then on a 1/20-pixel grid within one pixel of the
   best whole shift (frame ``t`` resampled by linear interpolation), and refined by a parabola through the three
   best grid points. Only columns that stay inside the frame for every candidate shift are compared
   (``max_shift + 1`` columns are left out on both sides), so the borders never wrap around.

Sub-pixel accuracy on smooth content is a few hundredths of a pixel (tested with band-limited images shifted by
known fractions, both ways). A flat band (e.g. clear sky) has no horizontal structure and gives 0. The measurement
is a least-squares translation of the whole band: content that moves in different ways (the road's perspective
flow beside the scrolling horizon) gives an average, so choose ``rows`` where the yaw dominates.
"""

from __future__ import annotations

import torch
from torch import Tensor

FINE_STEP = 0.05  # px: the sub-pixel grid
__all__ = ["lateral_shift", "lateral_shifts", "band_rows"]


def band_rows(height: int, rows: tuple[float, float] | None) -> slice:
    """The row slice of the band ``rows = (top, bottom)`` (fractions of ``height``, top < bottom; None: all rows)."""
    if rows is None:
        return slice(0, height)
    top, bottom = (float(v) for v in rows)
    if not 0.0 <= top < bottom <= 1.0:
        raise ValueError(f"lateral_shift: rows must be (top, bottom) fractions with 0 <= top < bottom <= 1, got {rows}")
    first = min(int(round(top * height)), height - 1)
    last = max(int(round(bottom * height)), first + 1)
    return slice(first, last)


def _ssd(prev: Tensor, nxt: Tensor, shifts: Tensor, margin: int) -> Tensor:
    """Mean squared difference between ``nxt(x)`` and ``prev(x - s)`` over the interior columns, for each shift.

    prev, nxt: ``(N, R, W)``; shifts: ``(N, K)`` in pixels (``|s| <= margin - 1``). Returns ``(N, K)``."""
    n, r, w = prev.shape
    x = torch.arange(margin, w - margin, dtype=prev.dtype, device=prev.device)  # (X,)
    source = x[None, None, :] - shifts[..., None]  # (N, K, X): where frame t's content comes from
    left = source.floor()
    frac = source - left
    left = left.long().clamp(0, w - 2)
    index = left.reshape(n, 1, -1).expand(n, r, -1)  # (N, R, K*X)
    a = torch.gather(prev, 2, index).view(n, r, *source.shape[1:])  # (N, R, K, X)
    b = torch.gather(prev, 2, index + 1).view(n, r, *source.shape[1:])
    moved = a + frac[:, None] * (b - a)  # (N, R, K, X)
    target = nxt[:, :, margin : w - margin][:, :, None]  # (N, R, 1, X)
    return (moved - target).pow(2).mean(dim=(1, 3))  # (N, K)


def lateral_shifts(video: Tensor, rows: tuple[float, float] | None = None, max_shift: float | None = None) -> Tensor:
    """The horizontal shift of every consecutive frame pair, in pixels, + = content moves right (module docstring).

    video: ``(B, T, C, H, W)`` (any value range; ``T >= 2``); rows: the band ``(top, bottom)`` as fractions of the
    height (None: the whole frame); max_shift: the largest shift searched, in pixels (default ``W / 8``).
    Returns ``(B, T - 1)`` float32: column ``t`` is the shift from frame ``t`` to ``t + 1``."""
    if video.ndim != 5 or video.shape[1] < 2:
        raise ValueError(f"lateral_shifts: video must be (B, T >= 2, C, H, W), got {tuple(video.shape)}")
    b, t, _, h, w = video.shape
    limit = int(max_shift) if max_shift is not None else max(1, w // 8)
    if limit < 1 or w < 2 * limit + 6:
        raise ValueError(f"lateral_shifts: max_shift={max_shift} does not fit frames {w} pixels wide")
    band = video.float().mean(dim=2)[:, :, band_rows(h, rows)]  # (B, T, R, W)
    prev = band[:, :-1].reshape(b * (t - 1), band.shape[2], w)  # (N, R, W)
    nxt = band[:, 1:].reshape(b * (t - 1), band.shape[2], w)
    n = prev.shape[0]
    margin = limit + 2  # columns left out on both sides: every candidate stays inside the frame
    whole = torch.arange(-limit, limit + 1, dtype=torch.float32, device=video.device).expand(n, -1)  # (N, K)
    best = whole.gather(1, _ssd(prev, nxt, whole, margin).argmin(dim=1, keepdim=True))  # (N, 1)
    offsets = torch.arange(-1.0, 1.0 + FINE_STEP / 2, FINE_STEP, device=video.device)  # (F,)
    fine = (best + offsets[None]).clamp(-limit - 1, limit + 1)  # (N, F)
    cost = _ssd(prev, nxt, fine, margin)  # (N, F)
    i = cost.argmin(dim=1).clamp(1, offsets.numel() - 2)  # (N,): interior, so both neighbours exist
    c0, c1, c2 = (cost.gather(1, (i + d)[:, None])[:, 0] for d in (-1, 0, 1))
    curvature = c0 - 2 * c1 + c2
    step = torch.where(curvature > 1e-12, 0.5 * (c0 - c2) / curvature.clamp_min(1e-12), torch.zeros_like(c1))
    shift = fine.gather(1, i[:, None])[:, 0] + step.clamp(-1.0, 1.0) * FINE_STEP
    flat = cost.amax(dim=1) - cost.amin(dim=1) <= 1e-12  # no horizontal structure: no measurable motion
    shift = torch.where(flat, torch.zeros_like(shift), shift)
    return shift.view(b, t - 1)


def lateral_shift(
    video: Tensor,
    rows: tuple[float, float] | None = None,
    frames: slice | None = None,
    max_shift: float | None = None,
) -> Tensor:
    """The mean lateral shift of each clip, in pixels per frame, + = content moves right (a LEFT turn): ``(B,)``.

    video: ``(B, T, C, H, W)``; rows, max_shift: as :func:`lateral_shifts`; frames: which frames to measure (e.g.
    ``slice(2, None)`` for the generated frames after 2 given ones; the pairs inside it are averaged; default all)."""
    if frames is not None:
        video = video[:, frames]
    return lateral_shifts(video, rows, max_shift).mean(dim=1)
