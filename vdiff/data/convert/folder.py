"""``vdiff data shards SRC --out DIR``: a folder tree of videos -> curated clip shards.

Every ``.mp4 .mov .mkv .webm .avi`` file under ``SRC`` is decoded once, as a stream
(:func:`vdiff.data.convert.frames.iter_frames`), resampled to ``--fps`` and shrunk to ``--max-side``.
Frames go through a PySceneDetect scene-cut detector (:mod:`vdiff.data.convert.curation`); each scene
is cut into clips of ``--clip-frames`` frames (a last piece of at least ``--min-frames`` is kept as a
shorter clip). Each clip gets a motion score (mean Farneback flow magnitude, stored in the json
``extra``) and is dropped when it is below ``--min-motion`` (static) or above ``--max-motion``.
Kept clips are encoded (H.264) and written to ``<prefix>-NNNNNN.tar`` shards with ``manifest.json``.

Resumable: ``DIR/convert_state.json`` records the options, the shard parts written and every input
finished. Shards are committed every ``--commit-every`` inputs (the writer is closed, the state
saved atomically); a rerun skips finished inputs, deletes shard files of an interrupted part and
continues. Changing an option that changes the clips makes the rerun refuse (use a new ``--out``).
An unreadable input is reported and skipped, never fatal; it is retried on the next run.

A held-out split (``--val-fraction F``, ``--split-seed``): whole input videos go to ``DIR/train`` or ``DIR/val``
(``round(F * N)`` of them to val, chosen by a hash of the seed and the path, so no video has clips in both), each
a resumable shard set as above; ``DIR/split.json`` records the split, and a rerun keeps it. A ``SRC`` without any
input is an error, not a shard set of 0 clips.

Dropped-clip reasons in the report: ``too_short`` (a scene piece, or a whole input, shorter than
``--min-frames``), ``static`` (motion below ``--min-motion``), ``too_much_motion``.

Image sequences (``--image-sequences``; also taken when ``SRC`` holds no video file at all): every folder under
``SRC`` (``SRC`` itself included) that directly holds ``.png .jpg .jpeg .webp`` files is one input video, its
frames those files in natural order (``2.png`` before ``10.png``), e.g. SVD-MV's 21-frame orbital renders, one
folder per object. A sequence plays at ``--fps`` (default 8; its frames are never resampled), is shrunk to
``--max-side`` like a video (both sides even), images with an alpha channel are composited over white, and it
is cut into ``--clip-frames`` clips without scene detection (renders have no cuts); the motion score and the
motion filter apply as to videos. A sequence with an unreadable image (``broken_image``) or with images of
different sizes (``mixed_sizes``) is reported failed and skipped as a whole (a missing view would silently
change the spacing of the rest), and retried on the next run. Each clip's json ``extra`` names its image files
(``images``). Resumable like videos (a sequence's key in the state is its folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from vdiff.data.convert.curation import (
    DEFAULT_FLOW_FPS,
    DEFAULT_FLOW_SIZE,
    SCENE_DETECTORS,
    SceneCutDetector,
    motion_score,
)
from vdiff.data.names import name_digest, plain_text
from vdiff.data.schema import Manifest, ShardInfo, VideoMeta
from vdiff.data.shards import ShardWriter
from vdiff.data.video_io import DEFAULT_CRF, VideoDecodeError, encode_video, iter_frames, output_size, probe

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_SEQUENCE_FPS = 8.0  # frame rate of an image sequence when --fps is not given
BROKEN_IMAGE = "broken_image"  # an image of a sequence cannot be read (the sequence fails)
MIXED_SIZES = "mixed_sizes"  # the images of a sequence differ in size (the sequence fails)
STATE_NAME = "convert_state.json"
SPLIT_NAME = "split.json"  # build_split_shards: which inputs went to train and val
SPLITS: tuple[str, ...] = ("train", "val")
PART_PATTERN = re.compile(r"^part(\d{4})-\d{6}\.tar(\.tmp)?$")
DROP_REASONS: tuple[str, ...] = ("too_short", "static", "too_much_motion")


# ----------------------------------------------------------------------------------------------
# Options and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipOptions:
    """How inputs become clips. Every field except ``crf``/``preset``/``source`` changes which clips exist."""

    clip_frames: int = 32
    min_frames: int | None = None  # None: clip_frames (every clip has exactly clip_frames frames)
    fps: float | None = None  # None: keep the source frame rate
    max_side: int | None = None  # None: keep the source size (rounded down to even)
    scene_detector: str = "adaptive"  # adaptive | content | none
    scene_threshold: float | None = None  # the detector's own default when None
    min_scene_frames: int = 8
    motion: bool = True  # compute the motion score
    min_motion: float | None = None
    max_motion: float | None = None
    flow_fps: float = DEFAULT_FLOW_FPS
    flow_size: int = DEFAULT_FLOW_SIZE
    crf: int = DEFAULT_CRF
    preset: str = "medium"
    source: str = "folder"

    def __post_init__(self) -> None:
        if self.clip_frames < 2:
            raise ValueError(f"clip_frames must be >= 2, got {self.clip_frames}")
        if self.min_frames is not None and not (2 <= self.min_frames <= self.clip_frames):
            raise ValueError(f"min_frames must be in [2, clip_frames={self.clip_frames}], got {self.min_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.max_side is not None and self.max_side < 2:
            raise ValueError(f"max_side must be >= 2, got {self.max_side}")
        if self.scene_detector not in SCENE_DETECTORS:
            raise ValueError(f"scene_detector must be one of {SCENE_DETECTORS}, got {self.scene_detector!r}")
        if (self.min_motion is not None or self.max_motion is not None) and not self.motion:
            raise ValueError("min_motion/max_motion need the motion score (motion=True)")

    @property
    def shortest(self) -> int:
        return self.clip_frames if self.min_frames is None else self.min_frames

    def identity(self) -> dict[str, Any]:
        """The options that decide which clips exist (compared on resume)."""
        data = dataclasses.asdict(self)
        for name in ("crf", "preset", "source"):
            data.pop(name)
        return data


@dataclass(frozen=True)
class Trim:
    """Seconds to drop at the start and at the end of an input (OpenDV-YouTube style metadata)."""

    start_discard: float = 0.0
    end_discard: float = 0.0


@dataclass
class Clip:
    key: str
    mp4: bytes
    meta: VideoMeta


@dataclass
class InputResult:
    """What one input produced: clips to write, drops by reason, or an error."""

    rel: str
    clips: list[Clip] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    error_reason: str | None = None
    error: str | None = None


@dataclass
class Report:
    """Totals of a conversion run (this run's work plus the inputs skipped as already finished)."""

    out: str
    inputs_found: int = 0
    inputs_converted: int = 0
    inputs_skipped: int = 0  # finished in an earlier run
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (input, reason, message)
    clips_kept: int = 0
    frames_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    total_clips: int = 0  # in the whole shard set, earlier runs included

    def summary(self) -> str:
        failed_by = Counter(reason for _, reason, _ in self.failed)
        by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(failed_by.items()))
        lines = [
            f"shards in {self.out}: {self.total_clips} clips in total",
            f"inputs: {self.inputs_found} found, {self.inputs_converted} converted now, "
            f"{self.inputs_skipped} skipped (finished before), {len(self.failed)} failed"
            + (f" ({by_reason})" if by_reason else ""),
            f"clips this run: {self.clips_kept} kept ({self.frames_kept} frames)",
        ]
        for reason in sorted(self.dropped):
            lines.append(f"  dropped {reason}: {self.dropped[reason]}")
        for rel, reason, message in self.failed:
            lines.append(f"  FAILED {rel} [{reason}] {message}")
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One input -> clips (runs in worker processes)
# ----------------------------------------------------------------------------------------------


