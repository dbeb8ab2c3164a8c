"""Hugging Face hub ids as weights paths: ``hf://ORG/NAME[@REVISION][/PATH]`` -> a local file or folder.

Wherever vdiff takes a weights path it also takes a hub id (:func:`vdiff.weights.safetensors_io.resolve_weights_path`
hands it here before any reader runs), in huggingface_hub's own URI grammar (model repositories; ``@REVISION`` is a
branch, tag, commit or ``refs/pr/N``)::

    hf://stabilityai/stable-video-diffusion-img2vid-xt          a diffusers pipeline: unet/, vae/, image_encoder/
    hf://stabilityai/stable-video-diffusion-img2vid-xt/unet     one model folder of it
    hf://OpenDriveLab/Vista/vista.safetensors                   one file
    hf://stabilityai/stable-video-diffusion-img2vid-xt@9e43909/vae

The result is a path in huggingface_hub's cache (``$HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/...``), so the
folder readers find ``unet/config.json`` and its weights exactly as in a local folder, and everything else about the
hub is the library's: ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``, the token of ``huggingface-cli login`` or
``HF_TOKEN``, its locks, progress bars and checks. A PATH whose last part ends in a weights or JSON suffix is a file;
anything else is a folder.

Only what the readers read is downloaded (:func:`select_files`): every ``*.json`` below the folder, and in each model
folder (one holding ``config.json``) the one weights file the reader picks, in the readers' order (full-precision
``*.safetensors`` before a shard index, fp16 variants, ``.bin``); a shard index brings its shards. A pipeline's
fp16 variants, its single-file checkpoints at the repository root, README images are not fetched. A bare
``diffusion_pytorch_model*`` / ``model*`` file brings the ``config.json`` beside it (the readers read it).

Offline (``HF_HUB_OFFLINE=1``) the cache alone answers: the files present in the snapshot of the revision
(``refs/<branch>``). What is not cached is a :class:`~vdiff.weights.download.WeightsUnavailableError` naming the id, the
cache folder and the command that fetches it. A gated repository (SVD's licence) is one line naming the page to accept
it on and ``huggingface-cli login``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vdiff.weights.download import CHUNK, WeightsUnavailableError, offline
from vdiff.weights.registry import HUB_SCHEME

FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
CONFIG = "config.json"
BARE_MODEL_FILES = ("diffusion_pytorch_model", "model.", "pytorch_model")  # read with the config.json beside them
_ID = re.compile(r"^hf:/+")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class GatedWeightsError(PermissionError):
    """A gated repository whose licence this account has not accepted (or no token was sent)."""


@dataclass(frozen=True)
class HubId:
    """A parsed ``hf://ORG/NAME[@REVISION][/PATH]``: ``repo_id`` ``ORG/NAME``, ``revision`` (None: main) and ``path``
    inside the repository (``""``: its root)."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{HUB_SCHEME}{self.repo_id}{at}" + (f"/{self.path}" if self.path else "")

    @property
    def is_file(self) -> bool:
        return PurePosixPath(self.path).suffix in FILE_SUFFIXES

    @property
    def page(self) -> str:
        return f"{endpoint()}/{self.repo_id}"


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether a weights path is a hub id (``hf://...``; also ``hf:/...``, what ``pathlib`` makes of one)."""
    return bool(_ID.match(os.fspath(path)))


def parse_hub_id(text: str | os.PathLike | HubId) -> HubId:
    """``hf://ORG/NAME[@REVISION][/PATH]`` -> :class:`HubId` (a HubId is returned as it is); ValueError naming the
    text and the grammar."""
    if isinstance(text, HubId):
        return text
    raw = os.fspath(text)
    body = _ID.sub("", raw)
    grammar = "expected hf://ORG/NAME[@REVISION][/PATH] (a model repository)"
    parts = body.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1] or parts[0] in ("datasets", "spaces", "buckets"):
        raise ValueError(f"{raw}: not a hub id; {grammar}")
    org, name, rest = parts[0], parts[1], parts[2:]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if revision == "refs" and len(rest) >= 2 and rest[0] in ("pr", "convert"):
            revision, rest = f"refs/{rest[0]}/{rest[1]}", rest[2:]
        if not revision:
            raise ValueError(f"{raw}: empty revision after '@'; {grammar}")
    while rest and not rest[-1]:
        rest = rest[:-1]  # a trailing slash
    if any(p in ("", ".", "..") for p in rest) or not re.fullmatch(r"[\w.-]+", org) or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"{raw}: not a hub id; {grammar}")
    return HubId(f"{org}/{name}", revision, "/".join(rest))


