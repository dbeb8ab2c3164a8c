"""A training progress bar over optimizer steps: ``Training  13%|#3  | 131/1000 [00:45<05:01, 2.90step/s, ...]``.

Lightning's bars count batches within an epoch and label them ``Epoch 19/-2`` when a run is limited by
``max_steps`` (``max_epochs`` is then -1). :class:`StepProgressBar` counts the run's optimizer steps
(``trainer.global_step``) towards ``max_steps`` across epochs, so the bar shows how far training is and when it will
end (the ETA); the epoch moves to the postfix. Runs limited by epochs keep Lightning's per-epoch bar, labelled
``Epoch N/M``. ``vdiff fit`` installs it unless a recipe names its own progress bar.

:func:`phase_progress` is the bar of work that callbacks do outside Lightning's loops (scoring the checkpoint after
``fit``, the steering test), so that no phase of a run is silent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm.auto import tqdm

T = TypeVar("T")


def phase_progress(trainer: L.Trainer, items: Iterable[T], desc: str, unit: str = "batch",
                   total: int | None = None) -> tqdm:
    """A progress bar (on stderr) over ``items`` for work a callback does outside Lightning's loops, such as scoring
    the checkpoint after ``fit``: shown on rank zero while the trainer shows progress bars (not with
    ``enable_progress_bar: false``). ``total`` defaults to ``len(items)`` when it has one (then the bar has an ETA).
    Use it as a context manager so that it closes when the loop stops early."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    shown = trainer.is_global_zero and trainer.progress_bar_callback is not None
    return tqdm(items, desc=desc, unit=unit, total=total, disable=not shown, dynamic_ncols=True)


class StepProgressBar(TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` whose training bar counts optimizer steps to
    ``max_steps`` (with their rate and the time left), resumed runs starting at the checkpoint's step.

    Args:
        refresh_rate: redraw every this many steps (and batches of the validation bars).
        leave: keep each epoch's bar of an epoch-limited run on the screen.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=0, leave=leave)

    @property
    def counts_steps(self) -> bool:
        """Whether the run is limited by ``max_steps`` (then the bar counts steps), not by epochs."""
        trainer = self.trainer
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def train_description(self) -> str:
        return "Training"

    def init_train_tqdm(self) -> Tqdm:
        if not self.counts_steps:
            return super().init_train_tqdm()
        return Tqdm(
            desc=self.train_description,
            total=self.trainer.max_steps,
            initial=self.trainer.global_step,  # a resumed run: the rate and the ETA count this run's steps only
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.counts_steps:
            return  # one bar for the whole run
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.counts_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            _show_step(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.counts_steps:
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counts_steps and not self.train_progress_bar.disable:
            _show_step(self.train_progress_bar, trainer.global_step)
        super().on_train_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        if self.counts_steps:
            metrics["epoch"] = trainer.current_epoch
        return metrics


def _show_step(bar: Tqdm, step: int) -> None:
    if not bar.disable:
        bar.n = step
        bar.refresh()
