"""``vdiff data opendv SRC --trim META --out DIR``: long driving videos (OpenDV-YouTube style) -> 10 Hz clips.

OpenDV-YouTube ships hours-long front-camera YouTube videos plus metadata saying how many seconds of
each to discard at the start and at the end (intros, outros, overlays). This tool cuts the kept span
into clips at 10 Hz (the rate of the nuScenes shards, so both mix in one data module) through the
same pipeline as ``vdiff data shards`` (scene cuts, optional motion filter, resumable, parallel).
The videos carry no ego signals, so no action key is written: every action is invalid for every
frame (docs/architecture.md, "Actions"), and the model treats these clips as unconditional. Samples have
``source = "opendv-youtube"``.

Trim metadata (``--trim``), any of:

* json object: ``{"<video>": {"start_discard": 90, "end_discard": 60}, ...}``;
* json list of records (the OpenDV-YouTube meta file layout): ``[{"videoid": "<video>",
  "start_discard": 90, "end_discard": 60, ...}, ...]`` (``video_id``/``videoid``/``video``/``name``);
* csv with a header ``video,start_discard,end_discard``.

``<video>`` matches an input by its path relative to SRC (with or without extension) or by its file
stem. Seconds are non-negative numbers. Inputs without an entry are reported (``no_trim``) and
skipped unless ``--allow-untrimmed``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from vdiff.data.convert.folder import (
    ClipOptions,
    Report,
    Trim,
    add_clip_arguments,
    build_folder_shards,
    options_from_args,
)
from vdiff.data.schema import SchemaError, parse_json

OPENDV_FPS = 10.0
OPENDV_SOURCE = "opendv-youtube"
_NAME_FIELDS = ("videoid", "video_id", "video", "name", "id")


def _trim_from(record: dict, where: str) -> Trim:
    values = []
    for name in ("start_discard", "end_discard"):
        value = record.get(name, 0)
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: {name} must be a number of seconds, got {value!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: {name} must be a non-negative number of seconds, got {value!r}")
        values.append(value)
    return Trim(*values)


def load_trims(path: str | Path) -> dict[str, Trim]:
    """Read trim metadata (see the module docstring) into ``{video name: Trim}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trim metadata {path} does not exist")
    trims: dict[str, Trim] = {}
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "video" not in reader.fieldnames:
                    raise ValueError(f"{path}: csv needs a header with columns video,start_discard,end_discard")
                for line, row in enumerate(reader, start=2):
                    trims[(row["video"] or "").strip()] = _trim_from(row, f"{path}:{line}")
        except (UnicodeDecodeError, csv.Error) as err:
            raise ValueError(f"{path}: not a readable csv ({err})") from None
        return trims
    try:
        data = parse_json(path.read_bytes(), str(path))
    except SchemaError as err:
        raise ValueError(str(err)) from None
    if isinstance(data, dict):
        for name, record in data.items():
            if not isinstance(record, dict):
                raise ValueError(f"{path}: entry {name!r} must be an object with start_discard/end_discard")
            trims[str(name)] = _trim_from(record, f"{path}[{name!r}]")
    elif isinstance(data, list):
        for i, record in enumerate(data):
            name = next((record[k] for k in _NAME_FIELDS if isinstance(record, dict) and k in record), None)
            if name is None:
                raise ValueError(f"{path}[{i}]: record needs one of the fields {list(_NAME_FIELDS)}")
            trims[str(name)] = _trim_from(record, f"{path}[{i}]")
    else:
        raise ValueError(f"{path}: expected a json object or list, got {type(data).__name__}")
    return trims


def build_opendv_shards(
    src: str | Path,
    out: str | Path,
    trims: str | Path | dict[str, Trim],
    clip_frames: int = 25,
    max_side: int | None = None,
    scene_detector: str = "adaptive",
    min_motion: float | None = None,
    workers: int = 1,
    require_trim: bool = True,
    **kwargs,
) -> Report:
    """Trimmed 10 Hz clips without actions from a folder of long driving videos (see the module docstring).

    Further keyword arguments go to :func:`build_folder_shards` (``shard_max_count``, ``commit_every``, ``log``).
    """
    if not isinstance(trims, dict):
        trims = load_trims(trims)
    options = ClipOptions(
        clip_frames=clip_frames,
        fps=OPENDV_FPS,
        max_side=max_side,
        scene_detector=scene_detector,
        min_motion=min_motion,
        source=OPENDV_SOURCE,
    )
    return build_folder_shards(src, out, options, workers=workers, trims=trims, require_trim=require_trim, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder of long driving videos (searched recursively)")
    parser.add_argument("--trim", required=True, help="trim metadata: json or csv (video -> start_discard, end_discard seconds)")
    parser.add_argument("--allow-untrimmed", action="store_true", help="convert inputs without a trim entry whole instead of skipping them")
    add_clip_arguments(parser, fps_default=OPENDV_FPS)
    parser.set_defaults(clip_frames=25)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args, OPENDV_SOURCE)
    report = build_folder_shards(
        args.src,
        args.out,
        options,
        workers=args.workers,
        trims=load_trims(args.trim),
        require_trim=not args.allow_untrimmed,
        shard_max_count=args.shard_size,
        commit_every=args.commit_every,
        log=lambda line: tqdm.write(line, file=sys.stderr),  # above the progress bar
        progress=True,
    )
    print(report.summary())
    return 0
