"""Accounting for bad input: skipped samples counted by reason, across DataLoader workers and ranks.

Bad input loses nothing and stops nothing: a data pipeline that meets an undecodable video, a
missing or malformed json or a clip too short for the request skips that sample, counts it here by
reason, warns once per reason, and goes on. :class:`SkipCounter` keeps the counts in a shared-memory
tensor created before DataLoader workers start; each worker increments only its own row, so counts
are exact without locks and readable from the main process at any time. :class:`DataHealthMonitor`
logs the totals, summed over ranks, as ``data/skipped/<reason>``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

METRIC_PREFIX = "data/skipped/"


class DataSkipWarning(UserWarning):
    """A sample was skipped because its input is bad (emitted once per reason and process)."""


class SkipCounter:
    """Counts of skipped samples, ``(num_slots, num_reasons)`` int64 in shared memory.

    ``reasons``: the names of the columns. ``num_slots``: rows, one per writer process that may run
    at the same time (e.g. per stage x (DataLoader workers + main process)); a writer only ever
    increments its own row, which makes concurrent updates race-free. Create the counter before
    DataLoader workers start: it reaches them by pickling (forked or spawned), sharing the memory.
    """

    def __init__(self, reasons: Sequence[str], num_slots: int = 1, rank: int = 0):
        if len(set(reasons)) != len(reasons) or not reasons:
            raise ValueError(f"skip reasons must be distinct and non-empty, got {list(reasons)}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.reasons: tuple[str, ...] = tuple(reasons)
        self._column = {reason: i for i, reason in enumerate(self.reasons)}
        self.counts = torch.zeros(num_slots, len(self.reasons), dtype=torch.int64).share_memory_()
        self.rank = rank  # only names the process in warnings

    @property
    def num_slots(self) -> int:
        return self.counts.shape[0]

    def add(self, slot: int, reason: str, message: str = "", count: int = 1) -> None:
        """Count ``count`` skips of ``reason`` in row ``slot``; warn if this is the first of its reason.

        The warning is issued by whichever process sees a reason first (it checks all rows), so a
        reason normally warns once per rank; two workers meeting the same new reason in the same
        microsecond may both warn.
        """
        if reason not in self._column:
            raise KeyError(f"unknown skip reason {reason!r}; known: {list(self.reasons)}")
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"skip slot {slot} out of range (counter has {self.num_slots} slots)")
        column = self._column[reason]
        first = int(self.counts[:, column].sum()) == 0
        self.counts[slot, column] += count
        if first:
            where = f" (rank {self.rank})" if self.rank else ""
            warnings.warn(
                f"skipping bad data sample{where}, reason {reason!r}: {message} "
                f"(further samples skipped for this reason are counted, not reported)",
                DataSkipWarning,
                stacklevel=2,
            )

    def totals(self) -> dict[str, int]:
        """Skips per reason, summed over slots (every reason present, zeros included)."""
        summed = self.counts.sum(dim=0)
        return {reason: int(summed[i]) for i, reason in enumerate(self.reasons)}

    def slot_totals(self, slots: Sequence[int] | range) -> dict[str, int]:
        """Skips per reason, summed over the given slots."""
        summed = self.counts[list(slots)].sum(dim=0)
        return {reason: int(summed[i]) for i, reason in enumerate(self.reasons)}

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def reset(self) -> None:
        self.counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"reasons": list(self.reasons), "counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`; reasons are matched by name, and counts saved
        with a different number of slots are summed into slot 0 (totals are what matter)."""
        saved = torch.as_tensor(state["counts"], dtype=torch.int64)
        self.counts.zero_()
        if saved.shape == self.counts.shape and list(state["reasons"]) == list(self.reasons):
            self.counts.copy_(saved)
            return
        unknown = [r for r in state["reasons"] if r not in self._column]
        if unknown:
            raise ValueError(f"saved skip counts have reasons {unknown} this counter does not know ({self.reasons})")
        for i, reason in enumerate(state["reasons"]):
            self.counts[0, self._column[reason]] = saved[:, i].sum()


def reduced_totals(counter: SkipCounter, trainer: Trainer | None = None) -> dict[str, int]:
    """Totals per reason summed over all ranks (a collective: every rank must call it together)."""
    totals = counter.counts.sum(dim=0)
    if trainer is not None and trainer.world_size > 1:
        device = trainer.strategy.root_device
        totals = trainer.strategy.reduce(totals.to(device), reduce_op="sum").cpu()
    return {reason: int(totals[i]) for i, reason in enumerate(counter.reasons)}


def log_skipped(module: LightningModule, counter: SkipCounter, on_step: bool = False) -> dict[str, int]:
    """Log ``data/skipped/<reason>`` (totals over ranks) from a LightningModule or callback hook.

    Call it from a hook that every rank runs the same number of times (epoch ends; train batch ends),
    never from validation steps, whose counts differ between ranks. Returns the logged totals.
    """
    totals = reduced_totals(counter, module.trainer if module._trainer is not None else None)
    metrics = {METRIC_PREFIX + reason: float(value) for reason, value in totals.items()}
    module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=False)
    return totals


def _find_counter(trainer: Trainer) -> SkipCounter | None:
    datamodule = getattr(trainer, "datamodule", None)
    counter = getattr(datamodule, "skips", None)
    return counter if isinstance(counter, SkipCounter) else None


class DataHealthMonitor(Callback):
    """Logs how many samples the data pipeline skipped, by reason, as ``data/skipped/<reason>``.

    Totals are cumulative since the counter was created (or restored from a checkpoint), summed
    over ranks, logged at the end of every train and validation epoch and every
    ``every_n_train_steps`` training batches (0: never on steps). The counter is the datamodule's
    ``skips`` attribute (:class:`vdiff.data.datamodule.VideoDataModule` has one) unless given.
    """

    def __init__(self, every_n_train_steps: int = 500, counter: SkipCounter | None = None):
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.counter = counter
        self.last_totals: dict[str, int] = {}

    def _counter(self, trainer: Trainer) -> SkipCounter | None:
        return self.counter if self.counter is not None else _find_counter(trainer)

    def _log(self, trainer: Trainer, pl_module: LightningModule, on_step: bool) -> None:
        counter = self._counter(trainer)
        if counter is not None:
            self.last_totals = log_skipped(pl_module, counter, on_step=on_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.every_n_train_steps and (batch_idx + 1) % self.every_n_train_steps == 0:
            self._log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, on_step=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, on_step=False)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, on_step=False)