def clip_key(rel: str, clip_index: int) -> str:
    """Sample key of clip ``clip_index`` of input ``rel``: readable stem + hash of the path (unique, no dots)."""
    return f"{plain_text(Path(rel).stem, 60) or 'video'}-{name_digest(rel)}-{clip_index:05d}"


def _scene_clips(frames: list[np.ndarray], clip_frames: int, shortest: int) -> tuple[list[list[np.ndarray]], int]:
    """Cut a finished scene piece into clips; returns (clips, number of too-short pieces dropped)."""
    clips = [frames[i : i + clip_frames] for i in range(0, len(frames), clip_frames)]
    if clips and len(clips[-1]) < shortest:
        clips.pop()
        return clips, 1
    return clips, 0


def _segment(
    stream: Iterable[np.ndarray], options: ClipOptions, fps: float
) -> Iterator[tuple[int, int, list[np.ndarray] | None]]:
    """Split a frame stream into clips along scene cuts, holding at most one clip (+ detector latency).

    Yields ``(scene_index, first_frame_index, frames)``; ``frames is None`` marks a dropped too-short piece.
    """
    detector = (
        None
        if options.scene_detector == "none"
        else SceneCutDetector(options.scene_detector, fps, options.scene_threshold, options.min_scene_frames)
    )
    latency = 0 if detector is None else detector.latency
    buffer: list[np.ndarray] = []
    buffer_start = 0
    scene = 0

    def close_scene(end: int):
        nonlocal buffer, buffer_start
        piece, rest = buffer[: end - buffer_start], buffer[end - buffer_start :]
        clips, short = _scene_clips(piece, options.clip_frames, options.shortest)
        start = buffer_start
        for clip in clips:
            yield scene, start, clip
            start += len(clip)
        if short:
            yield scene, start, None
        buffer, buffer_start = rest, end

    for rgb in stream:
        buffer.append(rgb)
        cuts = detector.push(rgb) if detector is not None else []
        for cut in cuts:
            if cut > buffer_start:
                yield from close_scene(cut)
            scene += 1
        while len(buffer) >= options.clip_frames + latency:
            yield scene, buffer_start, buffer[: options.clip_frames]
            buffer = buffer[options.clip_frames :]
            buffer_start += options.clip_frames
    if detector is not None:
        for cut in detector.finish():
            if cut > buffer_start:
                yield from close_scene(cut)
            scene += 1
    if buffer:
        yield from close_scene(buffer_start + len(buffer))


