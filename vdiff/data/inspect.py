"""``vdiff data inspect SHARDS``: what a shard set holds and which samples a data loader would skip.

Reads every sample of every shard, checks its json against the schema and probes its video (or,
with ``--decode``, decodes every frame), and reports counts, durations, histograms of frames per
sample, fps, resolution and duration, per-source counts, the actions present, and the undecodable
samples by reason. ``--json`` prints the same summary as one json object. :func:`inspect_shards`
returns it as a dict.

``SHARDS`` may also be a root folder whose shard sets sit in subfolders, as ``vdiff data synth``
(``OUT/train``, ``OUT/val``), ``vdiff data cityscapes`` and ``vdiff data nuscenes`` (``OUT/<split>``)
write them, or a folder holding several ``vdiff data shards`` outputs: every folder below it that
holds a ``manifest.json`` or ``.tar`` shards is one set (hidden folders, such as the ``.NAME.partial-*``
folders of a run in progress, are skipped). Each set is reported, then the total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vdiff.data import video_io
from vdiff.data.schema import (
    FIRST_FRAME_EXT,
    LATENTS_EXT,
    MANIFEST_NAME,
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


def is_shard_set(folder: str | Path) -> bool:
    """Whether ``folder`` holds a shard set itself: a ``manifest.json`` or ``.tar`` shards."""
    folder = Path(folder)
    return (folder / MANIFEST_NAME).is_file() or any(p.is_file() for p in folder.glob("*.tar"))


def find_shard_sets(root: str | Path) -> list[str]:
    """The shard-set folders at or below ``root``, sorted; a set's own subfolders are not searched.

    Hidden folders are skipped; symlinked folders are followed once. Raises FileNotFoundError
    naming ``root`` when no folder at or below it holds a set.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder")
    found: list[str] = []
    seen: set[str] = set()
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a symlink
            subfolders.clear()
            continue
        seen.add(real)
        if is_shard_set(folder):
            found.append(os.path.normpath(folder))
            subfolders.clear()
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    if not found:
        raise FileNotFoundError(
            f"no shard set in {root}: neither it nor any folder below it holds a {MANIFEST_NAME} or .tar shards"
        )
    return sorted(found)


def _is_root(item: str | Path) -> bool:
    """A folder that is not a shard set itself (its sets, if any, sit in subfolders)."""
    return os.path.isdir(item) and not is_shard_set(item)


class _Tally:
    """Counts of the samples read so far; tallies add up (``+``) into a total."""

    def __init__(self) -> None:
        self.shards = self.samples = self.good = self.frames = 0
        self.seconds = 0.0
        self.frames_per_sample: Counter[int] = Counter()
        self.fps: Counter[str] = Counter()
        self.resolution: Counter[str] = Counter()
        self.duration: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.sample_types: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.undecodable: Counter[str] = Counter()
        self.bad: list[dict[str, str]] = []

    def __add__(self, other: _Tally) -> _Tally:
        total = _Tally()
        for tally in (self, other):
            for name, value in vars(tally).items():
                if name != "bad":
                    setattr(total, name, getattr(total, name) + value)
            total.bad += tally.bad[: MAX_LISTED_BAD - len(total.bad)]
        return total

    def flag(self, shard: str, key: str, reason: str, message: str) -> None:
        self.undecodable[reason] += 1
        if len(self.bad) < MAX_LISTED_BAD:
            self.bad.append({"shard": shard, "key": key, "reason": reason, "message": message})

    def read_shard(self, shard: str, decode: bool) -> None:
        self.shards += 1
        try:
            for key, files in iter_raw_samples(shard):
                self.samples += 1
                if META_EXT not in files:
                    self.flag(shard, key, MISSING_JSON, f"no .{META_EXT} file (files: {sorted(files)})")
                    continue
                try:
                    meta = VideoMeta.from_json(files[META_EXT])
                except SchemaError as err:
                    self.flag(shard, key, BAD_JSON, str(err))
                    continue
                if meta.sample_type == SampleType.LATENT.value:
                    problem = _check_latent(files)
                else:
                    problem = _check_video(files, meta, decode)
                if problem is not None:
                    self.flag(shard, key, *problem)
                    continue
                self.add_good(meta)
        except ValueError as err:  # unreadable or truncated tar: the samples read so far still count
            self.flag(shard, "", BAD_SHARD, str(err))

    def add_good(self, meta: VideoMeta) -> None:
        self.good += 1
        self.frames += meta.num_frames
        clip_seconds = meta.num_frames / meta.fps
        self.seconds += clip_seconds
        self.frames_per_sample[meta.num_frames] += 1
        self.fps[f"{meta.fps:g}"] += 1
        self.resolution[f"{meta.width}x{meta.height}"] += 1
        self.duration[_duration_bin(clip_seconds)] += 1
        self.sources[meta.source] += 1
        self.sample_types[meta.sample_type] += 1
        for name, values in meta.actions.items():
            if any(v is not None for v in values):
                self.actions[name] += 1

    def summary(self) -> dict[str, Any]:
        def ordered(counter: Counter[str]) -> dict[str, int]:
            return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

        bin_order = [_duration_bin(b - 1e-9) for b in DURATION_BINS] + [_duration_bin(float("inf"))]
        return {
            "shards": self.shards,
            "samples": self.samples,
            "good_samples": self.good,
            "frames": self.frames,
            "duration_s": round(self.seconds, 3),
            "frames_per_sample": {str(n): c for n, c in sorted(self.frames_per_sample.items())},
            "fps": ordered(self.fps),
            "resolution": ordered(self.resolution),
            "duration": {b: self.duration[b] for b in bin_order if self.duration[b]},
            "sources": ordered(self.sources),
            "sample_types": ordered(self.sample_types),
            "actions": ordered(self.actions),
            "undecodable": ordered(self.undecodable),
            "undecodable_total": sum(self.undecodable.values()),
            "bad_samples": list(self.bad),
        }


