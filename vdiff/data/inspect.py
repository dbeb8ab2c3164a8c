"""``vdiff data inspect SHARDS``: what a shard set holds and which samples a data loader would skip.

Reads every sample of every shard, checks its json against the schema and probes its video (or,
with ``--decode``, decodes every frame), and reports counts, durations, histograms of fps,
resolution and duration, per-source counts, the actions present, and the undecodable samples by
reason. ``--json`` prints the same summary as one json object. :func:`inspect_shards` returns it as
a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vdiff.data import video_io
from vdiff.data.schema import (
    FIRST_FRAME_EXT,
    LATENTS_EXT,
    META_EXT,
    VIDEO_EXT,
    SampleType,
    SchemaError,
    VideoMeta,
)
from vdiff.data.shards import expand_shard_spec, iter_raw_samples

# Reasons beyond video_io.DECODE_ERROR_REASONS that a sample can be unusable for.
MISSING_JSON = "missing_json"
BAD_JSON = "bad_json"
MISSING_VIDEO = "missing_video"
MISSING_LATENTS = "missing_latents"
MISSING_FIRST_FRAME = "missing_first_frame"
SIZE_MISMATCH = "size_mismatch"
BAD_SHARD = "bad_shard"  # same name as the datamodule's skip counter

# Upper edges (seconds) of the duration histogram's bins.
DURATION_BINS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
MAX_LISTED_BAD = 20  # bad samples listed by key in the summary


def _duration_bin(seconds: float) -> str:
    low = 0.0
    for high in DURATION_BINS:
        if seconds < high:
            return f"{low:g}-{high:g}s"
        low = high
    return f">={low:g}s"


def _check_video(files: dict[str, bytes], meta: VideoMeta, decode: bool) -> tuple[str, str] | None:
    """``(reason, message)`` if the sample's video is unusable, else None."""
    if VIDEO_EXT not in files:
        return MISSING_VIDEO, f"no .{VIDEO_EXT} file"
    mp4 = files[VIDEO_EXT]
    try:
        info = video_io.probe(mp4)
        if info.width % 2 or info.height % 2:
            return video_io.ODD_SIZE, f"odd frame size {info.width}x{info.height}"
        if (info.width, info.height) != (meta.width, meta.height):
            return SIZE_MISMATCH, f"json says {meta.width}x{meta.height}, video is {info.width}x{info.height}"
        if info.num_frames < meta.num_frames:
            return video_io.TOO_SHORT, f"json says {meta.num_frames} frames, video holds {info.num_frames}"
        if decode:
            video_io.decode_frames(mp4, range(meta.num_frames))
    except video_io.VideoDecodeError as err:
        return err.reason, err.message
    return None


def _check_latent(files: dict[str, bytes]) -> tuple[str, str] | None:
    if LATENTS_EXT not in files:
        return MISSING_LATENTS, f"no .{LATENTS_EXT} file"
    if FIRST_FRAME_EXT not in files:
        return MISSING_FIRST_FRAME, f"no .{FIRST_FRAME_EXT} file"
    return None


