"""Streaming frame reader for long source videos (mp4, mov, mkv, webm, avi) at a chosen frame rate.

:mod:`vdiff.data.video_io` decodes clips by frame index, which needs a frame count that the
container knows up front; converters of hour-long, variable-frame-rate source videos (phone mov
files, YouTube mkv/webm) need instead one pass over the stream by timestamps, holding one frame at a
time. :func:`iter_frames` is that pass. It is the one place outside ``video_io`` that imports PyAV
and belongs in ``video_io`` (the lead moves it there; the converters import it from this module
until then).

Resampling is by timestamp: output frame ``k`` is the source frame nearest to
``start_time + k / target_fps`` (ties go to the later frame, as :func:`video_io.clip_frame_indices`
does), so a 30 fps source at 10 fps takes every third frame and a 12 Hz one at 10 Hz drops one in six.
Only frames that are returned are converted to RGB (conversion and resizing cost more than decoding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from vdiff.data.video_io import CORRUPT, EMPTY, NO_VIDEO_STREAM, VideoDecodeError


@dataclass(frozen=True)
class StreamFrame:
    """One output frame: its index in the output stream, its source time in seconds, RGB ``(H, W, 3)`` uint8."""

    index: int
    time: float
    rgb: np.ndarray


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(H, W)`` after scaling so the longer side is at most ``max_side``, both even (yuv420p needs it)."""
    scale = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
    out_w = max(2, int(round(width * scale / 2)) * 2)
    out_h = max(2, int(round(height * scale / 2)) * 2)
    return out_h, out_w


def iter_frames(
    path: str | os.PathLike,
    target_fps: float | None = None,
    max_side: int | None = None,
    start_time: float = 0.0,
    end_time: float | None = None,
    thread_count: int = 1,
) -> Iterator[StreamFrame]:
    """Yield the frames of ``path`` from ``start_time`` to ``end_time`` (seconds from the first frame).

    ``target_fps=None`` keeps every source frame; otherwise frames are resampled by timestamp to
    ``target_fps``. ``max_side`` shrinks frames so the longer side fits (sizes rounded to even).
    Raises :class:`VideoDecodeError` (empty, corrupt, no_video_stream) when the file cannot be read;
    a stream that breaks midway raises ``corrupt`` after the frames decoded before the break.
    """
    if target_fps is not None and not (math.isfinite(target_fps) and target_fps > 0):
        raise ValueError(f"target_fps must be a positive number, got {target_fps!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(EMPTY, f"video file {path} is empty (0 bytes)")
    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except av.FFmpegError as err:
        raise VideoDecodeError(CORRUPT, f"cannot open video {path}: {err}") from err
    try:
        if not container.streams.video:
            raise VideoDecodeError(NO_VIDEO_STREAM, f"{path} holds no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if thread_count > 1:
            ctx.thread_type = "AUTO"
        ctx.thread_count = max(1, int(thread_count))
        if ctx.width <= 0 or ctx.height <= 0:
            raise VideoDecodeError(CORRUPT, f"video {path} has no frame size in its header")
        out_h, out_w = output_size(ctx.width, ctx.height, max_side)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        source_fps = float(rate) if rate else 25.0
        origin: float | None = None  # time of the first decoded frame

        def to_rgb(frame: av.VideoFrame) -> np.ndarray:
            return frame.to_ndarray(format="rgb24", width=out_w, height=out_h)

        count = 0
        previous: tuple[float, av.VideoFrame] | None = None
        next_time = start_time  # next output timestamp (resampling mode)
        decoded = 0
        try:
            for frame in container.decode(stream):
                if frame.time is not None:
                    t_abs = float(frame.time)
                else:
                    t_abs = decoded / source_fps
                decoded += 1
                if origin is None:
                    origin = t_abs
                t = t_abs - origin
                if target_fps is None:
                    if t + 1e-6 < start_time:
                        continue
                    if end_time is not None and t > end_time + 1e-6:
                        return
                    yield StreamFrame(count, t, to_rgb(frame))
                    count += 1
                    continue
                # Resample: emit every output time in (previous time, t] from the nearer of the two frames.
                while (end_time is None or next_time <= end_time + 1e-6) and next_time <= t + 1e-9:
                    if previous is not None and (next_time - previous[0]) < (t - next_time):
                        chosen_t, chosen = previous
                    else:
                        chosen_t, chosen = t, frame
                    yield StreamFrame(count, chosen_t, to_rgb(chosen))
                    count += 1
                    next_time = start_time + count / target_fps
                if end_time is not None and next_time > end_time + 1e-6:
                    return
                previous = (t, frame)
        except av.FFmpegError as err:
            raise VideoDecodeError(CORRUPT, f"video {path} failed to decode after {decoded} frames: {err}") from err
        if decoded == 0:
            raise VideoDecodeError(CORRUPT, f"video {path} holds no decodable frame")
        # The last output time may fall after the last frame but nearer to it than one output period.
        if target_fps is not None and previous is not None:
            last_t, last = previous
            if next_time - last_t < 0.5 / source_fps and (end_time is None or next_time <= end_time + 1e-6):
                yield StreamFrame(count, last_t, to_rgb(last))
    finally:
        container.close()


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
