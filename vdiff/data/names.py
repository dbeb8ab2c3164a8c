"""File names made from names read from data, which never choose where a file is written.

A shard key, a source name or an input file's stem may hold ``..``, ``/``, an absolute path, spaces or
characters a file system refuses. Every file named after one goes through :func:`safe_name`: a name of
letters, digits, ``_`` and ``-`` (at most :data:`MAX_NAME` characters) is kept as it is; any other becomes its
readable part (every run of other characters replaced by one ``_``) plus ``-`` and a short hash of the whole
name, so two different names stay different (``../../x`` -> ``x-<hash>``, ``sub/dir/k`` -> ``sub_dir_k-<hash>``).
:func:`unique_names` also numbers repeated names (``-2``, ``-3``, ...; names equal but for case count as
repeats, for case-insensitive file systems), for a folder of outputs named one per sample.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

MAX_NAME = 80  # the longest safe name kept as it is
DIGEST_CHARS = 8  # hex digits of the hash appended to a name that had to change

_SAFE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NAME}}}")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")


def plain_text(text: str, max_chars: int) -> str:
    """``text`` with every run of characters other than ASCII letters, digits, ``_`` and ``-`` replaced by one
    ``_``, cut to ``max_chars`` characters (may be empty)."""
    return _UNSAFE_RUN.sub("_", text)[:max_chars]


def name_digest(text: str) -> str:
    """A short hex hash of ``text`` (:data:`DIGEST_CHARS` digits; file names that are not UTF-8 hash too)."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]


def safe_name(name: str, default: str = "sample") -> str:
    """A plain file name for ``name`` read from data: ``name`` itself when it is one already (letters, digits,
    ``_``, ``-``; 1 to :data:`MAX_NAME` characters), else its readable part (``default`` when nothing is left)
    plus ``-`` and :func:`name_digest` of ``name``. Never contains a path separator or a dot."""
    if _SAFE.fullmatch(name):
        return name
    readable = plain_text(name, MAX_NAME - DIGEST_CHARS - 1).strip("_") or default
    return f"{readable}-{name_digest(name)}"


def unique_names(names: Iterable[str], default: str = "sample") -> list[str]:
    """:func:`safe_name` of every name, repeats numbered ``-2``, ``-3``, ... in order (case-insensitively), so
    the results can name files in one folder."""
    taken: set[str] = set()
    result = []
    for name in names:
        base = candidate = safe_name(name, default)
        number = 2
        while candidate.casefold() in taken:
            candidate, number = f"{base}-{number}", number + 1
        taken.add(candidate.casefold())
        result.append(candidate)
    return result
