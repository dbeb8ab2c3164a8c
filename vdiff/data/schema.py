"""The versioned shard schema: what a webdataset sample of vdiff holds, written in one place.

A shard is a tar file of samples; a sample is the files that share a key (webdataset splits the
file name at its first dot: ``<key>.<ext>``). Two sample types exist:

``video`` (``SampleType.VIDEO``)
    ``<key>.mp4``   H.264 (libx264), yuv420p.
    ``<key>.json``  :class:`VideoMeta` - schema version, fps, width, height, num_frames, source,
                    and per-frame actions where known.

``latent`` (``SampleType.LATENT``, pre-encoded by ``vdiff encode``)
    ``<key>.latents.safetensors``  tensors ``mean`` and ``std``, fp16, ``(T, c, h, w)``, in the
                                   autoencoder's *unscaled* latent space.
    ``<key>.first_frame.png``      the clean first frame (RGB uint8), which SVD-style training
                                   noise-augments and embeds at train time.
    ``<key>.image_embed.safetensors``  optional: tensor ``embed``, fp16 ``(D,)``, the image embedding of
                                   exactly the stored first frame (``vdiff encode --image-encoder``).
    ``<key>.json``                 :class:`VideoMeta` plus ``latent`` info (autoencoder name,
                                   scale/shift factors, downsampling) in ``extra["latent"]`` and, with an
                                   image embedding, its encoder in ``extra["image_embed"]``
                                   (:data:`IMAGE_EMBED_INFO_KEYS`: class, file path, sha256, layout, config,
                                   embedding width); the latent set's manifest records the same.

Actions follow the one schema of docs/architecture.md (SI units, + = left): per frame ``speed`` (m/s), ``yaw_rate``
(rad/s), ``steering`` (steering-wheel degrees), ``command`` (0 left, 1 straight, 2 right, 3 stop),
``trajectory`` (4 future positions at +0.5 s steps, metres, ego frame, x forward, y left) and
``goal`` (future position in the image, normalised pixel coordinates (x, y) in [0, 1]). In the json
each action present is a list with one entry per frame; an entry may be ``null`` where that frame
has no value, and a key that is absent is invalid for every frame.

Keys of ``extra`` with a meaning (others are free-form provenance): ``motion_score`` (the clip's curation
motion score, :func:`vdiff.data.convert.curation.motion_score`; a number, ``null``/NaN = unknown) with its
units ``motion_fps`` and ``motion_size``; ``latent`` and ``image_embed`` of latent samples (above).

Each shard set has a ``manifest.json`` (:class:`Manifest`) with the samples and frames per shard,
which the data modules use for epoch length.

Versions (``schema_version`` of every json; a reader refuses a version newer than its own):

1. The layout above without the ``extra`` keys' rules.
2. ``extra["motion_score"]`` is validated (a number or null; ``motion_fps`` and ``motion_size`` positive
   numbers), and a latent sample with ``<key>.image_embed.safetensors`` records its encoder in
   ``extra["image_embed"]`` (a mapping with at least ``sha256`` and ``embed_dim``), so a set embedded with
   another encoder than the model's can be refused. Version-1 samples read as before: a version-1 latent
   sample's embedding has no recorded encoder.

Reading is total: :meth:`VideoMeta.from_json` turns any bytes into a valid :class:`VideoMeta` or one
:class:`SchemaError` naming what is wrong (the data pipelines skip such a sample and count it as ``bad_json``),
never another exception: not json or not UTF-8, nesting deeper than the parser follows, a field of the wrong
type (``schema_version`` a positive integer, ``sample_type`` and ``source`` strings, ``fps`` a finite positive
number, ``width``/``height``/``num_frames`` positive integers up to :data:`MAX_COUNT`, ``actions`` and ``extra``
objects; ``extra["latent"]`` and ``extra["image_embed"]`` records), ``extra`` nested deeper than
:data:`MAX_EXTRA_DEPTH`, and action entries of the wrong shape or type, beyond float32's range, or a ``command``
other than 0..3 (:func:`action_values`).
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"


class SampleType(str, Enum):
    VIDEO = "video"
    LATENT = "latent"


# File extensions inside a sample (the part after ``<key>.``).
VIDEO_EXT = "mp4"
META_EXT = "json"
LATENTS_EXT = "latents.safetensors"
FIRST_FRAME_EXT = "first_frame.png"
IMAGE_EMBED_EXT = "image_embed.safetensors"

# Keys of ``VideoMeta.extra`` with a meaning (see the module docstring).
MOTION_SCORE_KEY = "motion_score"  # the clip's curation motion score (mean Farneback flow magnitude)
MOTION_FPS_KEY = "motion_fps"  # its units: flow measured between frames 1 / motion_fps seconds apart ...
MOTION_SIZE_KEY = "motion_size"  # ... on frames scaled to a shorter side of motion_size pixels
LATENT_INFO_KEY = "latent"  # latent samples: the autoencoder (vdiff encode)
IMAGE_EMBED_INFO_KEY = "image_embed"  # latent samples with an embedding: the image encoder (vdiff encode)
# What ``extra["image_embed"]`` holds: the encoder's class, weights file (absolute path when encoded; None for an
# encoder not read from a file), sha256 of that file, layout read, config (its fields) and where it came from,
# embedding width, and which frame was embedded ("first_frame").
IMAGE_EMBED_INFO_KEYS: tuple[str, ...] = (
    "encoder",
    "path",
    "sha256",
    "layout",
    "config",
    "config_source",
    "embed_dim",
    "frame",
)

COMMANDS: dict[str, int] = {"left": 0, "straight": 1, "right": 2, "stop": 3}
COMMAND_NAMES: tuple[str, ...] = ("left", "straight", "right", "stop")

# Per-frame shape of each action (empty tuple = one scalar per frame).
ACTION_SHAPES: dict[str, tuple[int, ...]] = {
    "speed": (),
    "yaw_rate": (),
    "steering": (),
    "command": (),
    "trajectory": (4, 2),
    "goal": (2,),
}
ACTION_KEYS: tuple[str, ...] = tuple(ACTION_SHAPES)
TRAJECTORY_STEP_S = 0.5  # seconds between trajectory waypoints

MAX_EXTRA_DEPTH = 32  # the free-form ``extra`` may nest lists and objects this deep (the other fields are typed)
MAX_COUNT = 2**31 - 1  # the largest width, height and num_frames
FLOAT32_MAX = float(np.finfo(np.float32).max)  # actions are float32: a larger magnitude would become an infinity


class SchemaError(ValueError):
    """A sample's metadata does not follow the schema; the message names the field."""


