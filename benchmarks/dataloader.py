"""Data-loading throughput: vdiff's VideoDataModule beside raw PyAV, measured in one run.

    python benchmarks/dataloader.py           # 32 source videos, about 2.5 minutes on 2 busy cores
    python benchmarks/dataloader.py --quick   # 8 source videos, about 2 minutes (start-up dominates)

Writes 256x256 source videos (procedural moving texture, H.264 at vdiff's default CRF) into shards,
then measures clips/s and frames/s of the datamodule's train loader (16-frame clips resized to
128x128) at ``num_workers`` 0, 1 and 2. The raw limit is PyAV decoding exactly the same frames
(the keys and frame indices the num_workers=0 loader delivered) from the same mp4 bytes in a tight
loop: open, seek to the keyframe before the clip, decode, convert the wanted frames to 128x128 RGB.
The ratio loader / raw at num_workers=0 is the number to watch (target >= 0.9). It is also given
on CPU time, which other processes on a shared machine do not disturb.

Peak RSS per worker (VmHWM of each DataLoader worker process) is measured in a fresh process for
a shard set of small shards and one of large shards; it must not grow with shard size, since
samples stream from the tar one at a time.

``--workers 1 4 8`` sets the worker counts measured (default 0 1 2; the num_workers=0 row is always
measured, it is the one compared with raw PyAV). On a machine with fewer cores than workers the extra
workers only compete for the same cores.

``--latents`` measures latent-shard training instead (what ``vdiff encode`` writes and
``LatentDataModule`` reads), at the VDT Cityscapes setup: 30-frame samples of 4x16x16 latents (fp16
posterior mean and std, 128x128 first-frame PNG), 16-frame training clips, batch 8. It reports samples/s per
worker count beside what a VDT-L/2 training step consumes (``--step-ms`` per ``--step-batch`` clips; default
157 ms per 8 clips: vdiff's VDT-L/2 bf16 step on an H200, measured 2026-11-29, 151-163 ms), i.e. how many
times over the loader could feed that GPU (target >= 10x).

No model runs here, so there are no FLOPs or MFU: the figure that matters for an accelerator is the
loader's samples/s against the step's consumption. ``--json PATH`` writes the figures as JSON.

    python benchmarks/dataloader.py --latents --workers 0 1 2
    python benchmarks/dataloader.py --workers 1 4 8 --json dataloader.json      # GPU machine (benchmarks/gpu_suite.sh)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av  # the raw baseline uses PyAV directly, on purpose
import numpy as np
import psutil
import torch

from vdiff.data.schema import VideoMeta
from vdiff.data.shards import ShardWriter, expand_shard_spec, iter_raw_samples
from vdiff.data.video_io import encode_video

SOURCE_SIZE = 256
CLIP_FRAMES = 16
CLIP_SIZE = 128
FPS = 10


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def source_video(seed: int, num_frames: int, size: int = SOURCE_SIZE) -> np.ndarray:
    """``(T, size, size, 3)`` uint8: a textured ground scrolling toward the viewer plus moving boxes.

    Real texture (not flat colour) so that decoding costs what camera video costs.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 200, (size, size // 2, 3)).astype(np.float32)
    texture = np.repeat(np.repeat(coarse, 2, 0), 2, 1)  # (2 * size, size, 3)
    for axis in (0, 1):  # soften to camera-like texture: still costly to code, unlike flat colour
        texture = (texture + np.roll(texture, 1, axis) + np.roll(texture, -1, axis)) / 3
    texture = texture.astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    sky = np.stack([100 + 80 * yy / size, 150 + 50 * yy / size, 230 - 20 * xx / size], -1).astype(np.uint8)
    boxes = rng.integers(0, size - 32, (3, 2))
    velocity = rng.integers(-4, 5, (3, 2))
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        frame = frames[t]
        offset = (3 * t) % size
        frame[:] = texture[size - offset : 2 * size - offset]
        frame[: size // 3] = sky[: size // 3]
        for (y, x), (vy, vx) in zip(boxes, velocity):
            y0, x0 = (y + vy * t) % (size - 32), (x + vx * t) % (size - 32)
            frame[y0 : y0 + 24, x0 : x0 + 32] = (220, 40, 40)
    return frames


def write_shards(folder: Path, videos: list[bytes], num_frames: int, copies: int, per_shard: int) -> str:
    """Shard set holding every video ``copies`` times (distinct keys); returns the folder."""
    with ShardWriter(folder, max_count=per_shard) as writer:
        for copy in range(copies):
            for v, mp4 in enumerate(videos):
                meta = VideoMeta(fps=FPS, width=SOURCE_SIZE, height=SOURCE_SIZE, num_frames=num_frames, source="bench")
                writer.write_video(f"v{v:04d}c{copy:04d}", mp4, meta)
    return str(folder)


def load_bytes(spec: str) -> dict[str, bytes]:
    return {key: files["mp4"] for shard in expand_shard_spec(spec) for key, files in iter_raw_samples(shard)}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def make_loader(spec: str, num_workers: int, batch_size: int, num_batches: int):
    """The datamodule's train loader over ``spec``, long enough for ``num_batches`` (+ warm-up)."""
    from vdiff.data.datamodule import VideoDataModule

    dm = VideoDataModule(
        train=spec,
        num_frames=CLIP_FRAMES,
        size=CLIP_SIZE,
        batch_size=batch_size,
        num_workers=num_workers,
        epoch_length=num_batches + 2 * max(1, num_workers) + 2,
    )
    if hasattr(dm, "setup"):
        dm.setup("fit")
    return dm.train_dataloader()


def loader_throughput(spec: str, num_workers: int, batch_size: int, num_batches: int) -> dict:
    """Clips/s through the train loader after warm-up, and the (key, frame indices) it delivered."""
    loader = make_loader(spec, num_workers, batch_size, num_batches)
    iterator = iter(loader)
    for _ in range(max(1, 2 * num_workers)):  # worker start-up and first shard opens are not throughput
        next(iterator)
    clips: list[tuple[str, list[int]]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(iterator)
        for key, indices in zip(batch["key"], batch["frame_indices"].tolist()):
            clips.append((key, indices))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shape = tuple(batch["video"].shape[1:])
    del iterator
    return {"clips": clips, "wall": wall, "cpu": cpu, "shape": shape}


def raw_decode(mp4: bytes, indices: list[int]) -> np.ndarray:
    """The raw limit: the least PyAV code that gets these frames at 128x128 RGB."""
    container = av.open(io.BytesIO(mp4))
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    time_base, fps = stream.time_base, float(stream.average_rate)
    wanted = sorted(set(indices))
    if wanted[0] > 0:
        container.seek(int(wanted[0] / fps / time_base), stream=stream, backward=True)
    out = {}
    for frame in container.decode(stream):
        index = round(frame.pts * time_base * fps)
        if index in wanted:
            out[index] = frame.to_ndarray(format="rgb24", width=CLIP_SIZE, height=CLIP_SIZE)
        if index >= wanted[-1]:
            break
    container.close()
    return np.stack([out[i] for i in indices])


def raw_throughput(clips: list[tuple[str, list[int]]], mp4_by_key: dict[str, bytes]) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    for key, indices in clips:
        raw_decode(mp4_by_key[key], indices)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def worker_peak_rss(spec: str, num_workers: int, batch_size: int, num_batches: int) -> list[float]:
    """Peak RSS (MiB) of each DataLoader worker after ``num_batches`` (run inside a fresh process)."""
    loader = make_loader(spec, num_workers, batch_size, num_batches)
    iterator = iter(loader)
    for _ in range(num_batches):
        next(iterator)
    peaks = []
    for child in psutil.Process().children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    del iterator
    return peaks


def peak_rss_in_fresh_process(spec: str, num_workers: int, batch_size: int, num_batches: int) -> list[float]:
    command = [sys.executable, __file__, "--rss-child", spec, str(num_workers), str(batch_size), str(num_batches)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"RSS measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Latent shards (LatentDataModule) against a training step's consumption
# ----------------------------------------------------------------------------------------------

LATENT_FRAMES, LATENT_SIZE, LATENT_CHANNELS, LATENT_CLIP = 30, 16, 4, 16  # VDT Cityscapes: 128x128 frames, SD-VAE 8x


def write_latent_shards(folder: Path, num_samples: int, per_shard: int = 64) -> str:
    """Latent shards as ``vdiff encode`` writes them, with random posteriors (reading cost does not depend on
    the values)."""
    rng = np.random.default_rng(0)
    with ShardWriter(folder, max_count=per_shard, sample_type="latent") as writer:
        for i in range(num_samples):
            shape = (LATENT_FRAMES, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
            mean = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
            std = torch.from_numpy(rng.uniform(0.01, 0.2, shape).astype(np.float32))
            side = 8 * LATENT_SIZE
            first = source_video(i, 1, side)[0]  # a camera-like first frame: PNG costs what a real one costs
            meta = VideoMeta(fps=17, width=side, height=side, num_frames=LATENT_FRAMES, source="bench")
            writer.write_latent(f"l{i:05d}", mean, std, first, meta)
    return str(folder)


def latent_throughput(spec: str, num_workers: int, batch_size: int, num_batches: int) -> dict:
    from vdiff.data.latent_datamodule import LatentDataModule

    dm = LatentDataModule(train=spec, num_frames=LATENT_CLIP, batch_size=batch_size, num_workers=num_workers,
                          epoch_length=num_batches + 2 * max(1, num_workers) + 2, shuffle_buffer=64)  # fmt: skip
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    for _ in range(max(1, 2 * num_workers)):  # worker start-up is not throughput
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shape = tuple(batch["latents"].shape)
    del iterator
    return {"samples": num_batches * batch_size, "wall": wall, "cpu": cpu, "shape": shape}


def latent_main(args: argparse.Namespace, out: Path, workers_list: list[int]) -> int:
    num_samples, num_batches = (128, 16) if args.quick else (512, 60)
    start = time.perf_counter()
    spec = write_latent_shards(out / "latents", num_samples)
    print(f"wrote {num_samples} latent samples ({LATENT_FRAMES} x {LATENT_CHANNELS} x {LATENT_SIZE} x {LATENT_SIZE}, "
          f"{8 * LATENT_SIZE}px first frame) in {time.perf_counter() - start:.1f} s")  # fmt: skip
    consumed = args.step_batch / (args.step_ms / 1e3)
    batch = args.step_batch
    rows = {}
    for workers in workers_list:
        r = latent_throughput(spec, workers, batch, num_batches)
        rows[workers] = r
    print()
    print(f"LatentDataModule train loader: {LATENT_CLIP}-frame clips, batch {batch} {rows[0]['shape']}; "
          f"{num_batches} batches timed per row; machine cores: {os.cpu_count()}")  # fmt: skip
    print(f"a training step consumes {consumed:.1f} samples/s ({batch} clips per {args.step_ms:.0f} ms)")
    print(f"{'workers':>7} {'samples/s':>10} {'samples/s CPU':>14} {'x step consumption':>19}")
    table = {}
    for workers, r in rows.items():
        rate = r["samples"] / r["wall"]
        cpu_rate = r["samples"] / r["cpu"] if workers == 0 else float("nan")
        cpu_text = f"{cpu_rate:14.1f}" if cpu_rate == cpu_rate else f"{'-':>14}"
        print(f"{workers:>7} {rate:10.1f} {cpu_text} {rate / consumed:18.1f}x")
        table[str(workers)] = {"samples_per_s": rate, "times_consumption": rate / consumed}
    best = max(v["times_consumption"] for v in table.values())
    print(f"best: {best:.1f}x a step's consumption (target >= 10x)")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "dataloader", "mode": "latents", "cores": os.cpu_count(),
                                         "step_ms": args.step_ms, "step_batch": batch, "consumed_per_s": consumed,
                                         "workers": table}, indent=1))  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer videos and batches (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the generated shards (default: temporary)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rss-child", nargs=4, metavar=("SPEC", "WORKERS", "BATCH", "BATCHES"), help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to measure")
    parser.add_argument(
        "--latents", action="store_true", help="latent-shard training (LatentDataModule) instead of video"
    )
    parser.add_argument("--step-ms", type=float, default=157.0, help="--latents: training step time to feed (ms)")
    parser.add_argument("--step-batch", type=int, default=8, help="--latents: clips per training step")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workers_list = sorted({0, *args.workers})

    if args.rss_child:
        spec, workers, batch, batches = args.rss_child
        print(json.dumps(worker_peak_rss(spec, int(workers), int(batch), int(batches))))
        return 0

    out = args.out or Path(tempfile.mkdtemp(prefix="vdiff-bench-"))
    if args.latents:
        return latent_main(args, out, workers_list)
    num_videos, num_frames, num_batches = (8, 40, 8) if args.quick else (32, 48, 40)
    small_copies, large_copies = (1, 16) if args.quick else (1, 8)
    print(f"encoding {num_videos} source videos of {num_frames} frames at {SOURCE_SIZE}x{SOURCE_SIZE}, {FPS} fps ...")
    start = time.perf_counter()
    videos = [encode_video(source_video(seed, num_frames), fps=FPS) for seed in range(num_videos)]
    mean_kib = np.mean([len(v) for v in videos]) / 1024
    print(f"  {time.perf_counter() - start:.1f} s, {mean_kib:.0f} KiB per video")
    small = write_shards(out / "small", videos, num_frames, small_copies, per_shard=max(1, num_videos // 2))
    large = write_shards(out / "large", videos, num_frames, large_copies, per_shard=num_videos * large_copies // 2)
    small_mib = max(os.path.getsize(p) for p in expand_shard_spec(small)) / 2**20
    large_mib = max(os.path.getsize(p) for p in expand_shard_spec(large)) / 2**20
    mp4_by_key = load_bytes(small)

    rows = []
    results = {}
    for workers in workers_list:
        results[workers] = loader_throughput(small, workers, args.batch_size, num_batches)
        if workers == 0:
            # the raw limit on the clips the loader delivered, measured right before and after it
            raw_a = raw_throughput(results[0]["clips"], mp4_by_key)
            again = loader_throughput(small, 0, args.batch_size, num_batches)
            raw_b = raw_throughput(results[0]["clips"], mp4_by_key)
            results[0]["wall"] = min(results[0]["wall"], again["wall"])
            results[0]["cpu"] = min(results[0]["cpu"], again["cpu"])
            raw = {"wall": min(raw_a["wall"], raw_b["wall"]), "cpu": min(raw_a["cpu"], raw_b["cpu"])}
            n = len(results[0]["clips"])
            rows.append(("raw PyAV (same frames)", "-", n / raw["wall"], n / raw["cpu"], "-"))
    n0 = len(results[0]["clips"])
    raw_rate = n0 / raw["wall"]
    for workers, r in results.items():
        n = len(r["clips"])
        ratio = (n / r["wall"]) / raw_rate
        rows.append(
            (
                "VideoDataModule",
                str(workers),
                n / r["wall"],
                n / r["cpu"] if workers == 0 else float("nan"),
                f"{ratio:.2f}",
            )
        )
    cpu_ratio = (n0 / results[0]["cpu"]) / (n0 / raw["cpu"])

    print()
    print(
        f"clips of {CLIP_FRAMES} frames at {CLIP_SIZE}x{CLIP_SIZE} from {SOURCE_SIZE}x{SOURCE_SIZE} sources; "
        f"batch {args.batch_size}; {n0} clips timed per row; torch threads 1; decode threads 1"
    )
    print(f"{'pipeline':<26} {'workers':>7} {'clips/s':>9} {'frames/s':>9} {'clips/s CPU':>12} {'vs raw':>7}")
    for name, workers, rate, cpu_rate, ratio in rows:
        cpu_text = f"{cpu_rate:12.1f}" if cpu_rate == cpu_rate else f"{'-':>12}"
        print(f"{name:<26} {workers:>7} {rate:9.1f} {rate * CLIP_FRAMES:9.0f} {cpu_text} {ratio:>7}")
    print(
        f"num_workers=0 / raw: {(n0 / results[0]['wall']) / raw_rate:.2f} wall clock, {cpu_ratio:.2f} CPU time "
        f"(target >= 0.9); machine cores: {os.cpu_count()}"
    )
    if args.json:
        rates = {str(w): len(r["clips"]) / r["wall"] for w, r in results.items()}
        args.json.write_text(json.dumps({"benchmark": "dataloader", "mode": "video", "cores": os.cpu_count(),
                                         "clips_per_s": rates, "raw_clips_per_s": raw_rate, "clip_frames": CLIP_FRAMES,
                                         "clip_size": CLIP_SIZE, "cpu_ratio_workers0": cpu_ratio}, indent=1))  # fmt: skip

    print()
    rss_batches = 4 if args.quick else 12
    rss_small = peak_rss_in_fresh_process(small, 2, args.batch_size, rss_batches)
    rss_large = peak_rss_in_fresh_process(large, 2, args.batch_size, rss_batches)
    print(f"{'shard set':<10} {'shard size':>11} {'peak RSS per worker (MiB)':>27}")
    print(f"{'small':<10} {small_mib:9.1f} MiB {', '.join(f'{x:.0f}' for x in rss_small):>27}")
    print(f"{'large':<10} {large_mib:9.1f} MiB {', '.join(f'{x:.0f}' for x in rss_large):>27}")
    growth = max(rss_large) - max(rss_small)
    print(f"peak worker RSS grows by {growth:+.0f} MiB for {large_mib / small_mib:.0f}x larger shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