def inspect_shards(spec: str | Path | Sequence[str | Path], decode: bool = False) -> dict[str, Any]:
    """Summary of a shard set (see the module docstring); ``decode`` decodes every frame of every video.

    Keys: ``shards``, ``samples``, ``good_samples``, ``frames``, ``duration_s`` (good samples),
    ``fps``, ``resolution`` (``"WxH"``), ``duration`` (histograms of good samples), ``sources``,
    ``sample_types``, ``actions`` (samples holding each action), ``undecodable`` (reason -> count),
    ``undecodable_total``, ``bad_samples`` (the first few as ``{shard, key, reason, message}``).
    """
    shards = expand_shard_spec(spec)
    fps: Counter[str] = Counter()
    resolution: Counter[str] = Counter()
    duration: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    sample_types: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    undecodable: Counter[str] = Counter()
    bad: list[dict[str, str]] = []
    samples = good = frames = 0
    seconds = 0.0

    def flag(shard: str, key: str, reason: str, message: str) -> None:
        undecodable[reason] += 1
        if len(bad) < MAX_LISTED_BAD:
            bad.append({"shard": shard, "key": key, "reason": reason, "message": message})

    for shard in shards:
        try:
            for key, files in iter_raw_samples(shard):
                samples += 1
                if META_EXT not in files:
                    flag(shard, key, MISSING_JSON, f"no .{META_EXT} file (files: {sorted(files)})")
                    continue
                try:
                    meta = VideoMeta.from_json(files[META_EXT])
                except SchemaError as err:
                    flag(shard, key, BAD_JSON, str(err))
                    continue
                if meta.sample_type == SampleType.LATENT.value:
                    problem = _check_latent(files)
                else:
                    problem = _check_video(files, meta, decode)
                if problem is not None:
                    flag(shard, key, *problem)
                    continue
                good += 1
                frames += meta.num_frames
                clip_seconds = meta.num_frames / meta.fps
                seconds += clip_seconds
                fps[f"{meta.fps:g}"] += 1
                resolution[f"{meta.width}x{meta.height}"] += 1
                duration[_duration_bin(clip_seconds)] += 1
                sources[meta.source] += 1
                sample_types[meta.sample_type] += 1
                for name, values in meta.actions.items():
                    if any(v is not None for v in values):
                        actions[name] += 1
        except ValueError as err:  # unreadable or truncated tar: the samples read so far still count
            flag(shard, "", BAD_SHARD, str(err))

    def ordered(counter: Counter[str]) -> dict[str, int]:
        return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

    bin_order = [_duration_bin(b - 1e-9) for b in DURATION_BINS] + [_duration_bin(float("inf"))]
    return {
        "shards": len(shards),
        "samples": samples,
        "good_samples": good,
        "frames": frames,
        "duration_s": round(seconds, 3),
        "fps": ordered(fps),
        "resolution": ordered(resolution),
        "duration": {b: duration[b] for b in bin_order if duration[b]},
        "sources": ordered(sources),
        "sample_types": ordered(sample_types),
        "actions": ordered(actions),
        "undecodable": ordered(undecodable),
        "undecodable_total": sum(undecodable.values()),
        "bad_samples": bad,
    }


def _histogram_lines(title: str, counts: dict[str, int], total: int) -> list[str]:
    lines = [f"{title}:"]
    if not counts:
        return lines + ["  (none)"]
    width = max(len(k) for k in counts)
    peak = max(counts.values())
    for name, count in counts.items():
        bar = "#" * max(1, round(30 * count / peak))
        share = 100.0 * count / total if total else 0.0
        lines.append(f"  {name:<{width}}  {count:>7}  {share:5.1f}%  {bar}")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the human-readable report ``vdiff data inspect`` prints."""
    good = summary["good_samples"]
    hours, rest = divmod(summary["duration_s"], 3600)
    lines = [
        f"shards:           {summary['shards']}",
        f"samples:          {summary['samples']} ({good} usable, {summary['undecodable_total']} undecodable)",
        f"frames:           {summary['frames']}",
        f"duration:         {summary['duration_s']:.1f} s ({int(hours)} h {rest / 60:.1f} min)",
    ]
    lines += _histogram_lines("fps", summary["fps"], good)
    lines += _histogram_lines("resolution (W x H)", summary["resolution"], good)
    lines += _histogram_lines("duration", summary["duration"], good)
    lines += _histogram_lines("sources", summary["sources"], good)
    lines += _histogram_lines("actions (samples holding each)", summary["actions"], good)
    lines += _histogram_lines("undecodable by reason", summary["undecodable"], summary["samples"])
    for item in summary["bad_samples"]:
        lines.append(f"  {item['reason']}: {item['shard']} {item['key']}: {item['message']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vdiff data inspect``."""
    parser.add_argument(
        "shards",
        nargs="+",
        help="shard folder, manifest.json, brace pattern (a/shard-{000000..000009}.tar), glob or tar; several allowed",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one json object")
    parser.add_argument(
        "--decode", action="store_true", help="decode every frame of every video (slow; finds damage inside streams)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``vdiff data inspect``; returns the exit code (1 if the spec names no shard)."""
    try:
        summary = inspect_shards(args.shards, decode=args.decode)
    except (FileNotFoundError, ValueError) as err:
        print(f"vdiff data inspect: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdiff data inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
