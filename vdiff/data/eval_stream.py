"""The evaluation stream (:class:`EvalClipStream`): every sample of a shard set exactly once across ranks
and DataLoader workers, in a fixed order, with deterministic clips (evenly spaced starts, center crops,
no flip)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from vdiff.data import sampling
from vdiff.data.clips import ClipSpec, Skip, decode_clip, last_clip_start, parse_video_meta
from vdiff.data.sampling import ReaderSlot
from vdiff.data.skips import SkipCounter
from vdiff.data.stream_base import ClipStreamBase


def eval_clip_starts(last_start: int, clips_per_video: int) -> list[int]:
    """Starts of the evaluation clips of a video whose last possible clip start is ``last_start``:
    ``clips_per_video`` evenly spaced starts from 0 to ``last_start`` (duplicates dropped)."""
    if clips_per_video == 1 or last_start == 0:
        return [0]
    return sorted({int(round(j * last_start / (clips_per_video - 1))) for j in range(clips_per_video)})


class EvalClipStream(ClipStreamBase):
    """Every sample of a shard set exactly once over all readers, with deterministic clips.

    ``shards`` are ``(path, source name)`` pairs in a fixed order. With ``clips_per_video`` > 1 each
    video gives several clips, keyed ``<key>/clip<j>``. Center crop, no flip.

    Subclasses for other sample kinds override :meth:`eval_clips` (one raw sample -> its clips) only.
    """

    def __init__(
        self,
        shards: Sequence[tuple[str, str | None]],
        spec: ClipSpec,
        clips_per_video: int,
        rank: int,
        world_size: int,
        counter: SkipCounter,
        stage: str,
        workers_per_stage: int,
        expected_samples: Mapping[str, int] | None = None,
    ):
        super().__init__(counter, stage, workers_per_stage, expected_samples)
        self.shards = list(shards)
        self.spec = spec
        self.clips_per_video = clips_per_video
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._bind_worker()
        slot = ReaderSlot(self.rank, self.world_size, worker, num_workers)
        paths = [path for path, _ in self.shards]
        names = dict(self.shards)
        mine, every, offset = sampling.assign_eval_shards(paths, slot)
        counter = itertools.count()
        for shard in mine:
            # In the fallback every reader scans every shard: only reader 0 counts a damaged tar.
            for key, files in self._raw_samples(shard, first_count=every == 1 or slot.index == 0):
                if next(counter) % every != offset:
                    continue
                try:
                    clips = self.eval_clips(shard, key, files, names[shard])
                except Skip as skip:  # one bad clip drops the whole sample, counted once
                    self._skip(skip)
                    continue
                yield from clips

    def clip_key(self, key: str, j: int) -> str:
        """Key of clip ``j`` of sample ``key``: ``<key>/clip<j>`` with several clips per video, else ``key``."""
        return f"{key}/clip{j}" if self.clips_per_video > 1 else key

    def clips_at_starts(
        self, key: str, last_start: int, make_clip: Callable[[int, str], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The evaluation clips of sample ``key``: ``make_clip(start, clip_key)`` for every start of
        :func:`eval_clip_starts`, each item keyed :meth:`clip_key`."""
        clips = []
        for j, start in enumerate(eval_clip_starts(last_start, self.clips_per_video)):
            clip_key = self.clip_key(key, j)
            clip = make_clip(start, clip_key)
            clip["key"] = clip_key
            clips.append(clip)
        return clips

    def eval_clips(self, shard: str, key: str, files: dict[str, bytes], name: str | None) -> list[dict[str, Any]]:
        """One raw sample (``key``, ``{ext: bytes}`` read from ``shard``, source ``name``) -> its evaluation
        clips (see :meth:`clips_at_starts`), deterministic; raises :class:`Skip` for a bad sample."""
        meta = parse_video_meta(key, files, shard)
        last = last_clip_start(key, meta.num_frames, meta.fps, self.spec, shard)
        return self.clips_at_starts(
            key, last, lambda start, _: decode_clip(key, files, meta, start, self.spec, "center", None, False, name, shard)
        )
