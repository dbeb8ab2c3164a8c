"""Where a data module's samples come from: :class:`DataSource` (a shard spec, its weight in the
training mix and the ``source`` name batches report) and :func:`as_sources`, which turns what a recipe
gives (a path, a dict, a list of either) into a list of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DataSource:
    """A set of shards and its share of the training mix.

    ``path``: a folder of shards (with or without ``manifest.json``), a manifest, a brace pattern
    (``data/shard-{000000..000099}.tar``), a glob or a single tar. ``weight``: relative probability
    that a training sample comes from this source (ignored in evaluation, which reads every
    sample). ``name``: the ``source`` reported in batches; None reports each sample's json ``source``.
    """

    path: str
    weight: float = 1.0
    name: str | None = None


SourceSpec = str | list[DataSource] | None


def as_sources(spec: Any, field: str) -> list[DataSource]:
    """A stage's sources from a shard spec, a :class:`DataSource`, a dict of its fields, or a list of
    these; None gives none. ``field`` names the argument in error messages."""
    if spec is None:
        return []
    if isinstance(spec, (str, DataSource, dict)):
        spec = [spec]
    sources = []
    for item in spec:
        if isinstance(item, str):
            item = DataSource(path=item)
        elif isinstance(item, dict):
            item = DataSource(**item)
        elif not isinstance(item, DataSource):
            raise TypeError(f"{field}: expected a shard path or DataSource, got {type(item).__name__}")
        sources.append(item)
    if not sources:
        raise ValueError(f"{field}: empty list of sources")
    return sources
