"""One raw sample -> one clip: parsing a sample's json, choosing clip frames, decoding and cropping them.

A raw sample is ``key`` plus ``{extension: bytes}`` as read from a shard (:func:`vdiff.data.shards.iter_raw_samples`).
Whatever is wrong with a sample raises :class:`Skip` with a reason (the columns of the skip counts,
:mod:`vdiff.data.skips`) and a message naming the shard and the key; streams count it and move on.

The pieces are shared by every kind of sample (video shards here, latent shards in
:mod:`vdiff.data.latent_datamodule`): :func:`parse_meta`, :func:`last_clip_start` (or ``too_short``),
:func:`clip_indices`, :func:`clip_actions_of` (or ``bad_json``) and :func:`clip_item` (the fields every
clip item has); :func:`decode_clip` is the video-specific step (decode, crop, flip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vdiff.data import batch as B
from vdiff.data.schema import META_EXT, VIDEO_EXT, SampleType, SchemaError, VideoMeta, motion_score_of
from vdiff.data.transforms import (
    CropPlan,
    clip_actions,
    cover_size,
    crop_frames,
    flip_actions,
    move_goal,
    plan_crop,
)
from vdiff.data.video_io import TOO_SHORT, VideoDecodeError, clip_frame_indices, decode_frames, max_clip_start

# Why a sample was skipped (besides the decoder's reasons, vdiff.data.video_io.DECODE_ERROR_REASONS).
MISSING_VIDEO = "missing_video"  # the sample has no <key>.mp4
MISSING_JSON = "missing_json"  # the sample has no <key>.json
BAD_JSON = "bad_json"  # json unparsable or not following the schema (SchemaError)
TOO_SMALL = "too_small"  # frames smaller than the crop and resize=False


class Skip(Exception):
    """Raised by a stream's raw sample -> clip step (:meth:`TrainClipStream.train_clip`,
    :meth:`EvalClipStream.eval_clips`): the sample is dropped and counted under ``reason``."""

    def __init__(self, reason: str, message: str, count: int = 1):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.count = count


@dataclass(frozen=True)
class ClipSpec:
    """What clip to cut: frames, sampling (stride or target fps), output size and crop."""

    num_frames: int
    frame_stride: int | None
    target_fps: float | None
    out_hw: tuple[int, int]
    resize: bool
    decode_threads: int


def parse_meta(
    key: str, files: dict[str, bytes], where: str, sample_type: SampleType = SampleType.VIDEO, hint: str = ""
) -> VideoMeta:
    """The json of raw sample ``key`` (read from ``where``), which must be a ``sample_type`` sample.

    Raises :class:`Skip` (``missing_json``, or ``bad_json`` with ``hint`` appended when the type is wrong).
    """
    if META_EXT not in files:
        raise Skip(MISSING_JSON, f"{where}: sample {key!r} has no .{META_EXT} (files: {sorted(files)})")
    try:
        meta = VideoMeta.from_json(files[META_EXT])
    except SchemaError as err:
        raise Skip(BAD_JSON, f"{where}: sample {key!r}: {err}") from None
    if meta.sample_type != sample_type.value:
        raise Skip(
            BAD_JSON,
            f"{where}: sample {key!r} is a {meta.sample_type!r} sample, not a {sample_type.value} sample{hint}",
        )
    return meta


def parse_video_meta(key: str, files: dict[str, bytes], where: str) -> VideoMeta:
    """The json of a video sample, which must also have its ``.mp4`` (else ``missing_video``)."""
    if VIDEO_EXT not in files:
        raise Skip(MISSING_VIDEO, f"{where}: sample {key!r} has no .{VIDEO_EXT} (files: {sorted(files)})")
    return parse_meta(key, files, where)


def last_clip_start(key: str, num_frames: int, fps: float, spec: ClipSpec, where: str, unit: str = "frames") -> int:
    """The last frame a clip of ``spec`` can start at in a sample of ``num_frames`` ``unit`` at ``fps``;
    raises :class:`Skip` (``too_short``) when no clip fits."""
    last = max_clip_start(num_frames, fps, spec.num_frames, spec.frame_stride, spec.target_fps)
    if last < 0:
        raise Skip(
            TOO_SHORT,
            f"{where}: sample {key!r} has {num_frames} {unit} at {fps:g} fps, too few for a clip of "
            f"{spec.num_frames} {unit} (stride {spec.frame_stride}, target fps {spec.target_fps})",
        )
    return last


def clip_indices(num_frames: int, fps: float, spec: ClipSpec, start: int) -> list[int]:
    """Indices of the frames of the clip of ``spec`` starting at frame ``start``."""
    return clip_frame_indices(num_frames, fps, spec.num_frames, start, spec.frame_stride, spec.target_fps)


def clip_actions_of(meta: VideoMeta, indices: list[int], key: str, where: str) -> dict[str, np.ndarray]:
    """The sample's actions at video frames ``indices`` (with ``<key>_valid`` masks); ``bad_json``
    when they do not follow the schema."""
    try:
        return clip_actions(meta.actions, indices)
    except SchemaError as err:
        raise Skip(BAD_JSON, f"{where}: sample {key!r}: {err}") from None


def clip_fps(spec: ClipSpec, fps: float) -> float:
    """Frame rate of a clip of ``spec`` cut from frames at ``fps``."""
    return float(spec.target_fps if spec.target_fps is not None else fps / (spec.frame_stride or 1))


def clip_item(
    key: str, meta: VideoMeta, indices: list[int], actions: dict[str, np.ndarray], fps: float, source: str | None
) -> dict[str, Any]:
    """The fields every clip item has: ``fps`` (of the clip), ``motion_score`` (the json's, NaN when unknown),
    ``frame_indices``, ``key``, ``source`` (``source`` or the json's) and ``actions``."""
    return {
        "fps": fps,
        "motion_score": motion_score_of(meta.extra),
        "frame_indices": np.asarray(indices, dtype=np.int64),
        "key": key,
        "source": source if source is not None else meta.source,
        "actions": actions,
    }


def decode_clip(
    key: str,
    files: dict[str, bytes],
    meta: VideoMeta,
    start: int,
    spec: ClipSpec,
    crop: str,
    generator: np.random.Generator | None,
    flip: bool,
    source: str | None,
    where: str,
) -> dict[str, Any]:
    """Decode one clip of a video sample and build its item (see :func:`vdiff.data.transforms.collate_clips`)."""
    indices = clip_indices(meta.num_frames, meta.fps, spec, start)
    actions = clip_actions_of(meta, indices, key, where)
    decode_hw = cover_size((meta.height, meta.width), spec.out_hw) if spec.resize else None
    try:
        frames = decode_frames(files[VIDEO_EXT], indices, size=decode_hw, thread_count=spec.decode_threads)
    except VideoDecodeError as err:
        raise Skip(err.reason, f"{where}: sample {key!r}: {err}") from None
    frame_hw = frames.shape[1:3]
    if frame_hw[0] < spec.out_hw[0] or frame_hw[1] < spec.out_hw[1]:
        raise Skip(
            TOO_SMALL,
            f"{where}: sample {key!r} has {frame_hw[0]}x{frame_hw[1]} frames, smaller than "
            f"the crop {spec.out_hw[0]}x{spec.out_hw[1]} (set resize=True to scale it up)",
        )
    plan: CropPlan = plan_crop(frame_hw, spec.out_hw, crop, generator, flip)
    actions["goal"], actions[B.valid_key("goal")] = move_goal(actions["goal"], actions[B.valid_key("goal")], plan)
    if flip:
        flip_actions(actions)
    return {
        "video": crop_frames(frames, plan),
        "flip": flip,
        **clip_item(key, meta, indices, actions, clip_fps(spec, meta.fps), source),
    }
