"""Tiny shard sets for the data-module tests, written with the real ShardWriter and libx264.

Frames carry their own coordinates so tests can tell where a crop came from: red = 4 * x and
green = 4 * y of the source pixel (sources up to 64 pixels), blue = 8 * frame index (mod 256).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vdiff.data.schema import VideoMeta
from vdiff.data.shards import ShardWriter, dump_json
from vdiff.data.video_io import encode_video

FPS = 10.0


def coordinate_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """``(T, H, W, 3)`` uint8: R = 4x, G = 4y, B = 8t (mod 256)."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    frames = np.stack([4 * x, 4 * y, (8 * t) % 256], axis=-1)
    return frames.astype(np.uint8)


def driving_actions(num_frames: int, seed: int) -> dict[str, list]:
    """Per-frame actions with every key of the schema (values distinct per video and frame)."""
    rng = np.random.default_rng(seed)
    return {
        "speed": [float(v) for v in rng.uniform(0, 20, num_frames)],
        "yaw_rate": [float(v) for v in rng.uniform(-0.5, 0.5, num_frames)],
        "steering": [float(v) for v in rng.uniform(-90, 90, num_frames)],
        "command": [int(v) for v in rng.integers(0, 4, num_frames)],
        "trajectory": [rng.uniform(-5, 5, (4, 2)).tolist() for _ in range(num_frames)],
        "goal": [rng.uniform(0.1, 0.9, 2).tolist() for _ in range(num_frames)],
    }


def write_videos(
    out_dir: Path,
    num_videos: int,
    num_frames: int = 12,
    height: int = 32,
    width: int = 32,
    per_shard: int = 4,
    source: str = "synth",
    actions: bool = True,
    key_prefix: str = "v",
) -> list[str]:
    """Write ``num_videos`` coordinate videos into shards under ``out_dir``; returns their keys."""
    frames = coordinate_frames(num_frames, height, width)
    mp4 = encode_video(frames, FPS, preset="ultrafast")
    keys = []
    with ShardWriter(out_dir, max_count=per_shard) as writer:
        for i in range(num_videos):
            key = f"{key_prefix}{i:04d}"
            meta = VideoMeta(
                fps=FPS,
                width=width,
                height=height,
                num_frames=num_frames,
                source=source,
                actions=driving_actions(num_frames, seed=i) if actions else {},
            )
            writer.write_video(key, mp4, meta)
            keys.append(key)
    return keys


def write_corrupt_corpus(out_dir: Path, num_good: int = 6) -> tuple[list[str], dict[str, int]]:
    """Good coordinate videos interleaved with one sample of every kind of bad input.

    Returns the good keys and the skips expected by reason, for clips of 8 frames at stride 1.
    """
    good_frames = coordinate_frames(12, 32, 32)
    good_mp4 = encode_video(good_frames, FPS, preset="ultrafast")
    good_json = VideoMeta(fps=FPS, width=32, height=32, num_frames=12, source="synth").to_json().encode()
    short_mp4 = encode_video(good_frames[:4], FPS, preset="ultrafast")
    short_json = VideoMeta(fps=FPS, width=32, height=32, num_frames=4, source="synth").to_json().encode()
    odd_mp4 = encode_video(coordinate_frames(12, 32, 33), FPS, preset="ultrafast", pix_fmt="yuv444p")
    odd_json = VideoMeta(fps=FPS, width=33, height=32, num_frames=12, source="synth").to_json().encode()
    lying_json = VideoMeta(fps=FPS, width=32, height=32, num_frames=40, source="synth").to_json().encode()
    bad_samples = {
        "zero_byte": ({"mp4": b"", "json": good_json}, "empty"),
        "truncated": ({"mp4": good_mp4[: len(good_mp4) // 2], "json": good_json}, "corrupt"),
        "not_video": ({"mp4": b"this is not a video file at all\n" * 40, "json": good_json}, "corrupt"),
        "no_json": ({"mp4": good_mp4}, "missing_json"),
        "bad_json": ({"mp4": good_mp4, "json": b"{\"fps\": 10, \"width\": "}, "bad_json"),
        "wrong_schema": ({"mp4": good_mp4, "json": dump_json({"fps": -1, "width": 32, "height": 32,
                                                             "num_frames": 12, "source": "x"})}, "bad_json"),
        "too_short": ({"mp4": short_mp4, "json": short_json}, "too_short"),
        "lying_length": ({"mp4": short_mp4, "json": lying_json}, "too_short"),
        "odd_size": ({"mp4": odd_mp4, "json": odd_json}, "odd_size"),
    }
    expected: dict[str, int] = {}
    good_keys = []
    with ShardWriter(out_dir, max_count=3) as writer:
        bad = list(bad_samples.items())
        for i in range(max(num_good, len(bad))):
            if i < num_good:
                key = f"good{i:03d}"
                writer.write_video(key, good_mp4, VideoMeta.from_json(good_json))
                good_keys.append(key)
            if i < len(bad):
                key, (files, reason) = bad[i]
                writer.write_raw(key, files)
                expected[reason] = expected.get(reason, 0) + 1
    return good_keys, expected


@pytest.fixture(scope="session")
def video_shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """24 videos with actions in 6 shards of 4 (12 frames, 32x32, 10 fps)."""
    out = tmp_path_factory.mktemp("video_shards")
    return out, write_videos(out, 24, per_shard=4, source="drive", actions=True)


@pytest.fixture(scope="session")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two sources: ``actions`` (with actions) and ``youtube`` (without), 8 videos each, 4 frames."""
    root = tmp_path_factory.mktemp("two_sources")
    write_videos(root / "actions", 8, num_frames=4, per_shard=4, source="nuscenes", actions=True, key_prefix="a")
    write_videos(root / "youtube", 8, num_frames=4, per_shard=4, source="youtube", actions=False, key_prefix="y")
    return root / "actions", root / "youtube"


@pytest.fixture(scope="session")
def corrupt_corpus(tmp_path_factory) -> tuple[Path, list[str], dict[str, int]]:
    out = tmp_path_factory.mktemp("corrupt")
    good, expected = write_corrupt_corpus(out)
    return out, good, expected