def endpoint() -> str:
    """The hub's address: ``$HF_ENDPOINT`` (read now), else https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read now as the library reads it at import: ``$HF_HUB_CACHE``, else
    ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    folder = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def repo_cache_folder(repo_id: str) -> Path:
    """``<cache>/models--ORG--NAME``, the library's layout."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def hub_id_of_cached_path(path: str | os.PathLike) -> HubId | None:
    """The hub id of a file in huggingface_hub's cache layout (``.../models--ORG--NAME/snapshots/<commit>/PATH``), at
    that commit: how a checkpoint that recorded a cached file finds it again on another machine. None otherwise."""
    parts = Path(path).parts
    for i in range(len(parts) - 3):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and _COMMIT.match(parts[i + 2]):
            org_name = parts[i][len("models--") :].split("--")
            if len(org_name) == 2 and i + 3 < len(parts):
                return HubId("/".join(org_name), parts[i + 2], "/".join(parts[i + 3 :]))
    return None


# ------------------------------------------------------------------------------------------------ selection


def weights_preference() -> tuple[str, ...]:
    """The weights file names vdiff's folder readers look for, in their order (diffusers' then transformers')."""
    from vdiff.weights import clip, unet_svd

    transformers = (clip.TRANSFORMERS_WEIGHTS[0], clip.TRANSFORMERS_INDEX, *clip.TRANSFORMERS_WEIGHTS[1:])
    return (*unet_svd.DIFFUSERS_WEIGHTS, *transformers)


def select_files(files: Iterable[str], folder: str = "") -> list[str]:
    """The files of a repository listing (POSIX paths) below ``folder`` that vdiff's readers read (module docstring):
    every ``*.json``, and each model folder's preferred weights file; a folder with no ``config.json`` below it gives
    all its files. Sorted; empty when nothing is below ``folder``."""
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    below = sorted(f for f in files if f.startswith(prefix))
    models = _model_folders(below)
    if not models:
        return below
    chosen = {f for f in below if f.endswith(".json")}
    for model, pick in models.items():
        if pick is not None:
            chosen.add(pick if model == "." else f"{model}/{pick}")
    return sorted(chosen)


def _model_folders(files: list[str]) -> dict[str, str | None]:
    """``{folder: the weights file name its reader picks, or None}`` for every folder of ``files`` holding
    ``config.json`` (``"."`` is the top)."""
    preference = weights_preference()
    folders: dict[str, set[str]] = {}
    for f in files:
        path = PurePosixPath(f)
        folders.setdefault(str(path.parent), set()).add(path.name)
    return {
        folder: next((name for name in preference if name in names), None)
        for folder, names in folders.items()
        if CONFIG in names
    }


def _shards(index_files: Iterable[Path], snapshot: Path) -> list[str]:
    """Repository paths of the shards that the ``*.index.json`` files (local paths in ``snapshot``) name."""
    out = set()
    for index in index_files:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a readable shard index ({error})") from None
        folder = index.parent.relative_to(snapshot)
        out |= {str(folder / shard) if str(folder) != "." else shard for shard in set(weight_map.values())}
    return sorted(out)


# ------------------------------------------------------------------------------------------------ resolving


def _snapshot(hub: HubId) -> Path | None:
    """The cached snapshot folder of the id's revision (``refs/<revision>`` names its commit), or None."""
    repo = repo_cache_folder(hub.repo_id)
    revision = hub.revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    if commit is None:
        try:
            commit = (repo / "refs" / revision).read_text().strip()
        except OSError:
            return None
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def _local_listing(snapshot: Path) -> list[str]:
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def cached_hub_path(text: str | os.PathLike | HubId) -> Path | None:
    """Where a hub id is in the cache now (no network): the file, or the folder when every model folder in it has its
    weights file; None when it is not (fully) cached."""
    hub = parse_hub_id(text)
    snapshot = _snapshot(hub)
    if snapshot is None:
        return None
    local = snapshot / hub.path
    if hub.is_file:
        return local if local.is_file() else None
    if not local.is_dir():
        return None
    prefix = f"{hub.path}/" if hub.path else ""
    below = [f for f in _local_listing(snapshot) if f.startswith(prefix)]
    return local if below and None not in _model_folders(below).values() else None


def _unavailable(hub: HubId, what: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{what}{hub} is not in the Hugging Face cache {repo_cache_folder(hub.repo_id)} and {reason}: run "
        f"`vdiff weights download {hub}` (or `huggingface-cli download {hub.repo_id}`) where there is network, with the "
        "same HF_HOME, or name a local copy instead (a path; a relative one is also looked up under $VDIFF_WEIGHTS)"
    )


