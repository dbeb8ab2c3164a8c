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
    ``<key>.image_embed.safetensors``  optional precomputed image embedding (tensor ``embed``).
    ``<key>.json``                 :class:`VideoMeta` plus ``latent`` info (autoencoder name,
                                   scale/shift factors, downsampling).

Actions follow DESIGN.md's one schema (SI units, + = left): per frame ``speed`` (m/s), ``yaw_rate``
(rad/s), ``steering`` (steering-wheel degrees), ``command`` (0 left, 1 straight, 2 right, 3 stop),
``trajectory`` (4 future positions at +0.5 s steps, metres, ego frame, x forward, y left) and
``goal`` (future position in the image, normalised pixel coordinates (x, y) in [0, 1]). In the json
each action present is a list with one entry per frame; an entry may be ``null`` where that frame
has no value, and a key that is absent is invalid for every frame.

Each shard set has a ``manifest.json`` (:class:`Manifest`) with the samples and frames per shard,
which the data modules use for epoch length.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
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

    def validate(self) -> "VideoMeta":
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
    def from_dict(cls, data: dict[str, Any]) -> "VideoMeta":
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
    def from_json(cls, text: str | bytes) -> "VideoMeta":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SchemaError(f"metadata is not valid json: {err}") from err
        return cls.from_dict(data)


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
    def load(cls, path: str | Path) -> "Manifest":
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
