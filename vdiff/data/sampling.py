"""Deterministic randomness and work splitting for the data pipeline.

Every random choice of vdiff's data pipeline (which shard to read next, which source a sample comes
from, shuffle-buffer picks, clip start, crop offset, flip) is drawn from a numpy generator seeded by
:func:`rng` with ``(seed, epoch, rank, worker, purpose, index...)`` through ``np.random.SeedSequence``.
Nothing depends on process start order, wall-clock time or global RNG state, so the same
configuration yields the same data on any machine, and a run can be resumed mid-epoch by replaying
a reader's stream (see :class:`vdiff.data.datamodule.VideoDataModule`).

A *reader* is one (rank, DataLoader worker) pair; :class:`ReaderSlot` numbers them. Evaluation
splits shards between readers with :func:`assign_eval_shards`, which falls back to striding over
samples when there are fewer shards than readers (webdataset's ``split_by_node`` /
``split_by_worker`` would leave a reader empty and hang a DDP evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Purposes: distinct constants keep the streams of different random choices independent.
SHARD_ORDER = 1
SHUFFLE = 2
SAMPLE = 3  # per output sample: source choice, clip start, crop, flip


def rng(seed: int, epoch: int, rank: int, worker: int, purpose: int, *index: int) -> np.random.Generator:
    """A numpy generator that is a pure function of its arguments (all non-negative integers)."""
    entropy = [int(seed), int(epoch), int(rank), int(worker), int(purpose), *(int(i) for i in index)]
    if min(entropy) < 0:
        raise ValueError(f"seed, epoch, rank, worker and indices must be >= 0, got {entropy}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


@dataclass(frozen=True)
class ReaderSlot:
    """One reader of a data pipeline: DataLoader worker ``worker`` of ``num_workers`` on rank ``rank``.

    ``num_workers`` is the number of DataLoader worker processes, counted as 1 when the main
    process reads (``num_workers=0``). ``index`` numbers readers 0 .. ``count`` - 1 rank-major.
    """

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def current_worker() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the calling DataLoader worker; ``(0, 1)`` in the main process."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def assign_eval_shards(shards: Sequence[str], slot: ReaderSlot) -> tuple[list[str], int, int]:
    """Which shards a reader reads in evaluation, and which of their samples it keeps.

    Returns ``(shards, keep_every, keep_offset)``: the reader keeps the ``i``-th sample it reads
    (counted over its shards in order) when ``i % keep_every == keep_offset``.

    With at least as many shards as readers, shard ``j`` goes to reader ``j % readers`` and every
    sample is kept. With fewer shards, every reader reads all shards and keeps samples
    ``i % readers == reader``: each sample is still seen exactly once, at the cost of every reader
    scanning (not decoding) the whole set. A reader may receive no sample at all; it then yields
    nothing, which a DataLoader handles without waiting.
    """
    if slot.count < 1 or not 0 <= slot.index < slot.count:
        raise ValueError(f"bad reader slot {slot}")
    if len(shards) >= slot.count:
        return list(shards[slot.index :: slot.count]), 1, 0
    return list(shards), slot.count, slot.index


def split_batches(num_batches: int, worker: int, num_workers: int, start_batch: int = 0) -> tuple[int, int]:
    """Batches of one rank's epoch that a worker produces, as ``(already produced, still to produce)``.

    A torch DataLoader takes batches from its workers in turn (batch ``b`` comes from worker
    ``b % num_workers``), so worker ``w`` produces the batches ``b < num_batches`` with
    ``b % num_workers == w``; of those, the ones with ``b < start_batch`` were consumed before a resume.
    """
    def count_below(n: int) -> int:
        return max(0, (n - worker + num_workers - 1) // num_workers)

    done = count_below(min(start_batch, num_batches))
    return done, count_below(num_batches) - done


def shuffled(items: Iterator[T], buffer_size: int, generator: np.random.Generator) -> Iterator[T]:
    """Shuffle a stream with a buffer of ``buffer_size`` items (1 or less: no shuffling).

    Fills the buffer, then for every new item yields a uniformly chosen buffered one and puts the new
    item in its place; drains the buffer in random order at the end. Written here instead of using
    webdataset's ``shuffle`` so that its choices come from the given (seeded) generator only.
    """
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        pick = int(generator.integers(buffer_size))
        out, buffer[pick] = buffer[pick], item
        yield out
    while buffer:
        pick = int(generator.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()


def resampled(choices: Sequence[T], draw: Callable[[int], np.random.Generator]) -> Iterator[T]:
    """Endless draws with replacement from ``choices``; draw ``j`` uses generator ``draw(j)``."""
    if not choices:
        raise ValueError("cannot resample from an empty list")
    j = 0
    while True:
        yield choices[int(draw(j).integers(len(choices)))]
        j += 1


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as probabilities; raises ValueError on negative, non-finite or all-zero weights."""
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"need a non-empty list of source weights, got {weights!r}")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(f"source weights must be finite, >= 0 and not all zero, got {list(weights)}")
    return array / array.sum()


def choose_source(probabilities: np.ndarray, generator: np.random.Generator) -> int:
    """Index of the source to draw the next sample from (one uniform draw, inverse CDF)."""
    u = generator.random()
    index = int(np.searchsorted(np.cumsum(probabilities), u, side="right"))
    return min(index, len(probabilities) - 1)