def resolve_hub_path(text: str | os.PathLike | HubId, what: str = "") -> Path:
    """The local file or folder of hub id ``text``, downloading what is missing (only what the readers read; module
    docstring). ``what`` (e.g. ``"SVDModule net_weights"``) starts the error messages.

    Raises:
        ValueError: not a hub id.
        WeightsUnavailableError: offline or the hub unreachable, and not in the cache.
        GatedWeightsError: a gated repository not accepted / not logged in.
        FileNotFoundError: no such repository, revision, file or folder.
    """
    hub = parse_hub_id(text)
    what = f"{what}: " if what else ""
    if offline():
        return _resolve_offline(hub, what, "downloads are off (HF_HUB_OFFLINE=1)")
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return _resolve_online(hub, what)
    except GatedRepoError:
        raise GatedWeightsError(
            f"{what}{hub}: {hub.page} is a gated repository: accept its licence on that page, then log in with "
            "`huggingface-cli login` (or set HF_TOKEN) and run again"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{what}{hub}: no repository {hub.repo_id} on {endpoint()} (if it is private, log in with "
            "`huggingface-cli login` or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{what}{hub}: {hub.repo_id} has no revision {hub.revision!r}") from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"{what}{hub}: {hub.repo_id} has no file {hub.path} at {hub.revision or 'main'} ({hub.page}/tree/"
            f"{hub.revision or 'main'} lists its files)"
        ) from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise GatedWeightsError(
                f"{what}{hub}: the hub refused access (HTTP {status}): accept the licence on {hub.page} if it has one, "
                "then log in with `huggingface-cli login` (or set HF_TOKEN)"
            ) from None
        raise OSError(f"{what}{hub}: the hub answered HTTP {status} ({str(error).splitlines()[0]})") from None
    except _ConnectionLost as lost:
        return _resolve_offline(hub, what, f"{endpoint()} cannot be reached ({lost})")


class _ConnectionLost(Exception):
    """The hub could not be reached (no network, DNS, timeout): fall back to the cache, as huggingface_hub does."""


def _resolve_offline(hub: HubId, what: str, reason: str) -> Path:
    found = cached_hub_path(hub)
    if found is None:
        raise _unavailable(hub, what, reason)
    return found


def _download(hub: HubId, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns,
                                  cache_dir=hub_cache_dir(), endpoint=endpoint()))  # fmt: skip


def _list_repo_files(hub: HubId) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return HfApi(endpoint=endpoint()).list_repo_files(hub.repo_id, revision=hub.revision)
    except HfHubHTTPError:
        raise
    except Exception as error:  # the HTTP client's connection errors differ between huggingface_hub versions
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, OSError) or names & {"TransportError", "ConnectionError", "TimeoutException"}:
            raise _ConnectionLost(f"{type(error).__name__}: {error}") from None
        raise


def _resolve_online(hub: HubId, what: str) -> Path:
    listing = _list_repo_files(hub)
    if hub.is_file:
        if hub.path not in listing:
            from huggingface_hub.utils import EntryNotFoundError

            raise EntryNotFoundError(hub.path)
        wanted = [hub.path]
        parent = PurePosixPath(hub.path).parent
        beside = CONFIG if str(parent) == "." else f"{parent}/{CONFIG}"
        if PurePosixPath(hub.path).name.startswith(BARE_MODEL_FILES) and beside in listing:
            wanted.append(beside)
    else:
        wanted = select_files(listing, hub.path)
        if not wanted:
            top = sorted({f.split("/")[0] for f in listing})
            raise FileNotFoundError(
                f"{what}{hub}: {hub.repo_id} has no folder {hub.path!r} (its top level: {', '.join(top[:20])})"
            )
    snapshot = _download(hub, wanted)
    if hub.is_file:
        indexes = [snapshot / hub.path] if hub.path.endswith(".index.json") else []
    else:  # the shard index a model folder's reader picks (not the fp16 variant's index beside it)
        picks = _model_folders(wanted).items()
        indexes = [snapshot / (pick if model == "." else f"{model}/{pick}") for model, pick in picks
                   if pick is not None and pick.endswith(".index.json")]  # fmt: skip
    if indexes:
        _download(hub, _shards(indexes, snapshot))
    return snapshot / hub.path if hub.path else snapshot


# ------------------------------------------------------------------------------------------------ verifying


def verify_cached(text: str | os.PathLike | HubId) -> list[tuple[str, bool | None, str]]:
    """Re-hash the cached files of a hub id against the hub's digests (the blob names of the cache: an LFS file's
    sha256, a small file's git blob sha1): ``(path, ok, detail)`` per file; ``ok`` None when the cache holds copies
    instead of links to blobs (no digest to compare). Empty when nothing is cached."""
    hub = parse_hub_id(text)
    snapshot = _snapshot(hub)
    if snapshot is None:
        return []
    listing = _local_listing(snapshot)
    files = [hub.path] if hub.is_file and hub.path in listing else select_files(listing, hub.path) if not hub.is_file else []
    results = []
    for name in files:
        link = snapshot / name
        if not link.is_symlink():
            results.append((str(link), None, "a copy, not a link to a blob: nothing to compare"))
            continue
        blob = link.resolve()
        expected = blob.name
        data_hash = hashlib.sha256() if len(expected) == 64 else hashlib.sha1(f"blob {blob.stat().st_size}\0".encode())  # noqa: S324
        with open(blob, "rb") as f:
            while chunk := f.read(CHUNK):
                data_hash.update(chunk)
        got = data_hash.hexdigest()
        kind = "sha256" if len(expected) == 64 else "git sha1"
        results.append((str(link), got == expected, f"{kind} {got}" + ("" if got == expected else f", expected {expected}")))
    return results
