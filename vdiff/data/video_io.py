"""Video encoding and decoding: the only module of vdiff that imports PyAV (``av``).

Decoding turns an mp4 (bytes or a path) into ``(T, H, W, 3)`` uint8 RGB frames. A clip is chosen by
frame indices (:func:`clip_frame_indices`): every ``stride``-th frame, or frames resampled to a
``target_fps``. :func:`decode_frames` seeks to the keyframe at or before the clip's first frame
instead of decoding from the start, maps decoded frames to indices through their timestamps, and
converts only the frames it returns (RGB conversion and resizing cost more than decoding itself).

Every way a video can be bad ends in :class:`VideoDecodeError` with a short ``reason``, so data
pipelines can skip and count bad samples without parsing messages.

Encoding (:func:`encode_video`) writes H.264 (libx264), yuv420p, in an mp4 container, as the shard
schema (:mod:`vdiff.data.schema`) requires.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import av
import numpy as np
from av.video.reformatter import VideoReformatter

if TYPE_CHECKING:
    import torch

VideoSource = bytes | bytearray | memoryview | str | os.PathLike

DEFAULT_CRF = 18  # libx264 constant rate factor: >= 35 dB PSNR on smooth and on synthetic driving video

# Reasons carried by VideoDecodeError.
EMPTY = "empty"
CORRUPT = "corrupt"
NO_VIDEO_STREAM = "no_video_stream"
TOO_SHORT = "too_short"
ODD_SIZE = "odd_size"
DECODE_ERROR_REASONS: tuple[str, ...] = (EMPTY, CORRUPT, NO_VIDEO_STREAM, TOO_SHORT, ODD_SIZE)


class VideoDecodeError(Exception):
    """A video could not be decoded as asked. ``reason`` is one of :data:`DECODE_ERROR_REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in DECODE_ERROR_REASONS:
            raise ValueError(f"unknown VideoDecodeError reason {reason!r}; known: {DECODE_ERROR_REASONS}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"[{self.reason}] {self.message}"

    def __reduce__(self):  # keep reason when pickled across DataLoader worker processes
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (frame count from the index, not decoded)."""

    fps: float
    num_frames: int
    width: int
    height: int
    codec: str
    duration: float  # seconds


# ----------------------------------------------------------------------------------------------
# Pixel conversion
# ----------------------------------------------------------------------------------------------
# PyAV >= 17 converts frames (``frame.to_ndarray(format=...)``, ``frame.reformat``, an encoder fed RGB
# frames) through one swscale context per Python thread, created with ``threads=0``: a pool of slice
# threads, one per core. A process that forks after such a conversion hands its child that context
# without its threads, and the child's first conversion waits for them forever (av 18.1.1: DataLoader
# workers and process pools hung in ``avpriv_slicethread_execute``). So vdiff never uses the shared
# context: every decode or encode call converts through a context of its own with a single thread,
# which starts no thread a fork could lose, whatever the parent converted before. Parallelism comes
# from loader workers and process pools, one core each, not from swscale's slices.


class FrameConverter:
    """Converts decoded frames with a swscale context owned by this object, single-threaded (fork-safe)."""

    def __init__(self) -> None:
        self._reformatter = VideoReformatter()

    def frame(self, frame: av.VideoFrame, format: str, size: tuple[int, int] | None = None) -> av.VideoFrame:
        """``frame`` in pixel ``format``, resized to ``size=(H, W)`` (bilinear) when given."""
        height, width = size if size else (frame.height, frame.width)
        return self._reformatter.reformat(frame, width=width, height=height, format=format, threads=1)

    def rgb(self, frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of ``frame``, resized to ``size=(H, W)`` when given."""
        return self.frame(frame, "rgb24", size).to_ndarray()


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------


def _describe(src: VideoSource) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return os.fspath(src)


def _open(src: VideoSource) -> tuple[av.container.InputContainer, av.VideoStream]:
    """Open ``src`` and return the container and its first video stream, or raise VideoDecodeError."""
    name = _describe(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoDecodeError(EMPTY, f"video {name} is empty")
        file: object = io.BytesIO(src)
    else:
        path = os.fspath(src)
        try:
            if os.path.getsize(path) == 0:
                raise VideoDecodeError(EMPTY, f"video file {path} is empty (0 bytes)")
        except FileNotFoundError:
            raise FileNotFoundError(f"video file {path} does not exist") from None
        file = path
    try:
        container = av.open(file, mode="r", metadata_errors="ignore")
    except av.FFmpegError as err:
        raise VideoDecodeError(CORRUPT, f"cannot open video {name}: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(NO_VIDEO_STREAM, f"{name} holds no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # damaged header: ffmpeg found a stream but no decoder for it
        container.close()
        raise VideoDecodeError(CORRUPT, f"video {name} has a video stream with an unknown or damaged codec")
    return container, stream


def _stream_fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe(src: VideoSource) -> VideoInfo:
    """Read a video's fps, frame count, size, codec and duration from its container, without decoding.

    ``num_frames`` is the container's frame count (mp4 sample table); where the container has none it
    is estimated from duration x fps. Raises :class:`VideoDecodeError` (empty, corrupt, no video).
    """
    container, stream = _open(src)
    try:
        return _stream_info(container, stream, _describe(src))
    finally:
        container.close()


def _stream_info(container: av.container.InputContainer, stream: av.VideoStream, name: str) -> VideoInfo:
    ctx = stream.codec_context
    fps = _stream_fps(stream)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    num_frames = int(stream.frames or 0)
    if num_frames <= 0 and fps > 0:
        num_frames = int(round(duration * fps))
    if fps <= 0 and duration > 0:
        fps = num_frames / duration
    if ctx.width <= 0 or ctx.height <= 0:
        raise VideoDecodeError(CORRUPT, f"video {name} has no frame size in its header")
    return VideoInfo(fps=fps, num_frames=num_frames, width=ctx.width, height=ctx.height, codec=ctx.name, duration=duration)


# ----------------------------------------------------------------------------------------------
# Clip arithmetic
# ----------------------------------------------------------------------------------------------


def _check_sampling(stride: int | None, target_fps: float | None) -> int | None:
    if stride is not None and target_fps is not None:
        raise ValueError("give either stride or target_fps, not both")
    if target_fps is None:
        stride = 1 if stride is None else stride
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        return int(stride)
    if not (math.isfinite(target_fps) and target_fps > 0):
        raise ValueError(f"target_fps must be a positive number, got {target_fps!r}")
    return None


def _clip_offsets(source_fps: float, num_frames: int, start: int, stride: int | None, target_fps: float | None) -> list[int]:
    if stride is not None:
        return [start + k * stride for k in range(num_frames)]
    # Nearest source frame to each output timestamp start/source_fps + k/target_fps. The small epsilon
    # rounds exact halves up consistently despite float error (e.g. 12 Hz -> 10 Hz: 1.2 -> 1, 2.4 -> 2).
    ratio = source_fps / target_fps
    return [start + int(math.floor(k * ratio + 0.5 + 1e-9)) for k in range(num_frames)]


def clip_frame_indices(
    num_source_frames: int,
    source_fps: float,
    num_frames: int,
    start: int = 0,
    stride: int | None = None,
    target_fps: float | None = None,
) -> list[int]:
    """Source-frame indices of a clip of ``num_frames`` frames beginning at source frame ``start``.

    Either every ``stride``-th frame (default stride 1), or the nearest source frame to each output
    timestamp ``start / source_fps + k / target_fps`` (a 30 fps source at ``target_fps=10`` takes
    every 3rd frame; at ``target_fps`` above ``source_fps`` frames repeat). Raises
    ``VideoDecodeError("too_short")`` when the clip runs past the last frame.
    """
    stride = _check_sampling(stride, target_fps)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if target_fps is not None and not (source_fps > 0):
        raise ValueError(f"source_fps must be positive to resample to target_fps, got {source_fps!r}")
    indices = _clip_offsets(source_fps, num_frames, start, stride, target_fps)
    if indices[-1] >= num_source_frames:
        how = f"stride {stride}" if stride is not None else f"{target_fps} fps from {source_fps} fps"
        raise VideoDecodeError(
            TOO_SHORT,
            f"a clip of {num_frames} frames at {how} starting at frame {start} needs frame {indices[-1]}, "
            f"but the video has {num_source_frames} frames",
        )
    return indices


def max_clip_start(
    num_source_frames: int,
    source_fps: float,
    num_frames: int,
    stride: int | None = None,
    target_fps: float | None = None,
) -> int:
    """The last ``start`` for which :func:`clip_frame_indices` fits in the video; -1 if no start fits."""
    stride = _check_sampling(stride, target_fps)
    span = _clip_offsets(source_fps, num_frames, 0, stride, target_fps)[-1]  # offset of the last frame
    return max(num_source_frames - 1 - span, -1)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode_frames(
    src: VideoSource,
    indices: Sequence[int],
    size: tuple[int, int] | None = None,
    thread_count: int = 1,
    allow_odd_size: bool = False,
) -> np.ndarray:
    """Decode the frames at ``indices`` (source-frame numbers, any order, repeats allowed).

    Returns ``(len(indices), H, W, 3)`` uint8 RGB; ``size=(H, W)`` resizes (swscale, bilinear).
    Seeks to the keyframe at or before the smallest index instead of decoding from the start and
    stops after the largest. A video whose frames have an odd width or height cannot be a vdiff
    shard video (yuv420p) and raises ``odd_size`` unless ``allow_odd_size`` (for converters reading
    raw source videos). Raises :class:`VideoDecodeError`: empty, corrupt, no_video_stream,
    too_short (an index past the last decodable frame), odd_size.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("decode_frames needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
    container, stream = _open(src)
    try:
        return _decode_indices(container, stream, indices, size, thread_count, allow_odd_size, _describe(src))
    finally:
        container.close()


def _decode_indices(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    indices: list[int],
    size: tuple[int, int] | None,
    thread_count: int,
    allow_odd_size: bool,
    name: str,
) -> np.ndarray:
    """Decode each distinct index once, in order, then lay the frames out as ``indices`` asks."""
    wanted = sorted(set(indices))
    frames = _decode_sorted(container, stream, wanted, size, thread_count, allow_odd_size, name)
    if wanted == indices:
        return frames
    position = {index: row for row, index in enumerate(wanted)}
    return frames[[position[i] for i in indices]]


def _decode_sorted(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    wanted: list[int],
    size: tuple[int, int] | None,
    thread_count: int,
    allow_odd_size: bool,
    name: str,
) -> np.ndarray:
    ctx = stream.codec_context
    if not allow_odd_size and (ctx.width % 2 or ctx.height % 2):
        raise VideoDecodeError(ODD_SIZE, f"video {name} has odd frame size {ctx.width}x{ctx.height} (W x H)")
    if thread_count > 1:
        ctx.thread_type = "AUTO"
    ctx.thread_count = max(1, int(thread_count))

    fps = _stream_fps(stream)
    time_base = stream.time_base
    start_pts = stream.start_time if stream.start_time is not None else 0
    # Frame index from a timestamp: rounding absorbs the encoder's pts jitter.
    ticks_per_frame = float(1 / (fps * time_base)) if fps > 0 and time_base else None

    out: np.ndarray | None = None
    next_row = 0
    first = wanted[0]
    seeked = False
    if first > 0 and ticks_per_frame is not None:
        # Seek on the stream, backward: lands on the keyframe at or before the target timestamp.
        target = int(start_pts + math.floor(first * ticks_per_frame))
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
            seeked = True
        except av.FFmpegError:
            seeked = False

    wanted_set = set(wanted)
    convert = FrameConverter()

    def frames_of(packets):
        """Decode packets, telling the decoder to drop non-reference frames that are not wanted.

        A non-reference frame (most B-frames) is needed by no other frame, so skipping the ones
        outside the clip saves their decoding for free: about a third of the frames before a clip's
        first frame, and most of the frames between the wanted ones of a strided or resampled clip.
        """
        skipping = False
        last = wanted[-1]
        for packet in packets:
            if packet.pts is not None and ticks_per_frame is not None:
                position = (packet.pts - start_pts) / ticks_per_frame
                index = int(round(position))
                # Only frames on the constant-rate grid before the last wanted one: in a variable-rate
                # stream a frame off the grid may have to stand in for a missing wanted index.
                skip = index not in wanted_set and index < last and abs(position - index) < 0.01
                if skip != skipping:
                    ctx.skip_frame = "NONREF" if skip else "DEFAULT"
                    skipping = skip
            yield from packet.decode()

    def run(frames_iter) -> bool:
        """Fill ``out`` from decoded frames; False if the stream cannot be mapped (restart from 0)."""
        nonlocal out, next_row
        counter = -1
        for frame in frames_iter:
            if frame.pts is not None and ticks_per_frame is not None:
                index = int(round((frame.pts - start_pts) / ticks_per_frame))
            elif seeked:
                return False  # no timestamps: only counting from frame 0 maps frames to indices
            else:
                index = counter + 1
            counter = index
            if index < wanted[next_row]:
                continue
            if index > wanted[next_row] and next_row == 0 and seeked:
                return False  # the seek landed after the first wanted frame
            # Otherwise, if the stream skipped an index (variable frame rate), this frame serves the missed one.
            while next_row < len(wanted) and wanted[next_row] <= index:
                rgb = convert.rgb(frame, size)
                if out is None:
                    out = np.empty((len(wanted), *rgb.shape), dtype=np.uint8)
                out[next_row] = rgb
                next_row += 1
            if next_row == len(wanted):
                return True
        return True

    try:
        ok = run(frames_of(container.demux(stream)))
        if not ok:
            out, next_row, seeked = None, 0, False
            ctx.skip_frame = "DEFAULT"
            container.seek(0, stream=stream, backward=True, any_frame=False)
            run(container.decode(stream))
    except av.FFmpegError as err:
        raise VideoDecodeError(CORRUPT, f"video {name} failed to decode near frame {wanted[next_row]}: {err}") from err
    if next_row < len(wanted):
        raise VideoDecodeError(
            TOO_SHORT,
            f"video {name} ends before frame {wanted[next_row]} (needs frames up to {wanted[-1]}; "
            f"header says {stream.frames} frames)",
        )
    assert out is not None
    return out


def decode_clip(
    src: VideoSource,
    num_frames: int,
    start: int = 0,
    stride: int | None = None,
    target_fps: float | None = None,
    size: tuple[int, int] | None = None,
    thread_count: int = 1,
    allow_odd_size: bool = False,
) -> np.ndarray:
    """Decode a clip: :func:`clip_frame_indices` from the probed fps and frame count, then :func:`decode_frames`.

    Returns ``(num_frames, H, W, 3)`` uint8 RGB.
    """
    container, stream = _open(src)  # one open for the header and the frames
    try:
        info = _stream_info(container, stream, _describe(src))
        indices = clip_frame_indices(info.num_frames, info.fps, num_frames, start, stride, target_fps)
        return _decode_indices(container, stream, indices, size, thread_count, allow_odd_size, _describe(src))
    finally:
        container.close()


def decode_all(src: VideoSource, size: tuple[int, int] | None = None, thread_count: int = 1) -> np.ndarray:
    """Decode every frame of a video, ``(T, H, W, 3)`` uint8 RGB (for converters and inspection)."""
    container, stream = _open(src)
    ctx = stream.codec_context
    if thread_count > 1:
        ctx.thread_type = "AUTO"
    ctx.thread_count = max(1, int(thread_count))
    frames = []
    convert = FrameConverter()
    try:
        for frame in container.decode(stream):
            frames.append(convert.rgb(frame, size))
    except av.FFmpegError as err:
        raise VideoDecodeError(CORRUPT, f"video {_describe(src)} failed to decode after {len(frames)} frames: {err}") from err
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError(CORRUPT, f"video {_describe(src)} holds no decodable frame")
    return np.stack(frames)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def _as_uint8_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    if not isinstance(frames, np.ndarray):  # a torch tensor (imported lazily: video_io needs no torch)
        frames = frames.detach().cpu().numpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames holds no frame (T == 0)")
    return np.ascontiguousarray(frames)


def encode_video(
    frames: np.ndarray | torch.Tensor,
    fps: float,
    crf: int = DEFAULT_CRF,
    preset: str = "medium",
    gop_size: int | None = None,
    pix_fmt: str = "yuv420p",
    threads: int = 1,
) -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames as an H.264 (libx264) mp4 and return its bytes.

    ``fps`` may be any positive number (17 for Cityscapes, 12, 10, 29.97; stored as a fraction).
    ``gop_size`` is the keyframe interval; ``None`` puts a keyframe about every second, so a random
    clip seeks close to its first frame. ``pix_fmt`` is yuv420p for shards (which needs even width and
    height: odd sizes raise ``ValueError``); yuv444p allows odd sizes (for tests of odd-size inputs).
    ``threads`` is x264's thread count: 1 by default, so parallel workers do not oversubscribe the
    cores and the same frames give the same bytes in every process.
    """
    array = _as_uint8_frames(frames)
    num, height, width, _ = array.shape
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise ValueError(f"yuv420p H.264 needs even frame sizes, got H={height} W={width}; crop or resize first")
    if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(float(fps)) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    if gop_size is None:
        gop_size = max(1, int(round(float(rate))))
    if gop_size < 1:
        raise ValueError(f"gop_size must be >= 1, got {gop_size}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = gop_size
        stream.codec_context.time_base = 1 / rate
        stream.options = {"crf": str(crf), "preset": preset, "threads": str(max(1, int(threads)))}
        convert = FrameConverter()  # RGB -> pix_fmt here, not in the encoder's thread-pooled converter
        for i in range(num):
            frame = convert.frame(av.VideoFrame.from_ndarray(array[i], format="rgb24"), pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Streaming reader for long source videos (converters)
# ----------------------------------------------------------------------------------------------
# Clip decoding above works by frame index, which needs a frame count the container knows up
# front; converters of hour-long, variable-frame-rate sources (phone mov, YouTube mkv/webm) need one
# pass over the stream by timestamps, holding one frame at a time. Output frame k is the source
# frame nearest to ``start_time + k / target_fps`` (ties go to the later frame, as in
# clip_frame_indices); only returned frames are converted to RGB.


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

        convert = FrameConverter()

        def to_rgb(frame: av.VideoFrame) -> np.ndarray:
            return convert.rgb(frame, (out_h, out_w))

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
