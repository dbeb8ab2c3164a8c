"""The work callbacks do after `fit` (scoring the checkpoint, the steering test) shows a progress bar while the
trainer shows progress bars, and nothing with `enable_progress_bar: false`."""

from __future__ import annotations

import re

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tests.lit.test_vista_module import driving_batch, tiny_vista
from vdiff.callbacks.checkpoint_eval import EvaluateCheckpoint
from vdiff.callbacks.steering import SteeringTest


class _Clips(L.LightningDataModule):
    """One training batch; two held-out batches of 1 clip."""

    def __init__(self) -> None:
        super().__init__()
        self.batch = driving_batch(batch=1, frames=6, size=16)

    def train_dataloader(self):
        return DataLoader([self.batch], batch_size=None)

    def val_dataloader(self):
        return DataLoader([self.batch] * 2, batch_size=None)


@pytest.mark.parametrize("bars", [True, False])
def test_scoring_and_steering_after_fit_show_their_progress(bars, tmp_path, capsys):
    callbacks = [ModelCheckpoint(tmp_path, save_last=True), EvaluateCheckpoint(max_batches=1),
                 SteeringTest(steering=100.0, max_shift=2)]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=bars,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(tiny_vista(sample_actions=False), datamodule=_Clips())
    printed = capsys.readouterr()
    assert "Checkpoint evaluation on held-out clips" in printed.out and "Steering test on 2 held-out clips" in printed.out
    scoring = re.findall(r"Scoring the checkpoint on held-out clips: +(\d+)%\|[^|]*\| (\d+)/(\d+)", printed.err)
    steering = re.findall(r"Steering test on held-out clips: +(\d+)%\|[^|]*\| (\d+)/(\d+)", printed.err)
    if bars:
        assert scoring[-1] == ("100", "1", "1") and steering[-1] == ("100", "2", "2"), printed.err
    else:
        assert not scoring and not steering and "held-out clips" not in printed.err