def inspect_shards(spec: str | Path | Sequence[str | Path], decode: bool = False) -> dict[str, Any]:
    """Summary of a shard set (see the module docstring); ``decode`` decodes every frame of every video.

    Keys: ``shards``, ``samples``, ``good_samples``, ``frames``, ``duration_s`` (good samples),
    ``frames_per_sample`` (histogram of good samples' frame counts, ``{"24": 250, "16": 6}``
    ordered by frame count), ``fps``, ``resolution`` (``"WxH"``), ``duration`` (histograms of good
    samples), ``sources``, ``sample_types``, ``actions`` (samples holding each action),
    ``undecodable`` (reason -> count), ``undecodable_total``, ``bad_samples`` (the first few as
    ``{shard, key, reason, message}``).

    When ``spec`` names a root folder (one holding shard sets in subfolders, see
    :func:`find_shard_sets`), each set found is inspected separately: the summary then holds the
    total over all sets under the keys above plus ``sets``, ``{set path: that set's summary}``; any
    other item of ``spec`` is one set of its own. A root with no set below it raises FileNotFoundError.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not any(_is_root(item) for item in items):
        tally = _Tally()
        for shard in expand_shard_spec(spec):
            tally.read_shard(shard, decode)
        return tally.summary()

    set_specs: list[str] = []  # a set named twice (a root and one of its sets) is read once
    for item in items:
        for found in find_shard_sets(item) if _is_root(item) else [os.path.normpath(item)]:
            if found not in set_specs:
                set_specs.append(found)
    total = _Tally()
    sets: dict[str, dict[str, Any]] = {}
    for set_spec in set_specs:
        tally = _Tally()
        for shard in expand_shard_spec(set_spec):
            tally.read_shard(shard, decode)
        sets[set_spec] = tally.summary()
        total = total + tally
    return {**total.summary(), "sets": sets}


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


def _sets_table(sets: dict[str, dict[str, Any]]) -> list[str]:
    header = ("set", "shards", "samples", "usable", "undecodable", "frames", "duration")
    rows = [
        (name, str(s["shards"]), str(s["samples"]), str(s["good_samples"]), str(s["undecodable_total"]),
         str(s["frames"]), f"{s['duration_s']:.1f} s")
        for name, s in sets.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"shard sets:       {len(sets)}"]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  " + "  ".join(cells))
    return lines + ["total over all sets:"]


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the human-readable report ``vdiff data inspect`` prints (with a table of the
    sets first when ``summary`` covers several, see :func:`inspect_shards`)."""
    good = summary["good_samples"]
    hours, rest = divmod(summary["duration_s"], 3600)
    lines = _sets_table(summary["sets"]) if "sets" in summary else []
    lines += [
        f"shards:           {summary['shards']}",
        f"samples:          {summary['samples']} ({good} usable, {summary['undecodable_total']} undecodable)",
        f"frames:           {summary['frames']}",
        f"duration:         {summary['duration_s']:.1f} s ({int(hours)} h {rest / 60:.1f} min)",
    ]
    lines += _histogram_lines("frames per sample", summary["frames_per_sample"], good)
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
        help="shard folder, manifest.json, brace pattern (a/shard-{000000..000009}.tar), glob or tar, or a root "
        "folder whose subfolders hold shard sets (each reported, then the total); several allowed",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one json object")
    parser.add_argument(
        "--decode", action="store_true", help="decode every frame of every video (slow; finds damage inside streams)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``vdiff data inspect`` (a spec that names no shard or no set raises: ``vdiff`` prints it as one line)."""
    summary = inspect_shards(args.shards, decode=args.decode)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdiff data inspect", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
