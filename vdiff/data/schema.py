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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

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
        if self.schema_version > SCHEMA_VERSION:
            raise SchemaError(f"schema_version {self.schema_version} is newer than this vdiff ({SCHEMA_VERSION})")
        if self.sample_type not in {t.value for t in SampleType}:
            raise SchemaError(f"sample_type {self.sample_type!r} is not one of {[t.value for t in SampleType]}")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise SchemaError(f"fps must be a positive number, got {self.fps!r}")
        for name in ("width", "height", "num_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SchemaError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.extra, dict):
            raise SchemaError(f"extra must be a json object, got {type(self.extra).__name__}")
        check_motion_extra(self.extra)
        if IMAGE_EMBED_INFO_KEY in self.extra:
            check_image_embed_info(self.extra[IMAGE_EMBED_INFO_KEY], "extra.image_embed")
        for key, values in self.actions.items():
            if key not in ACTION_SHAPES:
                raise SchemaError(f"unknown action {key!r}; known: {list(ACTION_KEYS)}")
            if not isinstance(values, list) or len(values) != self.num_frames:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise SchemaError(f"action {key!r} needs one entry per frame ({self.num_frames}), got {got}")
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
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SchemaError(f"metadata is not valid json: {err}") from err
        return cls.from_dict(data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_motion_extra(extra: dict[str, Any]) -> None:
    """Raise :class:`SchemaError` unless ``extra``'s motion keys follow the schema (absent keys are fine)."""
    score = extra.get(MOTION_SCORE_KEY)
    if score is not None and not _is_number(score):
        raise SchemaError(f"extra.{MOTION_SCORE_KEY} must be a number or null, got {score!r}")
    for key in (MOTION_FPS_KEY, MOTION_SIZE_KEY):
        value = extra.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise SchemaError(f"extra.{key} must be a positive number, got {value!r}")


def motion_score_of(extra: dict[str, Any]) -> float:
    """The motion score stored in a sample json's ``extra`` (:data:`MOTION_SCORE_KEY`), NaN when unknown."""
    score = extra.get(MOTION_SCORE_KEY)
    return float(score) if _is_number(score) else math.nan


def check_image_embed_info(info: Any, where: str) -> dict[str, Any]:
    """Raise :class:`SchemaError` unless ``info`` is an image-encoder record (``extra["image_embed"]``)."""
    if not isinstance(info, dict):
        raise SchemaError(f"{where} must be a json object describing the image encoder, got {type(info).__name__}")
    sha256, width = info.get("sha256"), info.get("embed_dim")
    if not (sha256 is None or isinstance(sha256, str)):
        raise SchemaError(f"{where}.sha256 must be a string or null, got {sha256!r}")
    if not (isinstance(width, int) and not isinstance(width, bool) and width > 0):
        raise SchemaError(f"{where}.embed_dim must be a positive integer, got {width!r}")
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
            data = json.loads(path.read_text())
            shards = [ShardInfo(**s) for s in data["shards"]]
        except FileNotFoundError:
            raise FileNotFoundError(f"no shard manifest at {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SchemaError(f"{path}: not a vdiff shard manifest ({err})") from err
        return cls(
            shards=shards,
            sample_type=data.get("sample_type", SampleType.VIDEO.value),
            schema_version=data.get("schema_version", SCHEMA_VERSION),
            extra=data.get("extra", {}),
        )

    def shard_paths(self, folder: str | Path) -> list[str]:
        return [str(Path(folder) / s.path) for s in self.shards]