@dataclass
class VideoMeta:
    """The json half of a sample. ``actions[k]`` is a per-frame list (``None`` = unknown)."""

    fps: float
    width: int
    height: int
    num_frames: int
    source: str
    actions: dict[str, list[Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sample_type: str = SampleType.VIDEO.value
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> VideoMeta:
        """Raise :class:`SchemaError` naming the field unless every field follows the schema (any value of any
        type gives a SchemaError, never another exception); returns ``self``."""
        version = self.schema_version
        if not (_is_int(version) and version >= 1):
            raise SchemaError(f"schema_version must be a positive integer, got {_short(version)}")
        if version > SCHEMA_VERSION:
            raise SchemaError(f"schema_version {version} is newer than this vdiff ({SCHEMA_VERSION})")
        if not (isinstance(self.sample_type, str) and self.sample_type in {t.value for t in SampleType}):
            raise SchemaError(
                f"sample_type {_short(self.sample_type)} is not one of {[t.value for t in SampleType]}"
            )
        if not (is_finite_number(self.fps) and self.fps > 0):
            raise SchemaError(f"fps must be a positive number, got {_short(self.fps)}")
        for name in ("width", "height", "num_frames"):
            value = getattr(self, name)
            if not (_is_int(value) and 0 < value <= MAX_COUNT):
                raise SchemaError(f"{name} must be a positive integer (at most {MAX_COUNT}), got {_short(value)}")
        if not math.isfinite(self.num_frames / self.fps):
            raise SchemaError(f"fps {self.fps!r} is too small: {self.num_frames} frames would last forever")
        if not isinstance(self.source, str):
            raise SchemaError(f"source must be a string, got {_short(self.source)}")
        if not isinstance(self.extra, dict):
            raise SchemaError(f"extra must be a json object, got {type(self.extra).__name__}")
        if not json_depth_at_most(self.extra, MAX_EXTRA_DEPTH):
            raise SchemaError(f"extra nests lists and objects deeper than {MAX_EXTRA_DEPTH} levels")
        check_motion_extra(self.extra)
        if LATENT_INFO_KEY in self.extra:
            check_latent_info(self.extra[LATENT_INFO_KEY], "extra.latent")
        if IMAGE_EMBED_INFO_KEY in self.extra:
            check_image_embed_info(self.extra[IMAGE_EMBED_INFO_KEY], "extra.image_embed")
        if not isinstance(self.actions, dict):
            raise SchemaError(f"actions must be a json object {{action: per-frame list}}, got {_short(self.actions)}")
        for key, values in self.actions.items():
            if key not in ACTION_SHAPES:
                raise SchemaError(f"unknown action {_short(key)}; known: {list(ACTION_KEYS)}")
            if not isinstance(values, list) or len(values) != self.num_frames:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise SchemaError(f"action {key!r} needs one entry per frame ({self.num_frames}), got {got}")
            action_values(key, values)
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoMeta:
        if not isinstance(data, dict):
            raise SchemaError(f"metadata must be a json object, got {type(data).__name__}")
        missing = [k for k in ("fps", "width", "height", "num_frames", "source") if k not in data]
        if missing:
            raise SchemaError(f"metadata misses {missing}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"metadata has unknown fields {unknown}")
        return cls(**data).validate()

    @classmethod
    def from_json(cls, text: str | bytes) -> VideoMeta:
        """Parse and validate a sample's json; whatever the text holds, a bad one raises :class:`SchemaError`."""
        return cls.from_dict(parse_json(text, "metadata"))


class _RefusedNumber(ValueError):
    """A json number literal that :func:`parse_json` with ``strict_numbers`` refuses."""


def _refuse_constant(name: str) -> float:
    raise _RefusedNumber(f"{name} is not a number; write null for an unknown value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise _RefusedNumber(f"{text} is out of range (the largest magnitude is {FLOAT32_MAX:.7g})")
    return value


def json_depth_at_most(data: Any, limit: int) -> bool:
    """Whether ``data`` (parsed json) nests lists and objects at most ``limit`` levels deep (a scalar: 0); level by
    level, so any depth is measured without recursion."""
    level = [data] if isinstance(data, (dict, list)) else []
    for _ in range(limit):
        if not level:
            return True
        deeper: list[Any] = []
        for value in level:
            children = value.values() if isinstance(value, dict) else value
            deeper += [child for child in children if isinstance(child, (dict, list))]
        level = deeper
    return not level


def parse_json(text: str | bytes, what: str = "json", strict_numbers: bool = False) -> Any:
    """Parse json read from data (``what`` names it in messages): any text ends in its value or one
    :class:`SchemaError`, never another exception (invalid json or UTF-8, and nesting deeper than the parser's
    recursion can follow, are schema errors). ``strict_numbers``: also refuse ``NaN``/``Infinity`` and numbers
    beyond float32's range (in a file a person wrote such a value is a mistake, not an unknown)."""
    hooks = {"parse_constant": _refuse_constant, "parse_float": _finite_float} if strict_numbers else {}
    try:
        return json.loads(text, **hooks)
    except RecursionError as err:
        raise SchemaError(f"{what} is nested too deeply to parse ({err})") from None
    except _RefusedNumber as err:
        raise SchemaError(f"{what}: {err}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise SchemaError(f"{what} is not valid json: {err}") from None


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value read from data, cut to ``limit`` characters (for messages)."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A json number (not a bool) that is finite as a float (a huge integer is not)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _entry_array(key: str, entry: Any, frame: int) -> np.ndarray:
    """One non-null entry of action ``key`` as float64 of the action's shape; SchemaError naming the frame if not."""
    shape = ACTION_SHAPES[key]
    try:
        array = np.asarray(entry, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise SchemaError(f"action {key!r} at frame {frame}: {_short(entry)} is not numeric") from None
    if array.shape != shape:
        raise SchemaError(f"action {key!r} at frame {frame}: expected shape {shape}, got {array.shape}")
    return array


def action_values(key: str, entries: Sequence[Any], frames: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Entries of action ``key`` (one per frame, json values; ``frames``: their frame numbers for messages, default
    0, 1, ...) -> ``values`` float64 ``(N, *ACTION_SHAPES[key])`` and ``known`` bool ``(N,)``. An entry is unknown
    (zeros, not known) when it is ``null`` or holds NaN or an infinity.

    Raises :class:`SchemaError` naming the action and frame for an entry of the wrong shape or type, a number
    beyond float32's range (it would become an infinity), or a ``command`` that is not one of 0..3.
    """
    shape = ACTION_SHAPES[key]
    frames = range(len(entries)) if frames is None else frames
    values = np.zeros((len(entries), *shape), dtype=np.float64)
    known = np.zeros(len(entries), dtype=bool)
    present = [i for i, entry in enumerate(entries) if entry is not None]
    if not present:
        return values, known
    try:  # all entries at once; on failure, entry by entry for the message
        stacked = np.asarray([entries[i] for i in present], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        stacked = None
    if stacked is None or stacked.shape != (len(present), *shape):
        stacked = np.stack([_entry_array(key, entries[i], frames[i]) for i in present])
    flat = stacked.reshape(len(present), -1)
    finite = np.isfinite(flat)
    good = finite.all(axis=1)
    wrong = (finite & (np.abs(flat) > FLOAT32_MAX)).any(axis=1)
    problem = "is beyond float32's range"
    if key == "command" and not wrong.any():
        command = flat[:, 0]
        wrong = good & ((command != np.round(command)) | (command < 0) | (command >= len(COMMANDS)))
        problem = "is not one of 0..3"
    if wrong.any():
        i = present[int(np.argmax(wrong))]
        raise SchemaError(f"action {key!r} at frame {frames[i]}: {_short(entries[i])} {problem}")
    rows = np.asarray(present)[good]
    values[rows] = stacked[good]
    known[rows] = True
    return values, known


def check_motion_extra(extra: dict[str, Any]) -> None:
    """Raise :class:`SchemaError` unless ``extra``'s motion keys follow the schema (absent keys are fine)."""
    score = extra.get(MOTION_SCORE_KEY)
    if score is not None and not (isinstance(score, float) or is_finite_number(score)):  # NaN: unknown
        raise SchemaError(f"extra.{MOTION_SCORE_KEY} must be a number or null, got {_short(score)}")
    for key in (MOTION_FPS_KEY, MOTION_SIZE_KEY):
        value = extra.get(key)
        if value is not None and not (is_finite_number(value) and value > 0):
            raise SchemaError(f"extra.{key} must be a positive number, got {_short(value)}")


def motion_score_of(extra: dict[str, Any]) -> float:
    """The motion score stored in a sample json's ``extra`` (:data:`MOTION_SCORE_KEY`), NaN when unknown."""
    score = extra.get(MOTION_SCORE_KEY)
    return float(score) if _is_number(score) else math.nan


def check_latent_info(info: Any, where: str) -> dict[str, Any]:
    """Raise :class:`SchemaError` unless ``info`` is an autoencoder record (``extra["latent"]``): a json object
    whose ``spatial_downsample`` and ``temporal_downsample``, where given, are positive integers."""
    if not isinstance(info, dict):
        raise SchemaError(f"{where} must be a json object describing the autoencoder, got {type(info).__name__}")
    for key in ("spatial_downsample", "temporal_downsample"):
        value = info.get(key)
        if value is not None and not (_is_int(value) and 0 < value <= MAX_COUNT):
            raise SchemaError(f"{where}.{key} must be a positive integer, got {_short(value)}")
    return info


def check_image_embed_info(info: Any, where: str) -> dict[str, Any]:
    """Raise :class:`SchemaError` unless ``info`` is an image-encoder record (``extra["image_embed"]``)."""
    if not isinstance(info, dict):
        raise SchemaError(f"{where} must be a json object describing the image encoder, got {type(info).__name__}")
    sha256, width = info.get("sha256"), info.get("embed_dim")
    if not (sha256 is None or isinstance(sha256, str)):
        raise SchemaError(f"{where}.sha256 must be a string or null, got {_short(sha256)}")
    if not (_is_int(width) and width > 0):
        raise SchemaError(f"{where}.embed_dim must be a positive integer, got {_short(width)}")
    return info


def image_encoder_identity(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """What decides the embeddings of an image-encoder record: the weights' sha256 and the config (not the
    path: a moved file embeds the same). None for None."""
    if info is None:
        return None
    return {"sha256": info.get("sha256"), "config": info.get("config")}


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    num_samples: int
    num_frames: int


@dataclass
class Manifest:
    """Describes one shard set: a folder of ``<prefix>-NNNNNN.tar`` files plus this manifest."""

    shards: list[ShardInfo]
    sample_type: str = SampleType.VIDEO.value
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_frames(self) -> int:
        return sum(s.num_frames for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["total_samples"] = self.num_samples
        data["total_frames"] = self.num_frames
        return json.dumps(data, indent=1)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            data = parse_json(path.read_bytes(), str(path))
            shards = [ShardInfo(**s) for s in data["shards"]]
        except FileNotFoundError:
            raise FileNotFoundError(f"no shard manifest at {path}") from None
        except (SchemaError, KeyError, TypeError) as err:
            raise SchemaError(f"{path}: not a vdiff shard manifest ({err})") from err
        for info in shards:
            counts = (info.num_samples, info.num_frames)
            if not (isinstance(info.path, str) and all(_is_int(n) and n >= 0 for n in counts)):
                raise SchemaError(f"{path}: not a vdiff shard manifest (bad shard entry {_short(asdict(info))})")
        if not isinstance(data.get("extra", {}), dict):
            raise SchemaError(f"{path}: not a vdiff shard manifest (extra must be a json object)")
        return cls(
            shards=shards,
            sample_type=data.get("sample_type", SampleType.VIDEO.value),
            schema_version=data.get("schema_version", SCHEMA_VERSION),
            extra=data.get("extra", {}),
        )

    def shard_paths(self, folder: str | Path) -> list[str]:
        return [str(Path(folder) / s.path) for s in self.shards]
