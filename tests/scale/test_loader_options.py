"""Feeding an accelerator: ``num_workers: auto`` (none on a CPU-only machine, cores per GPU less one with
CUDA), ``prefetch_factor`` and pinned memory reach the DataLoader, and a recipe can say ``auto``."""

from __future__ import annotations

import pytest
import torch

from tests.data.conftest import write_videos
from vdiff.data import datamodule as dm_module
from vdiff.data.datamodule import VideoDataModule, auto_num_workers
from vdiff.data.options import LoaderOptions
from vdiff.data.synthetic_datamodule import SyntheticDrivingDataModule


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_options")
    write_videos(root, 4, num_frames=6, per_shard=2)
    return str(root)


def test_auto_workers_follow_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_num_workers() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(dm_module.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert auto_num_workers() == 7  # 64 cores / 8 GPUs, one left for the rank
    monkeypatch.setattr(dm_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert auto_num_workers() == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert auto_num_workers() == dm_module.MAX_AUTO_WORKERS


def test_loader_options_reach_the_dataloader(shards, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dm = VideoDataModule(train=shards, val=shards, num_frames=4, size=16, num_workers="auto")
    assert dm.num_workers == 0 and not dm.pin_memory
    loader = dm.train_dataloader()
    assert loader.num_workers == 0 and loader.prefetch_factor is None
    dm = VideoDataModule(train=shards, val=shards, num_frames=4, size=16, num_workers=1,
                         loader=LoaderOptions(prefetch_factor=4, pin_memory=True))  # fmt: skip
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.num_workers == 1 and loader.prefetch_factor == 4 and loader.pin_memory
    assert len(dm.skips.counts) == 4 * 2  # skip rows: 4 stages x (main process + 1 worker)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0 or 'auto'"):
        VideoDataModule(train=shards, num_workers="many")
    with pytest.raises(ValueError, match="prefetch_factor"):
        VideoDataModule(train=shards, num_workers=1, loader={"prefetch_factor": 0})


def test_a_recipe_can_ask_for_auto_workers(tmp_path, monkeypatch):
    jsonargparse = pytest.importorskip("jsonargparse")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = jsonargparse.ArgumentParser()
    parser.add_subclass_arguments(VideoDataModule, "data")
    config = {"class_path": "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
              "init_args": {"cache_dir": str(tmp_path), "num_workers": "auto", "loader": {"prefetch_factor": 3}}}  # fmt: skip
    data = parser.instantiate_classes(parser.parse_object({"data": config})).data
    assert isinstance(data, SyntheticDrivingDataModule)
    assert data.num_workers == 0 and data.loader.prefetch_factor == 3
