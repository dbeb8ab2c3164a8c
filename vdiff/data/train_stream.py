"""The training stream (:class:`TrainClipStream`): endless, resampled, shuffled clips mixed from weighted
sources, in which every random choice is drawn from :func:`vdiff.data.sampling.rng` with
``(seed, epoch, rank, worker, ...)``, so an epoch's data is a pure function of the configuration and a run
resumes mid-epoch exactly (see :mod:`vdiff.data.datamodule`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vdiff.data import sampling
from vdiff.data.clips import ClipSpec, Skip, decode_clip, last_clip_start, parse_video_meta
from vdiff.data.sampling import ReaderSlot
from vdiff.data.skips import SkipCounter
from vdiff.data.stream_base import ClipStreamBase

MAX_CONSECUTIVE_SKIPS = 1000  # a training source this bad is a configuration error, not bad luck


class TrainClipStream(ClipStreamBase):
    """Endless, resampled, shuffled, mixed training clips; one rank's epoch is ``num_batches`` batches.

    Iterating yields, in each worker, exactly that worker's share of ``num_batches * batch_size``
    samples (see :func:`vdiff.data.sampling.split_batches`) for epoch ``epoch``, after silently
    replaying the first ``start_batch`` batches of the epoch (resume).

    Subclasses for other sample kinds override :meth:`train_clip` (one raw sample -> one clip) only.
    """

    def __init__(
        self,
        sources: Sequence[tuple[list[str], str | None]],
        weights: Sequence[float],
        spec: ClipSpec,
        crop: str,
        flip: bool,
        shuffle_buffer: int,
        batch_size: int,
        num_batches: int,
        seed: int,
        rank: int,
        world_size: int,
        counter: SkipCounter,
        workers_per_stage: int,
        expected_samples: Mapping[str, int] | None = None,
    ):
        super().__init__(counter, "train", workers_per_stage, expected_samples)
        self.sources = [(list(shards), name) for shards, name in sources]
        self.probabilities = sampling.normalized_weights(weights)
        self.spec = spec
        self.crop = crop
        self.flip = flip
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def _source_stream(self, s: int, slot: ReaderSlot) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """Source ``s``'s samples for this reader: shards drawn with replacement, then shuffled."""
        shards, _ = self.sources[s]
        seed, epoch = self.seed, self.epoch

        def draw(j: int) -> np.random.Generator:
            return sampling.rng(seed, epoch, slot.rank, slot.worker, sampling.SHARD_ORDER, s, j)

        def samples() -> Iterator[tuple[str, str, dict[str, bytes]]]:
            fruitless = 0  # consecutive shard draws that gave no sample
            for shard in sampling.resampled(shards, draw):
                got = False
                for key, files in self._raw_samples(shard):
                    got = True
                    yield shard, key, files
                fruitless = 0 if got else fruitless + 1
                if fruitless >= 4 * len(shards) + 16:
                    raise RuntimeError(
                        f"training source {shards[0]}{' ...' if len(shards) > 1 else ''}: {fruitless} shard reads "
                        "in a row gave no sample (empty or unreadable shards)"
                    )

        shuffler = sampling.rng(seed, epoch, slot.rank, slot.worker, sampling.SHUFFLE, s)
        return sampling.shuffled(samples(), self.shuffle_buffer, shuffler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._bind_worker()
        # A DataLoader asks worker 0 first, but after a resume the next batch (``start_batch``) belongs
        # to worker ``start_batch % num_workers`` of the original run: rotate the workers' identities.
        worker = (worker + self.start_batch) % num_workers
        slot = ReaderSlot(self.rank, self.world_size, worker, num_workers)
        done, todo = sampling.split_batches(self.num_batches, worker, num_workers, self.start_batch)
        replay, total = done * self.batch_size, (done + todo) * self.batch_size
        streams = [self._source_stream(s, slot) for s in range(len(self.sources))]
        for index in range(total):
            self.count_skips = index >= replay
            item = self._next_clip(index, streams, slot)
            if index >= replay:
                yield item
        self.count_skips = True

    def _next_clip(self, index: int, streams: list[Iterator], slot: ReaderSlot) -> dict[str, Any]:
        """Output sample ``index`` of this reader: source by weight, then the next good sample of it."""
        choice = sampling.rng(self.seed, self.epoch, slot.rank, slot.worker, sampling.SAMPLE, index)
        s = sampling.choose_source(self.probabilities, choice)
        shards, name = self.sources[s]
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            shard, key, files = next(streams[s])
            # Clip start, crop and flip depend on the output index only, not on how many bad
            # samples came before: a fresh generator per attempt.
            generator = sampling.rng(self.seed, self.epoch, slot.rank, slot.worker, sampling.SAMPLE, index, 1)
            try:
                return self.train_clip(shard, key, files, name, generator, index, slot)
            except Skip as skip:
                self._skip(skip)
        raise RuntimeError(
            f"training source with shards {shards[:3]}{'...' if len(shards) > 3 else ''}: "
            f"{MAX_CONSECUTIVE_SKIPS} consecutive samples were bad; see the skip counts and warnings"
        )

    def train_clip(
        self,
        shard: str,
        key: str,
        files: dict[str, bytes],
        name: str | None,
        generator: np.random.Generator,
        index: int,
        slot: ReaderSlot,
    ) -> dict[str, Any]:
        """One raw sample (``key``, ``{ext: bytes}`` read from ``shard``, source ``name``) -> the item of
        output sample ``index`` of reader ``slot``; raises :class:`Skip` for a bad sample. Draw every
        random choice from ``generator`` (or from :func:`vdiff.data.sampling.rng` with ``index`` and
        ``slot``): the output must be a function of ``(seed, epoch, slot, index)`` for resumes."""
        meta = parse_video_meta(key, files, shard)
        last = last_clip_start(key, meta.num_frames, meta.fps, self.spec, shard)
        start = int(generator.integers(last + 1))
        flip = bool(generator.random() < 0.5) if self.flip else False
        return decode_clip(key, files, meta, start, self.spec, self.crop, generator, flip, name, shard)