def _cut_score_encode(
    result: InputResult,
    rel: str,
    options: ClipOptions,
    fps: float,
    frames: Iterable[np.ndarray],
    frame_time: Callable[[int], float],
    extra_of: Callable[[int, int], dict[str, Any]],
) -> None:
    """Cut a frame stream into clips (:func:`_segment`), score, filter and encode them into ``result``.

    ``frame_time(i)``: seconds of frame ``i`` from the start; ``extra_of(first, length)``: input-specific json
    ``extra`` entries of the clip of ``length`` frames starting at frame ``first``.
    """
    produced = 0
    clip_index = 0
    for scene, first, clip_frames in _segment(frames, options, fps):
        produced += 1
        if clip_frames is None:
            result.dropped["too_short"] += 1
            continue
        clip = np.stack(clip_frames)
        extra: dict[str, Any] = {
            "input": rel,
            "scene": scene,
            "first_frame": first,
            "start_time": round(frame_time(first), 4),
            **extra_of(first, len(clip)),
        }
        if options.motion:
            score = motion_score(clip, fps, options.flow_fps, options.flow_size)
            extra.update(motion_score=round(score, 4), motion_fps=options.flow_fps, motion_size=options.flow_size)
            if options.min_motion is not None and score < options.min_motion:
                result.dropped["static"] += 1
                continue
            if options.max_motion is not None and score > options.max_motion:
                result.dropped["too_much_motion"] += 1
                continue
        mp4 = encode_video(clip, fps, crf=options.crf, preset=options.preset)
        meta = VideoMeta(
            fps=float(fps),
            width=int(clip.shape[2]),
            height=int(clip.shape[1]),
            num_frames=int(clip.shape[0]),
            source=options.source,
            extra=extra,
        )
        result.clips.append(Clip(clip_key(rel, clip_index), mp4, meta))
        clip_index += 1
    if produced == 0:
        result.dropped["too_short"] += 1  # nothing decoded (inside the trimmed range)


