"""The DataLoader of the video data modules (:class:`VideoLoader`): it sets its stream's epoch before the
workers start and, for training, is *stateful* (the epoch and the batches consumed), so that Lightning's
checkpoints hold the data position and a resumed run continues at the next batch. Its workers ignore
SIGTERM (:func:`worker_ignores_sigterm`)."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from vdiff.data.train_stream import TrainClipStream


def worker_ignores_sigterm(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM, then ``then(worker_id)`` runs.

    Schedulers signal every process of a job (SLURM: the whole job step, data loader workers included). The
    training process handles SIGTERM: it finishes the step, writes ``last.ckpt`` and exits. A worker killed by
    the same signal would make the training process raise "DataLoader worker (pid ...) is killed by signal:
    Terminated" at any instant, also in the middle of that checkpoint. Workers still end as before: when the
    loader shuts them down, or when their parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


class VideoLoader(DataLoader):
    """A DataLoader over a clip stream that sets the stream's epoch before its workers start, and
    (for training) is *stateful*: ``state_dict()`` records the epoch and the batches consumed, and
    after ``load_state_dict()`` the next iteration resumes at that batch. Lightning saves and
    restores this state in its checkpoints. Its workers ignore SIGTERM (:func:`worker_ignores_sigterm`)."""

    def __init__(
        self,
        dataset: IterableDataset,
        epoch_fn: Callable[[], int],
        consumed_fn: Callable[[VideoLoader], int | None] | None = None,
        **kwargs: Any,
    ):
        kwargs["worker_init_fn"] = functools.partial(worker_ignores_sigterm, then=kwargs.get("worker_init_fn"))
        super().__init__(dataset, **kwargs)
        self._epoch_fn = epoch_fn
        self._consumed_fn = consumed_fn
        self._resume: dict[str, int] | None = None
        self.epoch = 0
        self.start_batch = 0
        self.batches_yielded = 0

    def __iter__(self):
        epoch, start = self._epoch_fn(), 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:  # a resume point of an earlier epoch is spent
                start = self._resume["batches"]
            self._resume = None
        self.epoch, self.start_batch, self.batches_yielded = epoch, start, 0
        if isinstance(self.dataset, TrainClipStream):
            self.dataset.epoch, self.dataset.start_batch = epoch, start
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        consumed = self._consumed_fn(self) if self._consumed_fn is not None else None
        if consumed is None:
            consumed = self.start_batch + self.batches_yielded
        return {"epoch": int(self.epoch), "batches": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
