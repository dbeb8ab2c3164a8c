"""A training time budget that says so, in one line, when it ends training before ``max_steps``.

``vdiff fit`` turns a recipe's ``trainer.max_time`` into a :class:`TimeBudget` (instead of Lightning's silent
:class:`~lightning.pytorch.callbacks.Timer`), so that ``--trainer.max_steps 20`` on a recipe with a one-minute
budget never stops at step 4 without a word: the budget prints which step it stopped at, of how many, and how to
train them all.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import Timer


class TimeBudget(Timer):
    """Lightning's :class:`~lightning.pytorch.callbacks.Timer` (stop training when ``duration`` has elapsed,
    checked after every step, resumed with the elapsed time), which prints one line on stderr when it ended training
    before ``trainer.max_steps`` (or ``max_epochs``).

    Args:
        duration: ``"DD:HH:MM:SS"``, a :class:`datetime.timedelta` or its keyword arguments (as ``trainer.max_time``).
        interval: check the time after every ``"step"`` or ``"epoch"``.
    """

    def __init__(self, duration: str | timedelta | dict[str, int], interval: str = "step") -> None:
        super().__init__(duration=duration, interval=interval, verbose=False)
        self.stopped_at: int | None = None  # the global step at which the budget ended training

    @property
    def state_key(self) -> str:
        return "Timer"  # resumes the elapsed time of a checkpoint written with Lightning's max_time Timer too

    def _check_time_remaining(self, trainer: L.Trainer) -> None:
        stopping = trainer.should_stop
        super()._check_time_remaining(trainer)
        if trainer.should_stop and not stopping and self.stopped_at is None:
            self.stopped_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        message = self.early_end_message(trainer)
        if message and trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)

    def early_end_message(self, trainer: L.Trainer) -> str | None:
        """The line to print when this budget ended training short of its step (or epoch) limit, else None."""
        if self.stopped_at is None:
            return None
        budget = str(timedelta(seconds=round(self._duration)))
        if trainer.max_steps is not None and trainer.max_steps > 0:
            if self.stopped_at >= trainer.max_steps:
                return None
            short = f"step {self.stopped_at} of max_steps {trainer.max_steps}"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            if trainer.current_epoch + 1 >= trainer.max_epochs:
                return None
            short = f"epoch {trainer.current_epoch + 1} of max_epochs {trainer.max_epochs} (step {self.stopped_at})"
        else:
            return None  # no step or epoch limit: the budget is the only end
        return (
            f"the time budget trainer.max_time={budget} ended training at {short}; "
            "--trainer.max_time null trains them all"
        )