def convert_input(path: str, rel: str, options: ClipOptions, trim: Trim | None = None) -> InputResult:
    """Decode, cut, score, filter and encode one input video (or image-sequence folder: :func:`convert_sequence`);
    errors are returned, never raised."""
    if os.path.isdir(path):
        return convert_sequence(path, rel, options)
    result = InputResult(rel=rel)
    try:
        info = probe(path)
        fps = options.fps if options.fps is not None else info.fps
        if not fps or fps <= 0:
            raise VideoDecodeError("corrupt", f"{path}: no frame rate in the container and no --fps given")
        start_time = trim.start_discard if trim else 0.0
        end_time = None
        if trim and trim.end_discard > 0:
            end_time = info.duration - trim.end_discard
        if end_time is not None and end_time <= start_time:
            result.dropped["too_short"] += 1
            return result
        stream = iter_frames(
            path, target_fps=options.fps, max_side=options.max_side, start_time=start_time, end_time=end_time
        )
        frame_times: list[float] = []

        def rgb_stream() -> Iterator[np.ndarray]:
            for frame in stream:
                frame_times.append(frame.time)
                yield frame.rgb

        def extra_of(first: int, length: int) -> dict[str, Any]:
            return {"trim": [trim.start_discard, trim.end_discard]} if trim is not None else {}

        _cut_score_encode(result, rel, options, fps, rgb_stream(), lambda i: frame_times[i], extra_of)
    except VideoDecodeError as err:
        result.clips.clear()
        result.error_reason, result.error = err.reason, err.message
    except (OSError, ValueError) as err:
        result.clips.clear()
        result.error_reason, result.error = "unreadable", f"{type(err).__name__}: {err}"
    return result


# ----------------------------------------------------------------------------------------------
# Image sequences: a folder of frames -> one input video
# ----------------------------------------------------------------------------------------------


class ImageSequenceError(Exception):
    """A sequence that cannot become a video: ``reason`` is :data:`BROKEN_IMAGE` or :data:`MIXED_SIZES`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def natural_key(name: str) -> tuple:
    """Sort key that orders the digit runs of a name by value: ``frame2.png`` < ``frame10.png``."""
    parts = tuple((0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", name))
    return parts, name  # the name breaks ties (case, leading zeros)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith(".")


def sequence_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (not in subfolders), in natural order of their names."""
    return sorted((p for p in Path(folder).iterdir() if is_image(p)), key=lambda p: natural_key(p.name))


def find_image_sequences(src: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Folders under ``src`` (``src`` itself included) that directly hold image files, sorted; hidden folders
    and folders under ``exclude`` are skipped."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist or is not a folder")
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder in [src, *sorted(p for p in src.rglob("*") if p.is_dir())]:
        parts = folder.relative_to(src).parts
        if any(part.startswith(".") for part in parts):
            continue
        resolved = folder.resolve()
        if excluded is not None and (resolved == excluded or excluded in resolved.parents):
            continue
        if any(is_image(p) for p in folder.iterdir()):
            found.append(folder)
    return found


