"""What the training and evaluation clip streams share (:class:`ClipStreamBase`): reading the samples of
a shard, counting a shard that ends early (``bad_shard``) or holds fewer samples than its manifest lists
(``truncated_shard``), and counting skipped samples in the row of the skip counter that belongs to this
stage and reader (the main process or a DataLoader worker)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch.utils.data import IterableDataset, get_worker_info

from vdiff.data import sampling
from vdiff.data.clips import Skip
from vdiff.data.shards import iter_raw_samples
from vdiff.data.skips import SkipCounter

BAD_SHARD = "bad_shard"  # a tar that cannot be read (or is truncated) from some point on
TRUNCATED_SHARD = "truncated_shard"  # per read, each sample a manifest lists but a cleanly ending tar lacks
STAGES: tuple[str, ...] = ("train", "val", "test", "predict")  # the stages' blocks of skip-counter rows


class ClipStreamBase(IterableDataset):
    """Shared parts of the train and eval streams: skip counting in this stage's counter rows, and
    reading shards (``expected_samples``: samples per shard path from the manifests, see
    :func:`vdiff.data.shards.manifest_sample_counts`).

    The skip counter has one row per stage and reader: row ``STAGES.index(stage) * (workers + 1)`` is
    the stage's main process, the next ``workers`` rows its DataLoader workers."""

    def __init__(
        self, counter: SkipCounter, stage: str, workers_per_stage: int, expected_samples: Mapping[str, int] | None
    ):
        self.counter = counter
        self.expected_samples = dict(expected_samples or {})
        self.stage_row = STAGES.index(stage) * (workers_per_stage + 1)
        self.count_skips = True
        self._row = self.stage_row

    def _bind_worker(self) -> tuple[int, int]:
        worker, num_workers = sampling.current_worker()
        self._row = self.stage_row + (0 if get_worker_info() is None else worker + 1)
        return worker, num_workers

    def _skip(self, skip: Skip) -> None:
        if self.count_skips:
            self.counter.add(self._row, skip.reason, skip.message, skip.count)

    def _raw_samples(self, shard: str, first_count: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Samples of one shard; counted (if ``first_count``) when it falls short: a damaged tar ends early
        (``bad_shard``, once), and a tar that ends cleanly with fewer samples than its manifest lists (cut at
        a file boundary, which tarfile reads as the end) counts each missing sample as ``truncated_shard``."""
        read = 0
        try:
            for sample in iter_raw_samples(shard):
                read += 1
                yield sample
        except ValueError as err:
            if first_count:
                self._skip(Skip(BAD_SHARD, str(err)))
            return
        expected = self.expected_samples.get(shard)
        if first_count and expected is not None and read < expected:
            message = f"shard {shard} ended after {read} samples, its manifest lists {expected} (truncated tar?)"
            self._skip(Skip(TRUNCATED_SHARD, message, count=expected - read))
