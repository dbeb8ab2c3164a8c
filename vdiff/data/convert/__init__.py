"""Dataset converters: source footage -> vdiff video shards (:mod:`vdiff.data.schema`).

* :mod:`~vdiff.data.convert.folder` - ``vdiff data shards``: a folder of videos, with scene cuts and a
  motion filter (:mod:`~vdiff.data.convert.curation`), parallel and resumable.
* :mod:`~vdiff.data.convert.opendv` - ``vdiff data opendv``: long driving videos + trim metadata ->
  10 Hz clips without actions.
* :mod:`~vdiff.data.convert.cityscapes` - ``vdiff data cityscapes``: 30-frame 17 Hz snippets, ego speed
  and yaw rate.
* :mod:`~vdiff.data.convert.nuscenes` - ``vdiff data nuscenes``: CAM_FRONT at 10 Hz with every action of
  docs/architecture.md, "Actions" (:mod:`~vdiff.data.convert.ego` holds the ego-motion math).

:class:`DatasetReport` is what the image-sequence converters return.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class DatasetReport:
    """Totals of an image-sequence conversion (one split): clips kept, dropped by reason, failures."""

    out: str
    split: str
    clips_kept: int = 0
    frames_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (item, reason, message)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.split}: {self.clips_kept} clips ({self.frames_kept} frames) -> {self.out}"]
        for reason in sorted(self.dropped):
            lines.append(f"  dropped {reason}: {self.dropped[reason]}")
        for item, reason, message in self.failed:
            lines.append(f"  SKIPPED {item} [{reason}] {message}")
        lines.append(f"  time: {self.seconds:.1f} s")
        return "\n".join(lines)


def parallel_map(fn: Callable, tasks: list, workers: int, progress: str | None = None, unit: str = "task") -> Iterator:
    """``map(fn, tasks)`` in order, in ``workers`` processes when more than one (fork where available,
    so workers share the parent's imports; one task at a time, since tasks are whole clips or scenes).
    ``progress``: the description of a progress bar on stderr (tasks done of ``len(tasks)``, in ``unit``s, and the
    time left); None shows nothing."""
    from tqdm.auto import tqdm

    with tqdm(total=len(tasks), desc=progress, unit=unit, disable=progress is None) as bar:
        for result in _map(fn, tasks, workers):
            bar.update()
            yield result


def _map(fn: Callable, tasks: list, workers: int) -> Iterator:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield from pool.imap(fn, tasks, chunksize=1)

