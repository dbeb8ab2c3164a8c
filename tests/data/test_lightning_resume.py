"""A real Trainer stopped mid-run and resumed from its checkpoint trains on exactly the batches an
uninterrupted run trains on: the VideoDataModule's loader state (batches consumed, epoch) round-trips
through Lightning's checkpoints, whichever hook wrote the checkpoint (a train batch mid-epoch, the last
batch of an epoch, the end of a validation run)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from vdiff.data import batch as B
from vdiff.data.datamodule import VideoDataModule

EPOCH_LENGTH = 4  # batches per epoch
MAX_STEPS = 11  # almost three epochs


class _Recorder(LightningModule):
    """Records what every training step sees: (epoch, keys, first frame index and pixel sum per clip)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        video = batch[B.VIDEO].float()
        self.seen.append((
            self.trainer.current_epoch,
            tuple(batch[B.KEY]),
            tuple(batch[B.FRAME_INDICES][:, 0].tolist()),
            tuple(round(v, 3) for v in video.flatten(1).sum(1).tolist()),  # tells crops apart
        ))
        return self.layer(torch.ones(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_metric", float(self.global_step), batch_size=len(batch[B.KEY]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Crash(Exception):
    pass


class _CrashAfterCheckpoints(Callback):
    """Raise at the first training batch after the ``n``-th checkpoint was written."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.saved = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved >= self.n:
            raise _Crash


def _datamodule(folder, num_workers: int) -> VideoDataModule:
    return VideoDataModule(train=str(folder), val=str(folder), num_frames=3, size=16, batch_size=2,
                           val_batch_size=8, num_workers=num_workers, seed=5, shuffle_buffer=6,
                           epoch_length=EPOCH_LENGTH)


def _trainer(root, checkpoint: ModelCheckpoint, val_check_interval: int | None, extra=()) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False, default_root_dir=str(root),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1 if val_check_interval else 0, val_check_interval=val_check_interval,
        check_val_every_n_epoch=None if val_check_interval else 1,
        callbacks=[checkpoint, *extra],
    )


# (every_n_train_steps, val_check_interval, monitor): where the checkpoint that is resumed was written
SAVE_POINTS = {
    "mid_epoch": (5, None, None),  # step 5: second batch of epoch 1
    "epoch_end": (4, None, None),  # step 4: the last batch of epoch 0
    "validation_end": (None, 3, "val_metric"),  # after validation at step 3, 6, ...
}


@pytest.mark.parametrize(
    "where, num_workers",
    [("mid_epoch", 0), ("epoch_end", 0), ("validation_end", 0), ("mid_epoch", 2)],
)
def test_resumed_trainer_consumes_the_uninterrupted_batches(tmp_path, video_shards, where, num_workers):
    folder, _ = video_shards
    every, val_interval, monitor = SAVE_POINTS[where]

    def checkpoint(dirpath):
        return ModelCheckpoint(dirpath=str(dirpath), every_n_train_steps=every, monitor=monitor, mode="max",
                               save_top_k=1 if monitor else 0, save_last=True)

    reference = _Recorder()
    _trainer(tmp_path / "full", checkpoint(tmp_path / "full"), val_interval).fit(
        reference, datamodule=_datamodule(folder, num_workers))
    assert len(reference.seen) == MAX_STEPS

    first = _Recorder()
    with pytest.raises(_Crash):
        _trainer(tmp_path / "run", checkpoint(tmp_path / "run"), val_interval, [_CrashAfterCheckpoints(1)]).fit(
            first, datamodule=_datamodule(folder, num_workers))
    stopped = len(first.seen)
    assert 0 < stopped < MAX_STEPS
    assert first.seen == reference.seen[:stopped]
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)
    assert state["global_step"] == stopped
    saved_position = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert saved_position == {"epoch": (stopped - 1) // EPOCH_LENGTH, "batches": (stopped - 1) % EPOCH_LENGTH + 1}

    resumed = _Recorder()
    _trainer(tmp_path / "run", checkpoint(tmp_path / "run"), val_interval).fit(
        resumed, datamodule=_datamodule(folder, num_workers), ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert resumed.seen == reference.seen[stopped:]
