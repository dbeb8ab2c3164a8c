"""Generated footage for the converter tests: smooth moving textures and frames that carry their index.

Frame content is chosen so a test can tell which source frame an output frame came from without
relying on the converter: :func:`indexed_texture` adds ``level_step * index`` to the whole frame,
so the mean brightness of a decoded frame names its source frame.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vdiff.data.schema import Manifest, VideoMeta
from vdiff.data.shards import iter_raw_samples
from vdiff.data.video_io import decode_all


def smooth_texture(seed: int, height: int, width: int, variant: int = 0) -> np.ndarray:
    """A low-frequency, mid-saturation colour texture ``(height, width, 3)`` uint8 (bicubic upsampling
    of coarse noise); ``variant`` 1 inverts it, 2 rotates its channels (clearly different scenes)."""
    rng = np.random.default_rng(seed)
    cells = max(2, width // 12)
    small = rng.integers(50, 206, (4, cells, 3)).astype(np.float32)
    big = np.clip(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    if variant == 1:
        big = 255 - big
    elif variant == 2:
        big = np.roll(big, 1, axis=-1)
    return np.ascontiguousarray(big)


def moving_video(seed: int, num_frames: int, height: int = 48, width: int = 64, shift: int = 1, variant: int = 0) -> np.ndarray:
    """A texture translating ``shift`` pixels per frame to the left: ``(T, H, W, 3)`` uint8."""
    canvas = smooth_texture(seed, height, width + shift * num_frames + 1, variant)
    return np.stack([canvas[:, i * shift : i * shift + width] for i in range(num_frames)])


def indexed_video(num_frames: int, height: int = 32, width: int = 48, level_step: int = 4, base: int = 8) -> np.ndarray:
    """Frames whose brightness encodes their index: every pixel of frame k is about ``base + level_step * k``."""
    texture = smooth_texture(7, height, width).astype(np.float64)
    texture = np.round((texture - texture.mean()) / 16).astype(np.int32)  # small texture, mean about 0
    levels = base + level_step * np.arange(num_frames)
    frames = texture[None] + levels[:, None, None, None]
    assert frames.max() <= 255, "too many frames for this level_step"
    return frames.astype(np.uint8)


def frame_index_from_level(frame: np.ndarray, level_step: int = 4, base: int = 8) -> int:
    """Inverse of :func:`indexed_video`."""
    return int(round((float(frame.mean()) - base) / level_step))


def read_shard_set(folder: str | Path) -> dict[str, tuple[np.ndarray, VideoMeta]]:
    """Every sample of a shard set (through its manifest): ``{key: (frames (T, H, W, 3), meta)}``."""
    folder = Path(folder)
    samples = {}
    for tar in Manifest.load(folder).shard_paths(folder):
        for key, files in iter_raw_samples(tar):
            assert key not in samples, f"duplicate key {key}"
            samples[key] = (decode_all(files["mp4"]), VideoMeta.from_json(files["json"]))
    return samples
