"""``vdiff data cityscapes ROOT --out DIR --split train|val|test``: Cityscapes sequences -> 30-frame clips.

Input layout (the ``leftImg8bit_sequence_trainvaltest`` and ``vehicle_sequence`` downloads unpacked
into ROOT)::

    ROOT/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/vehicle_sequence/<split>/<city>/<city>_<seq>_<frame>_vehicle.json     (optional)

Frames of one ``<city>_<seq>`` with consecutive frame numbers form a snippet (30 frames at 17 Hz
around each annotated frame); each snippet becomes ``clip_frames`` (30) frame clips at ``size``
(128x128 for the MCVD/VDT protocol). ``resize="squash"`` scales the 2048x1024 frame to the size
ignoring the aspect ratio (what MCVD's Cityscapes loader and the published numbers use); ``"crop"``
takes the centred crop of the output's aspect ratio first. Output: ``DIR/<split>/`` shards with
``manifest.json``; samples have ``source = "cityscapes"``, ``fps = 17``.

Actions: ``speed`` (m/s) and ``yaw_rate`` (rad/s) per frame from the vehicle json fields ``speed``
and ``yawRate`` where the file exists (``null`` for a frame without one; keys absent when no frame of
the clip has one). cityscapesScripts does not document these units; m/s and rad/s are how the
field values are used by Cityscapes odometry code (``speed * dt`` metres, ``yawRate * dt`` radians),
and the sign is taken as + = left (counter-clockwise). Other actions are absent (invalid).
A snippet with an unreadable image is reported and skipped.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vdiff.data.convert import DatasetReport, parallel_map
from vdiff.data.convert.frames import RESIZE_MODES, read_image, resize_image
from vdiff.data.frame_size import add_size_argument
from vdiff.data.schema import FLOAT32_MAX, SchemaError, VideoMeta, is_finite_number, parse_json
from vdiff.data.shards import ShardWriter
from vdiff.data.video_io import DEFAULT_CRF, encode_video

CITYSCAPES_FPS = 17.0
CITYSCAPES_SPLITS = ("train", "val", "test")
SNIPPET_FRAMES = 30
_IMAGE_NAME = re.compile(r"^(?P<city>[a-z_]+?)_(?P<seq>\d{6})_(?P<frame>\d{6})_leftImg8bit\.png$")


def find_snippets(root: str | Path, split: str, clip_frames: int = SNIPPET_FRAMES) -> tuple[list[list[Path]], int]:
    """Runs of ``clip_frames`` consecutive frames, grouped by city and sequence; second output: runs too short."""
    folder = Path(root) / "leftImg8bit_sequence" / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: ROOT must hold leftImg8bit_sequence/<split>/<city>/ (Cityscapes sequence download)"
        )
    groups: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
    for path in folder.glob("*/*_leftImg8bit.png"):
        match = _IMAGE_NAME.match(path.name)
        if match:
            groups[(match["city"], match["seq"])][int(match["frame"])] = path
    clips: list[list[Path]] = []
    too_short = 0
    for key in sorted(groups):
        frames = groups[key]
        numbers = sorted(frames)
        run = [numbers[0]]
        runs = []
        for n in numbers[1:]:
            if n == run[-1] + 1:
                run.append(n)
            else:
                runs.append(run)
                run = [n]
        runs.append(run)
        for run in runs:
            if len(run) < clip_frames:
                too_short += 1
                continue
            for i in range(0, len(run) - clip_frames + 1, clip_frames):
                clips.append([frames[n] for n in run[i : i + clip_frames]])
    return clips, too_short


def vehicle_path(root: Path, split: str, image: Path) -> Path:
    name = image.name.replace("_leftImg8bit.png", "_vehicle.json")
    return root / "vehicle_sequence" / split / image.parent.name / name


def read_vehicle(path: Path) -> tuple[float | None, float | None]:
    """``(speed m/s, yaw rate rad/s)`` from a Cityscapes vehicle json; ``None`` where missing or not a number."""
    if not path.is_file():
        return None, None
    try:
        data = parse_json(path.read_bytes(), str(path))
    except (SchemaError, OSError):
        return None, None

    def number(name: str) -> float | None:
        value = data.get(name) if isinstance(data, dict) else None
        return float(value) if is_finite_number(value) and abs(value) <= FLOAT32_MAX else None

    return number("speed"), number("yawRate")


def _clip_actions(root: Path, split: str, images: list[Path]) -> dict[str, list[Any]]:
    speeds, yaw_rates = zip(*(read_vehicle(vehicle_path(root, split, p)) for p in images))
    actions: dict[str, list[Any]] = {}
    if any(v is not None for v in speeds):
        actions["speed"] = list(speeds)
    if any(v is not None for v in yaw_rates):
        actions["yaw_rate"] = list(yaw_rates)
    return actions


def _convert_clip(task: tuple[str, str, list[str], tuple[int, int], str, int]) -> tuple[str, bytes | None, dict | str]:
    """Worker: read, resize and encode one clip; returns (key, mp4, meta dict) or (key, None, error)."""
    root_s, split, image_paths, size, resize, crf = task
    root, images = Path(root_s), [Path(p) for p in image_paths]
    match = _IMAGE_NAME.match(images[0].name)
    assert match is not None
    key = f"{match['city']}_{match['seq']}_{match['frame']}"
    try:
        frames = np.stack([resize_image(read_image(p), size, resize) for p in images])
    except ValueError as err:
        return key, None, str(err)
    meta = VideoMeta(
        fps=CITYSCAPES_FPS,
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        num_frames=len(images),
        source="cityscapes",
        actions=_clip_actions(root, split, images),
        extra={"city": match["city"], "sequence": match["seq"], "first_frame": int(match["frame"]), "split": split, "resize": resize},
    )
    return key, encode_video(frames, CITYSCAPES_FPS, crf=crf), meta.to_json()


def convert_cityscapes(
    root: str | Path,
    out: str | Path,
    split: str = "train",
    size: tuple[int, int] = (128, 128),
    resize: str = "squash",
    clip_frames: int = SNIPPET_FRAMES,
    workers: int = 1,
    crf: int = DEFAULT_CRF,
    shard_max_count: int = 1000,
    progress: bool = False,
) -> DatasetReport:
    """Convert one split into ``out/<split>/`` shards; returns the :class:`DatasetReport`. ``progress`` shows a bar
    on stderr (clips converted, the time left)."""
    if split not in CITYSCAPES_SPLITS:
        raise ValueError(f"split must be one of {CITYSCAPES_SPLITS}, got {split!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"size must be even (H.264 yuv420p), got {size}")
    started = time.perf_counter()
    root = Path(root)
    clips, too_short = find_snippets(root, split, clip_frames)
    target = Path(out) / split
    report = DatasetReport(out=str(target), split=split)
    if too_short:
        report.dropped["too_short"] += too_short
    tasks = [(str(root), split, [str(p) for p in clip], tuple(size), resize, crf) for clip in clips]
    extra = {"converter": "vdiff.data.convert.cityscapes", "split": split, "size": list(size), "resize": resize}
    with ShardWriter(target, max_count=shard_max_count, extra=extra) as writer:
        bar = f"cityscapes {split}" if progress else None
        for key, mp4, meta in parallel_map(_convert_clip, tasks, workers, progress=bar, unit="clip"):
            if mp4 is None:
                report.failed.append((key, "unreadable", str(meta)))
                continue
            parsed = VideoMeta.from_json(meta)
            writer.write_video(key, mp4, parsed)
            report.clips_kept += 1
            report.frames_kept += parsed.num_frames
    report.seconds = time.perf_counter() - started
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="Cityscapes root holding leftImg8bit_sequence/ (and vehicle_sequence/)")
    parser.add_argument("--out", required=True, help="output folder; shards go to OUT/<split>/")
    parser.add_argument("--split", choices=CITYSCAPES_SPLITS, nargs="+", default=["train", "val"], help="splits (default train val)")
    add_size_argument(parser, 128, "output frame size (default 128)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="squash", help="squash (benchmark protocol) or centre crop (default squash)")
    parser.add_argument("--clip-frames", type=int, default=SNIPPET_FRAMES, help="frames per clip (default 30)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--crf", type=int, default=DEFAULT_CRF, help=f"x264 quality (default {DEFAULT_CRF})")


def run(args: argparse.Namespace) -> int:
    for split in args.split:
        report = convert_cityscapes(
            args.root, args.out, split, tuple(args.size), args.resize, args.clip_frames, args.workers, args.crf,
            progress=True,
        )
        print(report.summary(), file=sys.stdout)
    return 0
