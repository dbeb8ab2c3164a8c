"""Read and write state dicts: ``.safetensors`` (preferred), ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``; hash files.

Torch checkpoints are opened with ``weights_only=True`` (no arbitrary code runs); wrapper dicts such as
Lightning's / sgm's ``{"state_dict": {...}}`` are unwrapped. Relative paths that do not exist are also looked
up in ``$VDIFF_WEIGHTS``; hub ids (``hf://ORG/NAME/...``) and the downloadable presets' names are fetched on first use
(:func:`resolve_weights_path`).

Every safetensors file vdiff reads is opened by :func:`open_safetensors` (or :func:`read_safetensors` on top of
it): a truncated, empty or corrupt file raises :class:`WeightsFileError` naming the file and its size, where
safetensors' own error (``incomplete metadata``, ``header too small``) names none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vdiff.weights.errors import WeightsError

WEIGHTS_ENV = "VDIFF_WEIGHTS"
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
HASH_CHUNK = 1 << 20  # 1 MiB
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint's index: {"weight_map": {name: shard file}}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory, any file size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class WeightsFileError(WeightsError):
    """A weights file that exists but cannot be read (truncated, empty, not safetensors); the message names it."""


def open_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``safetensors.safe_open(path, framework="pt", device=device)``: a handle with ``keys()``, ``get_tensor()``,
    ``get_slice()`` and ``metadata()``, usable in a ``with`` block or kept open. An unreadable file (truncated by
    an interrupted copy, empty, corrupt header) raises :class:`WeightsFileError` naming the file and its size."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as e:
        try:
            size = f"{os.path.getsize(path)} bytes"
        except OSError:
            size = "size unknown"
        raise WeightsFileError(
            f"{path}: not a readable safetensors file ({size}; {e}). A truncated or empty file is usually an "
            f"interrupted copy or download: copy it again."
        ) from e
    except OSError as e:
        if str(path) in str(e):
            raise
        raise OSError(e.errno, f"{path}: cannot be read as a safetensors file ({e})") from e


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", select: Callable[[str], bool] | None = None
) -> dict[str, Tensor]:
    """The tensors of a safetensors file (those whose names ``select`` accepts: only they are read), opened by
    :func:`open_safetensors` (errors name the file). No ``$VDIFF_WEIGHTS`` lookup: see :func:`load_state_dict`."""
    with open_safetensors(path, device) as f:
        return {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)}  # noqa: SIM118


def resolve_weights_path(path: str | os.PathLike, what: str = "weights", allow_dir: bool = False) -> Path:
    """The local file (or, with ``allow_dir``, folder: e.g. a diffusers model folder) that a weights path names.

    * a hub id ``hf://ORG/NAME[@REVISION][/PATH]``: the file or folder in huggingface_hub's cache, downloaded on first
      use (only what vdiff's readers read: :mod:`vdiff.weights.hub`);
    * a path: as given, else ``$VDIFF_WEIGHTS/path`` for a relative one;
    * a bare name of a downloadable preset (``i3d_torchscript.pt``, ``alexnet-owt-7be5be79.pth``, or the preset's
      name, :mod:`vdiff.weights.registry`) found in neither place: its file in the weights cache, downloaded and
      verified on first use.

    Raises :class:`MissingWeightsError` (a FileNotFoundError) naming every place tried and what to do; offline it
    also names the URL or hub id to fetch and the folder to put it in.
    """
    text = os.fspath(path)
    if text.startswith("hf:/"):
        from vdiff.weights.hub import resolve_hub_path

        local = resolve_hub_path(text, what)
        if local.is_dir() and not allow_dir:
            raise IsADirectoryError(f"{what}: {text} is a folder ({local}); a file is expected: {text.rstrip('/')}/FILE")
        return local
    p = Path(text).expanduser()

    def found(candidate: Path) -> bool:
        return candidate.is_file() or (allow_dir and candidate.is_dir())

    if found(p):
        return p
    root = os.environ.get(WEIGHTS_ENV)
    tried = [str(p)]
    if root and not p.is_absolute():
        candidate = Path(root).expanduser() / p
        if found(candidate):
            return candidate
        tried.append(str(candidate))
    from vdiff.weights.registry import cached_file, fetch, url_preset

    preset = url_preset(text)
    if preset is None:
        raise MissingWeightsError(what, tried)
    from vdiff.weights.download import WeightsUnavailableError

    tried.append(str(cached_file(preset)))
    try:
        return fetch(preset)
    except WeightsUnavailableError as err:
        raise MissingWeightsError(what, tried, advice=f"{err}.") from None


LOCAL_ADVICE = (
    f"copy the file there, pass an absolute path or a hub id (hf://ORG/NAME/FILE), or set {WEIGHTS_ENV} to the "
    "directory that holds it."
)


class MissingWeightsError(FileNotFoundError):
    """A weights file found neither at its path nor under ``$VDIFF_WEIGHTS``: ``what`` file, the paths ``tried``,
    and a ``note`` on where the file comes from (may be empty); ``advice`` replaces the default one (how to fetch a
    downloadable file). ``str()`` is the whole message."""

    def __init__(self, what: str, tried: list[str], note: str = "", advice: str | None = None) -> None:
        root = os.environ.get(WEIGHTS_ENV)
        self.what, self.tried, self.note, self.advice = what, list(tried), note, advice
        self.where = f"${WEIGHTS_ENV}={root}" if root else f"${WEIGHTS_ENV} is not set"
        text = advice if advice is not None else LOCAL_ADVICE[0].upper() + LOCAL_ADVICE[1:]
        super().__init__(f"{what} not found: {' or '.join(self.tried)} ({self.where}). {text}" + (f" {note}" if note else ""))


def gather_missing_files(loaders: Sequence[Callable[[], Any]]) -> list[Any]:
    """Call every loader and return their results; when loaders fail for missing files (FileNotFoundError), raise
    one FileNotFoundError that names every missing file, not only the first (one error: that error itself)."""
    results, missing = [], []
    for load in loaders:
        try:
            results.append(load())
        except FileNotFoundError as err:
            missing.append(err)
            results.append(None)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        items = [
            f"{err.what}: {' or '.join(err.tried)}" + (f" ({err.note.removeprefix('The file is ').rstrip('.')})" if err.note else "")
            + (f" ({err.advice.rstrip('.')})" if err.advice else "")
            if isinstance(err, MissingWeightsError)
            else str(err).rstrip(".")
            for err in missing
        ]
        weights = next((err for err in missing if isinstance(err, MissingWeightsError)), None)
        advice = (
            f" ({weights.where}). Copy the files there, pass absolute paths or hub ids (hf://ORG/NAME/FILE), or set "
            f"{WEIGHTS_ENV} to the directory that holds them."
            if weights is not None
            else "."
        )
        raise FileNotFoundError(f"{len(missing)} files are missing: " + "; ".join(items) + advice)
    return results


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, dict):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj  # type: ignore[return-value]
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            if tensors:
                return tensors
            break
        obj = inner
    raise ValueError(f"{path}: no tensor state dict found (looked inside keys {WRAPPER_KEYS})")


def load_state_dict(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    select: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Load a flat ``{name: tensor}`` dict from a safetensors file, a torch checkpoint, or the shards a
    diffusers / transformers ``*.index.json`` names (its ``weight_map``).

    ``select`` keeps only the names it accepts; a safetensors file then reads only those tensors (e.g. the
    autoencoder of a 10 GB SVD checkpoint), a torch checkpoint is read whole and filtered.
    """
    p = resolve_weights_path(path)
    if p.name.endswith(INDEX_SUFFIX):
        try:
            shards = sorted(set(json.loads(p.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise WeightsFileError(f"{p}: not a readable shard index with a 'weight_map' ({e})") from None
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_state_dict(p.parent / shard, map_location, select))
        return out
    if p.suffix == ".safetensors":
        return read_safetensors(p, map_location, select)
    if select is not None:
        return {k: v for k, v in load_state_dict(p, map_location).items() if select(k)}
    if p.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # pickle of non-tensor objects (e.g. a full Lightning checkpoint with callbacks)
            raise ValueError(
                f"{p}: cannot be read with torch.load(weights_only=True) ({e}). Re-save its state dict "
                f"(torch.save(ckpt['state_dict'], ...) or safetensors) in a trusted environment."
            ) from e
        return _unwrap(obj, p)
    raise ValueError(f"{p}: unknown weights format {p.suffix!r}; use .safetensors or one of {TORCH_SUFFIXES}")


class LazyStateDict:
    """The tensors of one local weights file by name, each read when asked: names and shapes come from a safetensors
    file's header (the file is opened once), a torch checkpoint is loaded once. ``name in``, iteration, ``[name]``
    and ``shape(name)`` (what :class:`~vdiff.weights.template.KeyMapper` reads). ``rename`` gives each file key the
    name it is known by (``clashes`` lists the keys two of which get one name; the last one wins)."""

    def __init__(self, path: str | os.PathLike, rename: Callable[[str], str] | None = None) -> None:
        self.path = Path(path)
        self._all = None if self.path.suffix == ".safetensors" else load_state_dict(self.path)
        self._handle = None
        self.file_keys: dict[str, str] = {}  # name -> file key
        self.clashes: list[str] = []
        for key in self._all if self._all is not None else self._file().keys():
            name = rename(key) if rename is not None else key
            if name in self.file_keys:
                self.clashes.append(f"{key} and {self.file_keys[name]}")
            self.file_keys[name] = key

    def _file(self):
        if self._handle is None:
            self._handle = open_safetensors(self.path)
        return self._handle

    def __contains__(self, name: object) -> bool:
        return name in self.file_keys

    def __iter__(self):
        return iter(self.file_keys)

    def __getitem__(self, name: str) -> Tensor:
        key = self.file_keys[name]
        return self._all[key] if self._all is not None else self._file().get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        key = self.file_keys[name]
        if self._all is not None:
            return tuple(self._all[key].shape)
        return tuple(self._file().get_slice(key).get_shape())


def load_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a weights file: read from the header of a safetensors file (no tensor is loaded),
    from the loaded state dict of a torch checkpoint."""
    p = resolve_weights_path(path)
    if p.suffix == ".safetensors":
        with open_safetensors(p) as f:
            return list(f.keys())
    return list(load_state_dict(p))


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other formats)."""
    p = resolve_weights_path(path)
    if p.suffix != ".safetensors":
        return {}
    with open_safetensors(p) as f:
        return dict(f.metadata() or {})


def save_state_dict(
    state_dict: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` to ``path`` (safetensors for ``.safetensors``, else ``torch.save``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}  # safetensors needs contiguous
        save_file(tensors, str(p), metadata=metadata)
    else:
        torch.save({k: v.detach() for k, v in state_dict.items()}, p)
