"""``vdiff data motion-buckets SHARDS --out buckets.json``: fit SVD's ``motion_bucket_id`` map to a shard set.

Reads the motion score that ``vdiff data shards`` curation stored in every clip's json (``extra["motion_score"]``,
with its units ``extra["motion_fps"]`` / ``extra["motion_size"]``; :mod:`vdiff.data.convert.curation`). Only the
``.json`` members of the tars are read (the tar is read by seeking past every other member: nothing is decoded,
no video is read), so it takes seconds on sets of any size. Latent sets from ``vdiff encode`` work too: their
jsons keep the score of the video clip they were encoded from.

The scores go through :func:`vdiff.models.conditioners.fit_motion_buckets` (quantile knots, so that the buckets
are equally populated on this set); the map is saved as JSON (:func:`save_motion_buckets`), read by
``SVDModule``'s ``conditioning.motion_buckets`` (:func:`load_motion_buckets`), and a histogram of the set's clips
per bucket group is printed.

The file (``format: vdiff.motion_buckets``, ``version: 1``) holds the fields of
:class:`~vdiff.models.conditioners.MotionBuckets`, the model-side map: ``num_buckets``, ``flow_fps``,
``flow_size``, ``source``, ``scores`` and ``levels`` (the knots). Another format, a newer version, an unknown
field or a map the class refuses is a ValueError naming the file.

A set without any score (synthetic data, converters that do not score, ``--no-motion`` / ``--no-curation``) is
refused with a message saying so; clips without a score beside scored ones are left out and counted. Scores
measured with different units (``motion_fps`` / ``motion_size``) are refused: they do not compare.

    vdiff data motion-buckets data/myclips --out data/myclips/motion_buckets.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vdiff.data.schema import (
    META_EXT,
    MOTION_FPS_KEY,
    MOTION_SCORE_KEY,
    MOTION_SIZE_KEY,
    SchemaError,
    VideoMeta,
    motion_score_of,
)
from vdiff.data.shards import expand_shard_spec, split_member_name
from vdiff.models.conditioners import FLOW_FPS, FLOW_SIZE, NUM_MOTION_BUCKETS, MotionBuckets, fit_motion_buckets

HISTOGRAM_WIDTH = 40  # characters of the longest bar
MOTION_BUCKETS_FORMAT = "vdiff.motion_buckets"  # the file's "format" field
MOTION_BUCKETS_VERSION = 1


# ---------------------------------------------------------------------------- the file


def motion_buckets_dict(buckets: MotionBuckets) -> dict[str, Any]:
    """The JSON object of a motion-buckets file: ``format``, ``version`` and the map's fields."""
    return {
        "format": MOTION_BUCKETS_FORMAT,
        "version": MOTION_BUCKETS_VERSION,
        "num_buckets": buckets.num_buckets,
        "flow_fps": buckets.flow_fps,
        "flow_size": buckets.flow_size,
        "source": buckets.source,
        "scores": list(buckets.scores),
        "levels": list(buckets.levels),
    }


