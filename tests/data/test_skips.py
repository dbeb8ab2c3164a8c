"""Bad input loses nothing and stops nothing: every kind of bad sample is skipped, counted by reason
exactly (also from worker processes), warned once, and logged by DataHealthMonitor."""

from __future__ import annotations

import shutil
import tarfile
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from vdiff.data import batch as B
from vdiff.data.datamodule import SKIP_REASONS, VideoDataModule
from vdiff.data.options import LoaderOptions
from vdiff.data.skips import METRIC_PREFIX, DataHealthMonitor, DataSkipWarning, SkipCounter
from vdiff.data.video_io import DECODE_ERROR_REASONS


def test_counter_counts_warns_once_per_reason_and_round_trips():
    counter = SkipCounter(["a", "b"], num_slots=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter.add(0, "a", "first a")
        counter.add(2, "a", "second a")
        counter.add(1, "b", "first b")
        counter.add(1, "b", "second b", count=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataSkipWarning)]
    assert len(messages) == 2 and "first a" in messages[0] and "first b" in messages[1]
    assert counter.totals() == {"a": 2, "b": 3} and counter.total == 5
    assert counter.slot_totals([1]) == {"a": 0, "b": 3}
    restored = SkipCounter(["a", "b"], num_slots=3)
    restored.load_state_dict(counter.state_dict())
    assert restored.totals() == counter.totals()
    resized = SkipCounter(["b", "a", "c"], num_slots=5)
    resized.load_state_dict(counter.state_dict())
    assert resized.totals() == {"a": 2, "b": 3, "c": 0}
    with pytest.raises(KeyError, match="unknown skip reason"):
        counter.add(0, "nope")
    with pytest.raises(IndexError):
        counter.add(3, "a")


def test_every_decoder_reason_is_a_skip_reason():
    assert set(DECODE_ERROR_REASONS) <= set(SKIP_REASONS)


def _eval_module(folder, num_workers):
    return VideoDataModule(val=str(folder), num_frames=8, size=16, val_batch_size=2, num_workers=num_workers)


@pytest.mark.parametrize("start_method", [None, pytest.param("spawn", marks=pytest.mark.slow)])
def test_corrupt_corpus_counted_exactly_with_two_workers(corrupt_corpus, start_method):
    folder, good, expected = corrupt_corpus
    dm = VideoDataModule(val=str(folder), num_frames=8, size=16, val_batch_size=2, num_workers=2,
                         loader=LoaderOptions(worker_start_method=start_method))  # spawned workers get the counter by pickling
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in dm.val_dataloader() for k in batch[B.KEY]]
    assert sorted(keys) == good  # nothing good lost, nothing bad passed
    counts = dm.skipped_counts()
    assert {r: n for r, n in counts.items() if n} == expected, counts
    assert dm.skipped_counts_by_stage()["val"] == counts and sum(dm.skipped_counts_by_stage()["train"].values()) == 0
    # Warnings come from the worker processes (not recorded here): in the main process, none or one per reason.
    assert len([w for w in caught if issubclass(w.category, DataSkipWarning)]) <= len(expected)
    # Reading again counts again (skips are events), still exactly.
    list(dm.val_dataloader())
    assert {r: n for r, n in dm.skipped_counts().items() if n} == {r: 2 * n for r, n in expected.items()}


def test_corrupt_corpus_warns_once_per_reason_in_process(corrupt_corpus):
    folder, good, expected = corrupt_corpus
    dm = _eval_module(folder, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(dm.val_dataloader())
        list(dm.val_dataloader())
    reasons = [str(w.message).split("reason ")[1].split(":")[0].strip("'") for w in caught
               if issubclass(w.category, DataSkipWarning)]
    assert sorted(reasons) == sorted(expected)


def test_training_continues_through_bad_input(corrupt_corpus):
    folder, good, expected = corrupt_corpus
    dm = VideoDataModule(train=str(folder), num_frames=8, size=16, batch_size=4, num_workers=2, epoch_length=6,
                         shuffle_buffer=4)
    keys = [k for batch in dm.train_dataloader() for k in batch[B.KEY]]
    assert len(keys) == 24 and set(keys) <= set(good)
    counts = dm.skipped_counts()
    assert sum(counts.values()) > 0 and {r for r, n in counts.items() if n} <= set(expected)


def test_truncated_shard_keeps_samples_before_the_damage(tmp_path, video_shards):
    folder, keys = video_shards
    good_tar, damaged = folder / "shard-000000.tar", tmp_path / "damaged.tar"
    source = folder / "shard-000001.tar"
    with tarfile.open(source) as tar:
        members = tar.getmembers()  # json, mp4 of 4 samples
    cut = members[5].offset_data + 100  # inside the third sample's second file
    damaged.write_bytes(source.read_bytes()[:cut])
    dm = VideoDataModule(val=[str(good_tar), str(damaged)], num_frames=4, size=16, num_workers=0)
    seen = [k for batch in dm.val_dataloader() for k in batch[B.KEY]]
    assert seen == keys[:6]
    assert dm.skipped_counts()["bad_shard"] == 1


class _Probe(LightningModule):
    """Checks that training batches arrive as float video and records validation keys."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        video = batch[B.VIDEO]
        assert video.dtype == torch.float32 and video.min() >= -1 and video.max() <= 1
        return self.layer(video.mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        assert batch[B.VIDEO].dtype == torch.float32
        self.val_keys += batch[B.KEY]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(**kwargs):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_monitor_logs_exactly_what_was_injected(corrupt_corpus):
    folder, good, expected = corrupt_corpus
    dm = _eval_module(folder, num_workers=2)
    model = _Probe()
    trainer = _trainer(callbacks=[DataHealthMonitor()])
    trainer.validate(model, datamodule=dm)
    assert sorted(model.val_keys) == good
    logged = {k[len(METRIC_PREFIX):]: int(v) for k, v in trainer.callback_metrics.items() if k.startswith(METRIC_PREFIX)}
    assert set(logged) == set(SKIP_REASONS)
    assert {r: n for r, n in logged.items() if n} == expected


def test_monitor_during_fit_logs_the_counts_of_all_workers(corrupt_corpus, tmp_path):
    folder, good, expected = corrupt_corpus
    train = tmp_path / "train"
    shutil.copytree(folder, train)
    dm = VideoDataModule(train=str(train), val=str(folder), num_frames=8, size=16, batch_size=2, num_workers=2,
                         epoch_length=4, shuffle_buffer=2)
    monitor = DataHealthMonitor(every_n_train_steps=2)
    trainer = _trainer(max_epochs=1, callbacks=[monitor])
    trainer.fit(_Probe(), datamodule=dm)
    assert {r: n for r, n in dm.skipped_counts_by_stage()["val"].items() if n} == expected
    logged = {k[len(METRIC_PREFIX):]: int(v) for k, v in trainer.callback_metrics.items() if k.startswith(METRIC_PREFIX)}
    assert logged == dm.skipped_counts() == monitor.last_totals
    assert sum(dm.skipped_counts_by_stage()["train"].values()) > 0
    # The datamodule checkpoints its counts and its training position.
    state = dm.state_dict()
    assert state["train_loader"] == {"epoch": 0, "batches": 4}
    assert int(state["skips"]["counts"].sum()) == sum(dm.skipped_counts().values())
