"""Writing, locating and reading webdataset shard sets (the layout is defined in :mod:`vdiff.data.schema`).

:class:`ShardWriter` turns samples into ``<out_dir>/<prefix>-000000.tar, ...`` with count and size
limits and writes the set's ``manifest.json`` on close. :func:`expand_shard_spec` turns whatever a
user gives (a folder, a manifest, a brace pattern, a glob, a tar, or a list of them) into tar paths;
:func:`count_samples` reads epoch lengths from the manifests; :func:`iter_raw_samples` reads a tar
sample by sample, grouped the way webdataset groups files (``<key>.<ext>``).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from safetensors.torch import save as save_safetensors
from webdataset import TarWriter

from vdiff.data.schema import (
    FIRST_FRAME_EXT,
    IMAGE_EMBED_EXT,
    LATENTS_EXT,
    MANIFEST_NAME,
    META_EXT,
    VIDEO_EXT,
    Manifest,
    SampleType,
    SchemaError,
    ShardInfo,
    VideoMeta,
    parse_json,
)

_TAR_BLOCK = 512
_GLOB_CHARS = re.compile(r"[*?\[]")


def _tar_member_size(num_bytes: int, name_length: int) -> int:
    """Bytes a file takes inside a tar: a header block plus the data padded to whole blocks (names
    longer than 100 characters add an extended header of about two blocks)."""
    extra = 2 * _TAR_BLOCK if name_length > 100 else 0
    return extra + _TAR_BLOCK + -(-num_bytes // _TAR_BLOCK) * _TAR_BLOCK


def check_key(key: str) -> str:
    """Raise ValueError unless ``key`` can name a webdataset sample (non-empty, no dot, no leading '/')."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; webdataset splits file names at the first dot")
    if key.startswith("/") or key.endswith("/") or "//" in key or any(c.isspace() for c in key):
        raise ValueError(f"sample key {key!r} must be a relative name without whitespace or empty path parts")
    return key


class ShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-NNNNNN.tar`` shards and ``manifest.json`` on close.

    A new shard starts when the current one holds ``max_count`` samples or the next sample would
    push it past ``max_size`` bytes (a single sample larger than ``max_size`` gets a shard of its
    own). Shards are written under a ``.tmp`` name and renamed when complete; tar members carry a
    fixed mtime so the same samples give byte-identical shards. Use as a context manager; when the
    ``with`` block raises, the shards written so far are kept but no manifest is written (a
    manifest means the set is complete)::

        with ShardWriter("out/train", max_count=500) as writer:
            writer.write_video(key, encode_video(frames, fps), meta)
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        max_count: int = 1000,
        max_size: int = 1 << 30,
        sample_type: str = "video",
        extra: dict | None = None,
    ):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        valid_types = [t.value for t in SampleType]
        sample_type = SampleType(sample_type).value if isinstance(sample_type, SampleType) else sample_type
        if sample_type not in valid_types:
            raise ValueError(f"sample_type {sample_type!r} is not one of {valid_types}")
        if "." in prefix or "/" in prefix or not prefix:
            raise ValueError(f"shard prefix {prefix!r} must be a plain name without dots or slashes")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.max_size = max_size
        self.sample_type = sample_type
        self.extra = dict(extra or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if existing:
            raise FileExistsError(f"{self.out_dir} already holds shards ({existing[0].name}, ...); use an empty folder")
        self._shards: list[ShardInfo] = []
        self._keys: set[str] = set()
        self._file: io.BufferedWriter | None = None
        self._tar: TarWriter | None = None
        self._count = 0
        self._frames = 0
        self._size = 0
        self._manifest: Manifest | None = None
        self._closed_without_manifest = False

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # An error inside the with-block: keep the samples written so far (the open shard is
        # finished), but write no manifest, whose presence says that the writer completed.
        if self._manifest is None:
            self._finish_shard()
            self._closed_without_manifest = True

    # -- writing -----------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Samples written so far, over all shards."""
        return sum(s.num_samples for s in self._shards) + self._count

    @property
    def num_frames(self) -> int:
        """Frames written so far, over all shards (from each sample's metadata)."""
        return sum(s.num_frames for s in self._shards) + self._frames

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # also closes self._file
        name = self._shard_name(len(self._shards))
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        self._shards.append(ShardInfo(path=name, num_samples=self._count, num_frames=self._frames))
        self._tar, self._file = None, None
        self._count = self._frames = self._size = 0

    def _start_shard(self) -> None:
        name = self._shard_name(len(self._shards))
        self._file = open(self.out_dir / (name + ".tmp"), "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=0)  # int: a float adds a PAX header per file

    def _write(self, key: str, files: dict[str, bytes], num_frames: int) -> None:
        if self._manifest is not None or self._closed_without_manifest:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed")
        check_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written to {self.out_dir}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        for ext, data in files.items():
            if not ext or ext.startswith(".") or "/" in ext:
                raise ValueError(f"sample {key!r}: bad file extension {ext!r}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"sample {key!r}: {ext} must be bytes, got {type(data).__name__}")
        size = sum(_tar_member_size(len(data), len(key) + 1 + len(ext)) for ext, data in files.items())
        if self._tar is not None and (self._count >= self.max_count or self._size + size > self.max_size):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        assert self._tar is not None
        self._tar.write({"__key__": key, **{ext: bytes(data) for ext, data in files.items()}})
        self._keys.add(key)
        self._count += 1
        self._frames += num_frames
        self._size += size

    def _check_type(self, wanted: SampleType) -> None:
        if self.sample_type != wanted.value:
            raise ValueError(f"this ShardWriter writes {self.sample_type!r} samples, not {wanted.value!r}")

    def write_video(self, key: str, mp4: bytes, meta: VideoMeta) -> None:
        """Write a video sample: ``<key>.mp4`` (H.264 yuv420p bytes) and ``<key>.json`` (``meta``)."""
        self._check_type(SampleType.VIDEO)
        if not mp4:
            raise ValueError(f"sample {key!r}: mp4 is empty")
        meta = dataclasses.replace(meta, sample_type=SampleType.VIDEO.value).validate()
        self._write(key, {VIDEO_EXT: mp4, META_EXT: meta.to_json().encode()}, meta.num_frames)

    def write_latent(
        self,
        key: str,
        mean: torch.Tensor,
        std: torch.Tensor,
        first_frame: np.ndarray,
        meta: VideoMeta,
        image_embed: torch.Tensor | None = None,
    ) -> None:
        """Write a latent sample (see :mod:`vdiff.data.schema`).

        ``mean``/``std``: ``(T, c, h, w)`` posterior in unscaled latent space, stored fp16 in
        ``<key>.latents.safetensors``; ``first_frame``: ``(H, W, 3)`` uint8 RGB, stored as PNG;
        ``image_embed``: optional ``(D,)`` (or ``(1, D)``) embedding, stored fp16 as tensor ``embed``.
        Autoencoder details belong in ``meta.extra["latent"]``.
        """
        self._check_type(SampleType.LATENT)
        if mean.ndim != 4 or mean.shape != std.shape:
            raise ValueError(
                f"sample {key!r}: mean and std must both be (T, c, h, w), got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        first_frame = np.asarray(first_frame)
        if first_frame.ndim != 3 or first_frame.shape[-1] != 3 or first_frame.dtype != np.uint8:
            raise ValueError(
                f"sample {key!r}: first_frame must be (H, W, 3) uint8, got {first_frame.shape} {first_frame.dtype}"
            )
        meta = dataclasses.replace(meta, sample_type=SampleType.LATENT.value).validate()
        tensors = {
            "mean": mean.detach().to("cpu", torch.float16).contiguous(),
            "std": std.detach().to("cpu", torch.float16).contiguous(),
        }
        png = io.BytesIO()
        Image.fromarray(first_frame, mode="RGB").save(png, format="PNG")
        files = {
            LATENTS_EXT: save_safetensors(tensors),
            FIRST_FRAME_EXT: png.getvalue(),
            META_EXT: meta.to_json().encode(),
        }
        if image_embed is not None:
            embed = image_embed.detach().to("cpu", torch.float16).contiguous()
            files[IMAGE_EMBED_EXT] = save_safetensors({"embed": embed})
        self._write(key, files, meta.num_frames)

    def write_raw(self, key: str, files: dict[str, bytes]) -> None:
        """Write arbitrary files for a sample, unchecked (tests use it to inject bad samples).

        Frames counted for the manifest come from ``files["json"]`` where it parses, else 0.
        """
        self._write(key, files, declared_frames(files))

    def close(self) -> Manifest:
        """Finish the last shard, write ``manifest.json``, and return the manifest (idempotent)."""
        if self._closed_without_manifest:
            raise RuntimeError(f"ShardWriter for {self.out_dir} stopped on an error; it wrote no manifest")
        if self._manifest is None:
            self._finish_shard()
            self._manifest = Manifest(shards=list(self._shards), sample_type=self.sample_type, extra=self.extra)
            self._manifest.save(self.out_dir)
        return self._manifest


# ----------------------------------------------------------------------------------------------
# Locating shards
# ----------------------------------------------------------------------------------------------


class NoShardsError(FileNotFoundError):
    """A shard spec that matches no shard file. ``spec``: the spec; ``missing``: nothing exists at that
    path (else it is a folder, or a glob, without ``.tar`` shards)."""

    def __init__(self, message: str, spec: str = "", missing: bool = False) -> None:
        super().__init__(message)
        self.spec = spec
        self.missing = missing


def _expand_one(spec: str) -> list[str]:
    if "{" in spec and ".." in spec:
        paths = list(braceexpand(spec))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"shard spec {spec!r}: {len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})"
            )
        return paths
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, MANIFEST_NAME)):
            return Manifest.load(spec).shard_paths(spec)
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    if os.path.isfile(spec):
        if spec.endswith(".json"):
            folder = os.path.dirname(spec) or "."
            manifest = Manifest.load(spec)
            return manifest.shard_paths(folder)
        if spec.endswith(".tar"):
            return [spec]
        raise ValueError(f"shard spec {spec!r} is a file but neither a .tar shard nor a manifest .json")
    if _GLOB_CHARS.search(spec):
        return sorted(p for p in glob.glob(spec) if p.endswith(".tar") and os.path.isfile(p))
    return []


def expand_shard_spec(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Tar paths named by ``spec``: a folder (its manifest, else its ``*.tar``), a manifest json, a
    brace pattern (``a/shard-{000000..000009}.tar``), a glob, a single tar, or a list of these.

    Returns sorted, de-duplicated, normalised paths. Raises FileNotFoundError naming the spec when
    it matches nothing (:class:`NoShardsError`, saying whether the path is missing or holds no shards)
    or a brace pattern names a missing shard.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("empty shard spec: give a folder, manifest, brace pattern, glob or tar path")
    paths: set[str] = set()
    for item in specs:
        item = os.fspath(item)
        found = _expand_one(item)
        if not found:
            missing = not os.path.exists(item) and not _GLOB_CHARS.search(item)
            hint = ": no such file or folder" if missing else ""
            if os.path.isdir(item):
                hint = ": the folder holds no .tar shards and no manifest"
                subsets = sorted(d for d in os.listdir(item) if os.path.isfile(os.path.join(item, d, MANIFEST_NAME)))
                if subsets:
                    hint = f"; it holds shard sets in subfolders {subsets}: name one, e.g. {os.path.join(item, subsets[0])}"
            raise NoShardsError(f"shard spec {item!r} matches no shard (.tar) file{hint}", item, missing)
        for path in found:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard spec {item!r} names {path}, which does not exist")
            paths.add(os.path.normpath(path))
    return sorted(paths)


def _manifest_entry(tar_path: str, cache: dict[str, Manifest | None]) -> tuple[Manifest, ShardInfo] | None:
    """The manifest in the shard's folder and the manifest's entry for this shard, if both exist."""
    folder = os.path.dirname(os.path.abspath(tar_path))
    if folder not in cache:
        try:
            cache[folder] = Manifest.load(folder)
        except (FileNotFoundError, SchemaError):
            cache[folder] = None
    manifest = cache[folder]
    if manifest is None:
        return None
    name = os.path.basename(tar_path)
    for info in manifest.shards:
        if os.path.normpath(info.path) == name:
            return manifest, info
    return None


def load_manifests(spec: str | Path | Sequence[str | Path]) -> list[Manifest] | None:
    """The distinct manifests covering the shards of ``spec``; None if some shard is in no manifest."""
    cache: dict[str, Manifest | None] = {}
    manifests: list[Manifest] = []
    for path in expand_shard_spec(spec):
        entry = _manifest_entry(path, cache)
        if entry is None:
            return None
        if not any(m is entry[0] for m in manifests):
            manifests.append(entry[0])
    return manifests


def shard_counts(spec: str | Path | Sequence[str | Path]) -> list[ShardInfo]:
    """Samples and frames of each shard of ``spec`` (absolute paths), from manifests or by reading the tar."""
    cache: dict[str, Manifest | None] = {}
    counts = []
    for path in expand_shard_spec(spec):
        entry = _manifest_entry(path, cache)
        if entry is not None:
            counts.append(ShardInfo(path=path, num_samples=entry[1].num_samples, num_frames=entry[1].num_frames))
            continue
        samples = frames = 0
        for _, files in iter_raw_samples(path):
            samples += 1
            frames += declared_frames(files)
        counts.append(ShardInfo(path=path, num_samples=samples, num_frames=frames))
    return counts


def manifest_sample_counts(paths: Sequence[str | Path]) -> dict[str, int]:
    """``{path: samples}`` for each shard of ``paths`` that its folder's manifest lists (others are left
    out): what a complete read of the tar must yield. Keys are the paths as given."""
    cache: dict[str, Manifest | None] = {}
    counts = {}
    for path in paths:
        entry = _manifest_entry(os.fspath(path), cache)
        if entry is not None:
            counts[os.fspath(path)] = entry[1].num_samples
    return counts


def count_samples(spec: str | Path | Sequence[str | Path]) -> tuple[int, int]:
    """``(samples, frames)`` of the shards of ``spec``: from manifests, else by reading each tar."""
    counts = shard_counts(spec)
    return sum(c.num_samples for c in counts), sum(c.num_frames for c in counts)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into ``(key, ext)`` the way webdataset does (first dot of the basename)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext


def iter_raw_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of a tar, grouping consecutive files by key.

    Streams the tar (constant memory). Raises ValueError naming the file when the tar is unreadable
    or truncated; samples before the damage are yielded first. A tar cut exactly at a file boundary
    reads as a complete, shorter tar (tarfile takes the cut for the end of the archive): compare the
    samples read with the manifest (:func:`manifest_sample_counts`) to notice it.
    """
    tar_path = os.fspath(tar_path)
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if member_key != key and key is not None:
                    yield key, files
                    files = {}
                key = member_key
                handle = tar.extractfile(member)
                assert handle is not None
                files[ext] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"shard {tar_path} is unreadable or truncated: {err}") from err
    if key is not None:
        yield key, files


def declared_frames(files: dict[str, bytes]) -> int:
    """The ``num_frames`` a raw sample's json declares (checked no further), 0 when it has no json, the json does
    not parse or the field is not a positive integer: such a sample counts as a sample with no frames."""
    try:
        frames = parse_json(files[META_EXT], "metadata")["num_frames"]
    except (KeyError, TypeError, SchemaError):
        return 0
    return frames if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else 0


def read_json_meta(files: dict[str, bytes]) -> VideoMeta:
    """The :class:`VideoMeta` of a raw sample; SchemaError naming the problem if missing or malformed."""
    if META_EXT not in files:
        raise SchemaError(f"sample has no {META_EXT} (files: {sorted(files)})")
    return VideoMeta.from_json(files[META_EXT])


def dump_json(obj: Any) -> bytes:
    """Compact json bytes (for ``write_raw`` callers)."""
    return json.dumps(obj, separators=(",", ":")).encode()