def motion_buckets_from_dict(data: Mapping[str, Any], source: str = "motion buckets") -> MotionBuckets:
    """Inverse of :func:`motion_buckets_dict`; another format, another version, unknown fields or a map
    :class:`MotionBuckets` refuses are ValueErrors starting with ``source``."""
    data = dict(data)
    if data.pop("format", None) != MOTION_BUCKETS_FORMAT:
        raise ValueError(f"{source}: not a {MOTION_BUCKETS_FORMAT!r} file (field 'format')")
    version = data.pop("version", None)
    if version != MOTION_BUCKETS_VERSION:
        raise ValueError(f"{source}: version {version!r}; this vdiff reads version {MOTION_BUCKETS_VERSION}")
    known = {f.name for f in dataclasses.fields(MotionBuckets)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; fields are {sorted(known)}")
    try:
        return MotionBuckets(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


def save_motion_buckets(buckets: MotionBuckets, path: str | os.PathLike) -> Path:
    """Write ``buckets`` as a motion-buckets JSON file (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(motion_buckets_dict(buckets), indent=1) + "\n")
    return path


def load_motion_buckets(path: str | os.PathLike) -> MotionBuckets:
    """The :class:`MotionBuckets` of a motion-buckets JSON file; an unreadable or invalid file is a ValueError
    naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable motion-buckets JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a motion-buckets file holds a JSON object, got {type(data).__name__}")
    return motion_buckets_from_dict(data, source=str(path))


# ---------------------------------------------------------------------------- the scores of a shard set


class NoMotionScores(ValueError):
    """The shard set holds no clip with a motion score (the message says how to make one)."""


@dataclass
class MotionScores:
    """The motion scores of a shard set, as read from its jsons."""

    scores: list[float] = field(default_factory=list)
    units: Counter = field(default_factory=Counter)  # (motion_fps, motion_size) -> scored clips
    samples: int = 0  # samples with a readable json
    unscored: int = 0  # readable samples without a (finite) score
    bad: Counter = field(default_factory=Counter)  # reason -> samples / shards left out
    shards: int = 0


def iter_sample_json(tar_path: str) -> list[tuple[str, bytes]]:
    """``(key, json bytes)`` of every sample of a tar, reading only the json members (the rest is skipped by
    seeking). Raises ValueError naming the tar when it is unreadable."""
    out = []
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if ext != META_EXT:
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                out.append((key, handle.read()))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"shard {tar_path} is unreadable or truncated: {err}") from err
    return out


def read_motion_scores(
    spec: str | Path | Sequence[str | Path], log: Callable[[str], None] | None = None
) -> MotionScores:
    """The motion scores stored in the jsons of the shards of ``spec`` (a shard spec or a list of them).

    A sample whose json does not follow the schema is counted under ``bad["bad_json"]``, an unreadable tar
    under ``bad["bad_shard"]`` (its readable samples count); neither stops the reading.
    """
    found = MotionScores()
    for shard in expand_shard_spec(spec):
        found.shards += 1
        try:
            members = iter_sample_json(shard)
        except ValueError as err:
            found.bad["bad_shard"] += 1
            if log:
                log(f"skipped {err}")
            continue
        for key, text in members:
            try:
                meta = VideoMeta.from_json(text)
            except SchemaError as err:
                found.bad["bad_json"] += 1
                if log:
                    log(f"skipped {shard}: sample {key!r}: {err}")
                continue
            found.samples += 1
            score = motion_score_of(meta.extra)
            if not math.isfinite(score):
                found.unscored += 1
                continue
            found.scores.append(score)
            units = (float(meta.extra.get(MOTION_FPS_KEY, FLOW_FPS)), int(meta.extra.get(MOTION_SIZE_KEY, FLOW_SIZE)))
            found.units[units] += 1
    return found


def fit_shard_buckets(
    found: MotionScores, num_buckets: int = NUM_MOTION_BUCKETS, num_knots: int | None = None, source: str = ""
) -> MotionBuckets:
    """:func:`fit_motion_buckets` on the scores of :func:`read_motion_scores`, in their units.

    Raises :class:`NoMotionScores` when no sample has a score, ValueError when the scores were measured with
    different units or cannot be bucketed (fewer than 2, all equal).
    """
    if not found.scores:
        raise NoMotionScores(
            f"none of the {found.samples} samples in {found.shards} shard(s) has a motion score "
            f"(extra[{MOTION_SCORE_KEY!r}] in the sample json): make the shards with `vdiff data shards` with the "
            "motion score on (no --no-motion / --no-curation), or give SVDModule a fixed "
            "conditioning.motion_bucket_id instead of fitted buckets"
        )
    if len(found.units) > 1:
        listed = ", ".join(
            f"motion_fps {f:g} / motion_size {s}: {n} clips" for (f, s), n in sorted(found.units.items())
        )
        raise ValueError(
            f"the motion scores were measured with different units ({listed}); they do not compare: "
            "fit buckets per set, or re-curate with one --flow setting"
        )
    ((flow_fps, flow_size),) = found.units
    return fit_motion_buckets(
        torch.tensor(found.scores, dtype=torch.float64),
        num_buckets=num_buckets,
        num_knots=num_knots,
        flow_fps=flow_fps,
        flow_size=flow_size,
        source=source or f"vdiff data motion-buckets: quantiles of {len(found.scores)} clip scores",
    )


def histogram(buckets: MotionBuckets, scores: Sequence[float], rows: int = 16) -> str:
    """A text histogram of ``scores`` over ``buckets``, ``rows`` groups of consecutive buckets: bucket range,
    clips, score range of those clips and a bar."""
    rows = max(1, min(rows, buckets.num_buckets))
    ids = buckets(torch.tensor(list(scores), dtype=torch.float64)).tolist()
    per_row = math.ceil(buckets.num_buckets / rows)
    groups: dict[int, list[float]] = {}
    for score, bucket in zip(scores, ids):
        groups.setdefault(bucket // per_row, []).append(score)
    largest = max((len(v) for v in groups.values()), default=1)
    lines = [f"{'buckets':>9}  {'clips':>7}  {'scores':<19}"]
    for row in range(math.ceil(buckets.num_buckets / per_row)):
        lo, hi = row * per_row, min(buckets.num_buckets, (row + 1) * per_row) - 1
        members = groups.get(row, [])
        span = f"{min(members):.3g} - {max(members):.3g}" if members else "-"
        bar = "#" * (round(HISTOGRAM_WIDTH * len(members) / largest) if members else 0)
        lines.append(f"{lo:>4}-{hi:<4}  {len(members):>7}  {span:<19}  {bar}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard set(s): folder, manifest, brace pattern, glob or tar")
    parser.add_argument("--out", required=True, help="where to write the buckets JSON (e.g. buckets.json)")
    parser.add_argument(
        "--num-buckets",
        type=int,
        default=NUM_MOTION_BUCKETS,
        help=f"buckets (SVD: {NUM_MOTION_BUCKETS}, ids 0..{NUM_MOTION_BUCKETS - 1})",
    )
    parser.add_argument(
        "--num-knots",
        type=int,
        default=None,
        help="quantile knots of the map (default num_buckets + 1: every bucket edge on a quantile)",
    )
    parser.add_argument("--rows", type=int, default=16, help="rows of the printed histogram (default 16)")


def run(args: argparse.Namespace) -> int:
    found = read_motion_scores(args.shards, log=lambda line: print(line, file=sys.stderr))
    buckets = fit_shard_buckets(found, args.num_buckets, args.num_knots)  # NoMotionScores: one line from `vdiff`
    path = save_motion_buckets(buckets, args.out)
    scores = torch.tensor(found.scores, dtype=torch.float64)
    left_out = f", {found.unscored} without a score left out" if found.unscored else ""
    bad = "".join(f", {n} {reason}" for reason, n in sorted(found.bad.items()))
    print(
        f"motion scores of {len(found.scores)} clips in {found.shards} shard(s){left_out}{bad}; units: "
        f"motion_fps {buckets.flow_fps:g}, motion_size {buckets.flow_size}"
    )
    print(f"score min {scores.min().item():.4g}, median {scores.median().item():.4g}, max {scores.max().item():.4g}")
    print(f"wrote {path}: {len(buckets.scores)} knots -> {buckets.num_buckets} buckets")
    print(histogram(buckets, found.scores, args.rows))
    return 0
