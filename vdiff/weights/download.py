"""Download one file from a URL into vdiff's weights cache: resumable, hashed while written, atomic, with a bar.

:func:`download` streams to ``<file>.partial`` beside the target (an HTTP ``Range`` request continues a partial file
left by a killed download; a server that ignores it sends the whole file again), hashes the bytes as they are written,
checks the sha256 (the full digest, or a prefix as torchvision's file names carry) and only then renames the file into
place with ``os.replace``: a file at the target path is always complete and checked. A mismatch deletes the partial
file and names both digests. The digest is recorded beside the file (``<file>.sha256``, ``sha256sum`` format) so a
later ``vdiff weights verify`` can check it, pinned or not. A lock file serialises processes fetching the same file
(every rank of a job may ask at once: one downloads, the others wait and then find it).

Offline: with ``HF_HUB_OFFLINE=1`` (the switch every Hugging Face user has; ``tests/conftest.py`` sets it) nothing is
requested; without a network the request fails. Both raise :class:`WeightsUnavailableError`: one line with the URL and
the path to put the file at.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from vdiff import __version__

CHUNK = 1 << 20  # 1 MiB
PARTIAL_SUFFIX = ".partial"
DIGEST_SUFFIX = ".sha256"
OFFLINE_ENV = "HF_HUB_OFFLINE"
TIMEOUT_S = 60.0


class DownloadError(OSError):
    """A download that failed (HTTP error, connection lost, wrong hash); the message names the URL and the file."""


class HashMismatchError(DownloadError):
    """The downloaded bytes do not have the pinned sha256 (the partial file is deleted)."""


class WeightsUnavailableError(DownloadError, FileNotFoundError):
    """The file is not here and cannot be fetched now (offline, or no network): says what to fetch and where."""


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is on (``1``/``true``/``yes``/``on``, as huggingface_hub reads it), read at call time."""
    return os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def digest_matches(digest: str, pinned: str | None) -> bool:
    """Whether a hex sha256 ``digest`` matches a pin: the full digest, or its prefix (torchvision-style); no pin
    matches anything."""
    return pinned is None or digest.startswith(pinned.lower())


def recorded_digest(path: Path) -> str | None:
    """The sha256 recorded beside ``path`` when it was downloaded (``<file>.sha256``), or None."""
    record = path.with_name(path.name + DIGEST_SUFFIX)
    try:
        return record.read_text().split()[0]
    except (OSError, IndexError):
        return None


def _hash_file(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": f"vdiff/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310


def download(
    url: str,
    target: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    hint: str | None = None,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Fetch ``url`` to the file ``target`` (its name is the caller's, never the server's) and return it.

    Args:
        url: an ``http(s)://`` URL (redirects are followed).
        target: the final path; its folder is created. An existing file there is returned as it is.
        sha256: the pinned hex digest or prefix; None: not checked (the digest is still recorded).
        progress: a tqdm bar on stderr.
        hint: a command that fetches it elsewhere (``vdiff weights download NAME``), named in offline errors.
        timeout: seconds without data before the connection counts as lost.

    Raises:
        WeightsUnavailableError: offline (``HF_HUB_OFFLINE``) or the server cannot be reached; nothing was written.
        HashMismatchError: the bytes have another sha256 than pinned; the partial file is deleted.
        DownloadError: an HTTP error, or the connection was lost (the partial file is kept: run again to resume).
    """
    from filelock import FileLock

    target = Path(target)
    if target.is_file():
        return target
    where = f"put the file there by hand ({url} saved as {target})" + (f", or run `{hint}` where there is network" if hint else "")
    if offline():
        raise WeightsUnavailableError(f"{target.name} is not in {target.parent} and downloads are off ({OFFLINE_ENV}=1): {where}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():  # another process finished it while this one waited
            return target
        return _download_locked(url, target, sha256, progress, where, timeout)


def _download_locked(url: str, target: Path, sha256: str | None, progress: bool, where: str, timeout: float) -> Path:
    from tqdm import tqdm

    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    start = partial.stat().st_size if partial.is_file() else 0
    digest = _hash_file(partial) if start else hashlib.sha256()
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing past what the partial file holds: it is the whole file
            return _finish(partial, target, digest, sha256, url)
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason} (downloading {target.name} into {target.parent})") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsUnavailableError(f"{target.name} is not in {target.parent} and {url} cannot be reached ({reason}): {where}") from None
    with response:
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/html":  # a file host's confirmation, login or error page: never a weights file
            raise DownloadError(
                f"{url}: the server sent a web page (text/html), not {target.name}; the link may need a login or a "
                f"confirmation in a browser, or have moved: {where}"
            )
        if start and response.status != 206:  # the server ignored the Range header: start again
            start, digest = 0, hashlib.sha256()
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        written = start
        with open(partial, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
            file=sys.stderr, disable=not progress, leave=False,
        ) as bar:  # fmt: skip
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead (closed early)
                out.flush()
                raise DownloadError(
                    f"{url}: the connection was lost after {written} of {total or '?'} bytes of {target.name} ({err}); "
                    f"run again to resume from {partial}"
                ) from None
            out.flush()
            os.fsync(out.fileno())
    if total is not None and written != total:
        raise DownloadError(
            f"{url}: the server sent {written} of {total} bytes of {target.name}; run again to resume from {partial}"
        )
    return _finish(partial, target, digest, sha256, url)


def _finish(partial: Path, target: Path, digest: hashlib._Hash, sha256: str | None, url: str) -> Path:
    hexdigest = digest.hexdigest()
    if not digest_matches(hexdigest, sha256):
        partial.unlink(missing_ok=True)
        raise HashMismatchError(
            f"{url}: the downloaded {target.name} has sha256 {hexdigest}, expected {sha256}"
            f"{'...' if sha256 and len(sha256) < 64 else ''}; the file was deleted (a corrupt download, or the "
            "publisher changed the file: check the URL before trusting a new one)"
        )
    target.with_name(target.name + DIGEST_SUFFIX).write_text(f"{hexdigest}  {target.name}\n")
    os.replace(partial, target)
    return target
