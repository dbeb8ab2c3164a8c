"""Throughput of ``vdiff data shards``: input videos per minute with 1 and 2 workers, with and without curation.

    python benchmarks/shards.py            # 8 inputs of 6 s at 30 fps, 320x180; about a minute on 2 cores
    python benchmarks/shards.py --quick    # 4 inputs of 3 s

Inputs are generated: each is two moving textures spliced at its middle (one scene cut), H.264 at
30 fps. Every configuration converts all inputs from scratch into a fresh folder, resampling to
10 fps, 10-frame clips, frames at their source size. "curation" is the default pipeline (adaptive
scene-cut detection + Farneback motion score with a min-motion filter); "plain" is ``--no-curation``
(fixed-length clips only). Wall-clock and CPU time (this process and its workers) are reported;
ratios are against 1 worker without curation. On a machine shared with other jobs, wall-clock
ratios between worker counts are only as good as the cores that were free; CPU time per video is
the steadier figure for the cost of curation.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from vdiff.data.convert.folder import ClipOptions, build_folder_shards
from vdiff.data.video_io import encode_video


def moving_texture(seed: int, frames: int, height: int, width: int, shift: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 226, (6, 10, 3)).astype(np.float32)
    canvas = cv2.resize(small, (width + shift * frames + 1, height), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(canvas + rng.normal(0, 6, canvas.shape), 0, 255).astype(np.uint8)  # some fine detail
    return np.stack([canvas[:, i * shift : i * shift + width] for i in range(frames)])


def make_inputs(folder: Path, count: int, seconds: float, height: int, width: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    half = int(seconds * 30) // 2
    for i in range(count):
        video = np.concatenate(
            [moving_texture(2 * i, half, height, width, 2), 255 - moving_texture(2 * i + 1, half, height, width, 3)]
        )
        (folder / f"input_{i:03d}.mp4").write_bytes(encode_video(video, 30.0))


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 inputs of 3 s")
    parser.add_argument("--inputs", type=int, default=None, help="number of input videos (default 8, quick 4)")
    parser.add_argument("--seconds", type=float, default=None, help="length of each input (default 6, quick 3)")
    parser.add_argument("--size", type=int, nargs=2, default=[180, 320], metavar=("H", "W"))
    args = parser.parse_args()
    count = args.inputs or (4 if args.quick else 8)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root / "src", count, seconds, *args.size)
        configs = [
            ("plain", 1, ClipOptions(clip_frames=10, fps=10.0, scene_detector="none", motion=False)),
            ("plain", 2, ClipOptions(clip_frames=10, fps=10.0, scene_detector="none", motion=False)),
            ("curation", 1, ClipOptions(clip_frames=10, fps=10.0, min_motion=0.5)),
            ("curation", 2, ClipOptions(clip_frames=10, fps=10.0, min_motion=0.5)),
        ]
        rows = []
        for number, (name, workers, options) in enumerate(configs):
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            report = build_folder_shards(root / "src", root / f"out{number}", options, workers=workers)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            assert not report.failed, report.summary()
            rows.append((name, workers, wall, cpu, report.clips_kept, sum(report.dropped.values())))
    base_wall, base_cpu = rows[0][2], rows[0][3]
    print(f"vdiff data shards: {count} inputs x {seconds:g} s at 30 fps, {args.size[1]}x{args.size[0]} -> 10 fps, 10-frame clips")
    print(f"{'pipeline':<10}{'workers':>8}{'videos/min':>12}{'wall s':>9}{'CPU s/video':>13}{'clips':>7}{'dropped':>9}{'speed vs plain-1':>18}{'CPU vs plain-1':>16}")
    for name, workers, wall, cpu, clips, dropped in rows:
        print(
            f"{name:<10}{workers:>8}{count / wall * 60:>12.1f}{wall:>9.2f}{cpu / count:>13.3f}{clips:>7}{dropped:>9}"
            f"{base_wall / wall:>18.2f}{cpu / base_cpu:>16.2f}"
        )


if __name__ == "__main__":
    main()
