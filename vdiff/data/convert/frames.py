"""Still-image helpers for image-sequence datasets (Cityscapes, nuScenes).

Video sources are read with :func:`vdiff.data.video_io.iter_frames` (the only module importing PyAV).
"""

from __future__ import annotations

import os

import numpy as np

# ----------------------------------------------------------------------------------------------
# Still images (no PyAV): image-sequence datasets (Cityscapes, nuScenes) read and resize frames here.
# ----------------------------------------------------------------------------------------------

RESIZE_MODES: tuple[str, ...] = ("squash", "crop")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB; ``ValueError`` naming the file when it cannot be decoded."""
    import cv2  # OpenCV decodes png/jpg several times faster than Pillow

    data = np.fromfile(os.fspath(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"cannot decode image {os.fspath(path)} (empty, truncated or not an image)")
    return np.ascontiguousarray(bgr[..., ::-1])


def crop_box(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int, int, int]:
    """Centred ``(top, left, h, w)`` crop of a ``height x width`` image with the aspect ratio of the output."""
    target = out_width / out_height
    if width / height > target:  # too wide: crop the sides
        w = max(1, int(round(height * target)))
        return 0, (width - w) // 2, height, w
    h = max(1, int(round(width / target)))
    return (height - h) // 2, 0, h, width


def resize_image(rgb: np.ndarray, size: tuple[int, int] | None, mode: str = "squash") -> np.ndarray:
    """Resize ``(H, W, 3)`` to ``size = (h, w)``: ``squash`` ignores the aspect ratio (the MCVD/VDT
    Cityscapes protocol), ``crop`` takes the centred crop of the output's aspect ratio first."""
    import cv2

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if size is None:
        return rgb
    out_h, out_w = size
    if mode == "crop":
        top, left, h, w = crop_box(rgb.shape[0], rgb.shape[1], out_h, out_w)
        rgb = rgb[top : top + h, left : left + w]
    if rgb.shape[:2] == (out_h, out_w):
        return np.ascontiguousarray(rgb)
    shrinking = out_h < rgb.shape[0] and out_w < rgb.shape[1]
    return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