def read_image(path: Path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB; an alpha channel is composited over white. Raises
    :class:`ImageSequenceError` (:data:`BROKEN_IMAGE`) naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ImageSequenceError(BROKEN_IMAGE, f"{path}: unreadable image ({type(err).__name__}: {err})") from None


def iter_sequence_frames(images: list[Path], max_side: int | None) -> Iterator[np.ndarray]:
    """The frames of an image sequence, shrunk so the longer side is at most ``max_side`` with both sides even
    (as :func:`vdiff.data.video_io.iter_frames` shrinks videos). Raises :class:`ImageSequenceError`."""
    first_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    for path in images:
        rgb = read_image(path)
        hw = rgb.shape[:2]
        if first_hw is None:
            first_hw = hw
            out_hw = output_size(hw[1], hw[0], max_side)
        elif hw != first_hw:
            raise ImageSequenceError(
                MIXED_SIZES,
                f"{path}: {hw[1]}x{hw[0]} pixels, the sequence's first image is {first_hw[1]}x{first_hw[0]}",
            )
        assert out_hw is not None
        if hw != out_hw:
            shrink = out_hw[0] * out_hw[1] < hw[0] * hw[1]
            rgb = cv2.resize(rgb, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        yield np.ascontiguousarray(rgb)


def convert_sequence(path: str, rel: str, options: ClipOptions) -> InputResult:
    """One image-sequence folder -> clips (see the module docstring); errors are returned, never raised."""
    result = InputResult(rel=rel)
    fps = options.fps if options.fps is not None else DEFAULT_SEQUENCE_FPS
    try:
        images = sequence_images(path)
        names = [p.name for p in images]
        no_cuts = dataclasses.replace(options, scene_detector="none")  # renders and frame dumps have no cuts

        def extra_of(first: int, length: int) -> dict[str, Any]:
            return {"images": names[first : first + length]}

        _cut_score_encode(result, rel, no_cuts, fps, iter_sequence_frames(images, options.max_side),
                          lambda i: i / fps, extra_of)  # fmt: skip
    except ImageSequenceError as err:
        result.clips.clear()
        result.error_reason, result.error = err.reason, err.message
    except (OSError, ValueError) as err:
        result.clips.clear()
        result.error_reason, result.error = "unreadable", f"{type(err).__name__}: {err}"
    return result


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


def _run_task(task: tuple[str, str, ClipOptions, Trim | None]) -> InputResult:
    return convert_input(*task)


# ----------------------------------------------------------------------------------------------
# Folder -> shard set (parent process: the only writer)
# ----------------------------------------------------------------------------------------------


def find_inputs(
    src: str | Path,
    exclude: str | Path | None = None,
    image_sequences: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """The inputs under ``src``, sorted: video files, and folders of images as image sequences (``image_sequences``
    True: also; None: only when ``src`` holds no video file; False: never). Raises FileNotFoundError when ``src``
    is not a folder or holds no input (a shard set of 0 clips is no use to anyone)."""
    videos = find_videos(src, exclude=exclude)
    if image_sequences or (image_sequences is None and not videos):
        sequences = find_image_sequences(src, exclude=exclude)
        if sequences and log and not image_sequences:
            log(f"no video files under {src}: taking its {len(sequences)} folder(s) of images as image sequences")
        videos = sorted([*videos, *sequences])
    if not videos:
        images = "" if image_sequences is False else f" and no folder of images ({' '.join(IMAGE_EXTENSIONS)})"
        raise FileNotFoundError(f"{src} holds no video file ({' '.join(VIDEO_EXTENSIONS)}){images}: nothing to convert")
    return videos


def find_videos(src: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Video files under ``src`` (recursive, sorted), by extension (case-insensitive)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist or is not a folder")
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            if excluded is not None and excluded in path.resolve().parents:
                continue
            found.append(path)
    return found


class _State:
    """``convert_state.json``: options, committed shard parts, finished and failed inputs."""

    def __init__(self, out: Path, options: ClipOptions):
        self.path = out / STATE_NAME
        self.identity = options.identity()
        self.parts: list[dict[str, Any]] = []  # {"prefix": str, "shards": [ShardInfo as dict]}
        self.done: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path} is not valid json ({err}); remove it to start over") from err
            if not isinstance(data, dict) or not {"options", "parts", "done"} <= set(data):
                raise ValueError(f"{self.path} is not a vdiff conversion state (needs options, parts, done)")
            if data.get("options") != self.identity:
                old, new = data.get("options", {}), self.identity
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ValueError(
                    f"{out} holds shards made with other options (changed: {changed}); "
                    "rerun with the same options to resume, or use a new --out folder"
                )
            self.parts, self.done, self.failed = data["parts"], data["done"], data.get("failed", {})

    def save(self) -> None:
        data = {"options": self.identity, "parts": self.parts, "done": self.done, "failed": self.failed}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def shards(self) -> list[ShardInfo]:
        return [ShardInfo(**s) for part in self.parts for s in part["shards"]]

    def next_prefix(self) -> str:
        return f"part{len(self.parts):04d}"


def _clean_uncommitted(out: Path, state: _State) -> None:
    """Delete shard files of parts that were never committed (an interrupted run)."""
    committed = {s.path for s in state.shards()}
    for path in out.iterdir():
        if PART_PATTERN.match(path.name) and path.name not in committed:
            path.unlink()


def build_folder_shards(
    src: str | Path,
    out: str | Path,
    options: ClipOptions | None = None,
    workers: int = 1,
    trims: Mapping[str, Trim] | None = None,
    require_trim: bool = False,
    shard_max_count: int = 1000,
    commit_every: int = 50,
    log: Callable[[str], None] | None = None,
    image_sequences: bool | None = None,
    inputs: list[Path] | None = None,
    progress: bool = False,
) -> Report:
    """Convert every video under ``src`` into clip shards in ``out`` (resumable); returns the :class:`Report`.
    ``progress`` shows a bar on stderr (inputs converted of how many, the time left); ``log`` lines then go through
    ``tqdm.write`` to keep it whole.

    ``trims`` maps an input (its path relative to ``src``, with or without extension, or its file
    stem) to a :class:`Trim`; ``require_trim`` reports inputs without one as failed (``no_trim``).
    ``image_sequences``: also take every folder of images as one input video (True), never (False), or only
    when ``src`` holds no video file (None, the default); see the module docstring. A ``src`` without any input
    raises FileNotFoundError (:func:`find_inputs`). ``inputs``: convert these paths under ``src`` instead of
    searching it (how :func:`build_split_shards` gives each split its inputs).
    """
    options = options or ClipOptions()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    videos = find_inputs(src, out, image_sequences, log) if inputs is None else sorted(inputs)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out=str(out), inputs_found=len(videos))
    state = _State(out, options)
    _clean_uncommitted(out, state)

    tasks: list[tuple[str, str, ClipOptions, Trim | None]] = []
    for path in videos:
        rel = path.relative_to(src).as_posix()
        if rel in state.done:
            report.inputs_skipped += 1
            continue
        trim = None
        if trims is not None:
            trim = _find_trim(trims, rel)
            if trim is None and require_trim:
                report.failed.append((rel, "no_trim", "no entry in the trim metadata"))
                state.failed[rel] = {"reason": "no_trim"}
                continue
        tasks.append((str(path), rel, options, trim))

    writer: ShardWriter | None = None
    pending: dict[str, dict[str, Any]] = {}  # inputs written to the open part, not yet committed

    def commit() -> None:
        nonlocal writer
        if writer is not None:
            manifest = writer.close()
            state.parts.append({"prefix": writer.prefix, "shards": [dataclasses.asdict(s) for s in manifest.shards]})
            writer = None
        state.done.update(pending)
        pending.clear()
        state.save()
        _save_manifest(out, state, options)

    def handle(result: InputResult) -> None:
        nonlocal writer
        if result.error is not None:
            report.failed.append((result.rel, result.error_reason or "error", result.error))
            state.failed[result.rel] = {"reason": result.error_reason, "message": result.error}
            if log:
                log(f"FAILED {result.rel}: [{result.error_reason}] {result.error}")
            return
        for clip in result.clips:
            if writer is None:
                writer = ShardWriter(out, prefix=state.next_prefix(), max_count=shard_max_count)
            writer.write_video(clip.key, clip.mp4, clip.meta)
            report.frames_kept += clip.meta.num_frames
        report.clips_kept += len(result.clips)
        report.dropped.update(result.dropped)
        report.inputs_converted += 1
        state.failed.pop(result.rel, None)
        pending[result.rel] = {"clips": len(result.clips), "dropped": dict(result.dropped)}
        if log:
            dropped = ", ".join(f"{k} {v}" for k, v in sorted(result.dropped.items()))
            log(f"{result.rel}: {len(result.clips)} clips" + (f" (dropped {dropped})" if dropped else ""))
        if len(pending) >= commit_every:
            commit()

    bar = tqdm(total=len(tasks), desc=f"converting {src}", unit="input", disable=not progress)
    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                handle(_run_task(task))
                bar.update()
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers, initializer=_worker_init) as pool:
                for result in pool.imap_unordered(_run_task, tasks, chunksize=1):
                    handle(result)
                    bar.update()
    finally:
        bar.close()
        commit()  # also on Ctrl-C: what was written so far is kept and skipped next time
    report.total_clips = sum(s.num_samples for s in state.shards())
    report.seconds = time.perf_counter() - started
    return report


def assign_splits(
    rels: Sequence[str], val_fraction: float, seed: int = 0, recorded: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Split inputs (paths relative to the source folder) into ``train`` and ``val`` **by input**, so that no
    video has clips in both. ``val`` gets ``round(val_fraction * N)`` of the ``N`` inputs (at least 1 and at
    most ``N - 1``), those with the smallest ``sha256(seed, path)``: the split depends on the seed and the paths
    only, not on their order or the machine. ``recorded``: an earlier split (``{"train": [...], "val": [...]}``):
    its inputs keep their split, and the new ones are split so that ``val`` comes as close to the fraction of all
    inputs as it can."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    recorded = {split: list((recorded or {}).get(split, [])) for split in SPLITS}
    known = {rel for split in SPLITS for rel in recorded[split]}
    new = sorted(set(rels) - known)
    total = len(known) + len(new)
    if total < 2:
        raise ValueError(f"a train/val split needs at least 2 inputs (videos or image sequences), found {total}")
    wanted_val = min(max(round(val_fraction * total), 1), total - 1)
    take = min(max(wanted_val - len(recorded["val"]), 0), len(new))
    ranked = sorted(new, key=lambda rel: (hashlib.sha256(f"{seed}\0{rel}".encode()).hexdigest(), rel))
    chosen = set(ranked[:take])
    return {
        "train": sorted([*recorded["train"], *(rel for rel in new if rel not in chosen)]),
        "val": sorted([*recorded["val"], *chosen]),
    }


def build_split_shards(
    src: str | Path,
    out: str | Path,
    val_fraction: float,
    seed: int = 0,
    image_sequences: bool | None = None,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> dict[str, Report]:
    """A held-out split of a folder of videos: ``out/train`` and ``out/val``, each a resumable shard set
    (:func:`build_folder_shards`, which ``kwargs`` go to), the inputs divided by :func:`assign_splits`.

    ``out/split.json`` records the split before anything is converted: a rerun keeps every recorded input in its
    split (videos added to ``src`` since are split by the same rule), and refuses another fraction or seed.
    Returns the report of each split.
    """
    src, out = Path(src), Path(out)
    found = find_inputs(src, out, image_sequences, log)
    by_rel = {path.relative_to(src).as_posix(): path for path in found}
    record = out / SPLIT_NAME
    recorded = None
    if record.exists():
        try:
            data = json.loads(record.read_text())
            recorded = {split: [str(rel) for rel in data[split]] for split in SPLITS}
            previous = (float(data["val_fraction"]), int(data["seed"]))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{record} is not a vdiff split record ({err}); remove it to split anew") from None
        if previous != (float(val_fraction), int(seed)):
            raise ValueError(
                f"{out} was split with --val-fraction {previous[0]:g} --split-seed {previous[1]}; rerun with those "
                "to resume, or use a new --out folder"
            )
    splits = assign_splits(list(by_rel), val_fraction, seed, recorded)
    out.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(record.name + ".tmp")
    partial.write_text(json.dumps({"val_fraction": val_fraction, "seed": seed, **splits}, indent=1))
    os.replace(partial, record)
    if log:
        log(f"split by input: {len(splits['train'])} train, {len(splits['val'])} val (recorded in {record})")
    reports = {}
    for split in SPLITS:
        inputs = [by_rel[rel] for rel in splits[split] if rel in by_rel]
        reports[split] = build_folder_shards(src, out / split, log=log, inputs=inputs, **kwargs)
    return reports


def _find_trim(trims: Mapping[str, Trim], rel: str) -> Trim | None:
    path = Path(rel)
    for name in (rel, path.with_suffix("").as_posix(), path.stem, path.name):
        if name in trims:
            return trims[name]
    return None


def _save_manifest(out: Path, state: _State, options: ClipOptions) -> None:
    extra = {"converter": "vdiff.data.convert.folder", "source": options.source, "options": options.identity()}
    Manifest(shards=state.shards(), extra=extra).save(out)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def add_clip_arguments(parser: argparse.ArgumentParser, fps_default: float | None = None) -> None:
    """Options shared by ``vdiff data shards`` and ``vdiff data opendv``."""
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and convert_state.json")
    parser.add_argument("--clip-frames", type=int, default=32, help="frames per clip (default %(default)s)")
    parser.add_argument(
        "--min-frames",
        type=int,
        default=None,
        help="keep a last, shorter piece of a scene with at least this many frames (default: clip length)",
    )
    parser.add_argument(
        "--fps",
        type=_optional_float,
        default=fps_default,
        help=f"resample videos to this frame rate ('none' keeps the source rate; default {fps_default}); the frame rate of image sequences (default {DEFAULT_SEQUENCE_FPS:g})",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="shrink frames so the longer side is at most this (default: source size)",
    )
    parser.add_argument(
        "--scene-detector",
        choices=SCENE_DETECTORS,
        default="adaptive",
        help="PySceneDetect detector for scene cuts (default adaptive)",
    )
    parser.add_argument(
        "--scene-threshold",
        type=float,
        default=None,
        help="detector threshold (adaptive ratio 3.0 / content score 27.0 by default)",
    )
    parser.add_argument(
        "--min-scene-frames", type=int, default=8, help="no cut closer than this to the previous one (default 8)"
    )
    parser.add_argument(
        "--min-motion", type=_optional_float, default=None, help="drop clips whose motion score is below this (static)"
    )
    parser.add_argument(
        "--max-motion", type=_optional_float, default=None, help="drop clips whose motion score is above this"
    )
    parser.add_argument("--no-motion", action="store_true", help="do not compute the motion score")
    parser.add_argument(
        "--no-curation", action="store_true", help="no scene cuts and no motion score (plain fixed-length clips)"
    )
    parser.add_argument("--crf", type=int, default=DEFAULT_CRF, help=f"x264 quality (default {DEFAULT_CRF})")
    parser.add_argument("--preset", default="medium", help="x264 preset (default medium)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--shard-size", type=int, default=1000, help="clips per shard (default 1000)")
    parser.add_argument(
        "--commit-every", type=int, default=50, help="inputs between resumable checkpoints (default 50)"
    )


def options_from_args(args: argparse.Namespace, source: str) -> ClipOptions:
    curate = not args.no_curation
    return ClipOptions(
        clip_frames=args.clip_frames,
        min_frames=args.min_frames,
        fps=args.fps,
        max_side=args.max_side,
        scene_detector=args.scene_detector if curate else "none",
        scene_threshold=args.scene_threshold,
        min_scene_frames=args.min_scene_frames,
        motion=curate and not args.no_motion,
        min_motion=args.min_motion if curate else None,
        max_motion=args.max_motion if curate else None,
        crf=args.crf,
        preset=args.preset,
        source=source,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="folder of videos (searched recursively: mp4 mov mkv webm avi) or of image "
        "sequences (one folder of png/jpg/webp frames per video)",
    )
    add_clip_arguments(parser)
    parser.add_argument("--source", default="folder", help="name stored as each sample's source (default 'folder')")
    parser.add_argument(
        "--image-sequences",
        action="store_true",
        default=None,
        help="also take every folder of image files as one video (its frames in natural name order, "
        f"at --fps, default {DEFAULT_SEQUENCE_FPS:g}; no scene cuts); without it, image folders are "
        "taken only when SRC holds no video file",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="hold out this fraction of the input videos (whole videos: none has clips in both sets): "
        f"OUT/train and OUT/val, the split recorded in OUT/{SPLIT_NAME} (default: no split, shards in OUT)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="which videos --val-fraction holds out (default %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args, args.source)
    settings = dict(options=options, workers=args.workers, shard_max_count=args.shard_size,
                    commit_every=args.commit_every, log=lambda line: print(line, file=sys.stderr),
                    image_sequences=getattr(args, "image_sequences", None))  # fmt: skip
    if args.val_fraction is None:
        print(build_folder_shards(args.src, args.out, **settings).summary())
        return 0
    reports = build_split_shards(args.src, args.out, args.val_fraction, args.split_seed, **settings)
    print("\n".join(report.summary() for report in reports.values()))
    return 0
