"""The recipes' data blocks load converted shards: every init_arg is real, batches carry the actions."""

from pathlib import Path

import pytest
import yaml

from tests.convert.test_cityscapes import make_tree
from tests.convert.test_nuscenes import build_tree
from vdiff.data.convert.cityscapes import convert_cityscapes
from vdiff.data.convert.nuscenes import convert_nuscenes
from vdiff.data.datamodule import VideoDataModule

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "data"


def data_module(recipe: str, **overrides) -> VideoDataModule:
    block = yaml.safe_load((RECIPES / recipe).read_text())["data"]
    assert block["class_path"] == "vdiff.data.datamodule.VideoDataModule"
    args = {**block["init_args"], "num_workers": 0, "shuffle_buffer": 4, **overrides}
    return VideoDataModule(**args)


def first_batch(module: VideoDataModule) -> dict:
    module.setup("fit")
    return next(iter(module.train_dataloader()))


def test_cityscapes_recipe_reads_converted_shards(tmp_path):
    make_tree(tmp_path / "cityscapes")
    convert_cityscapes(tmp_path / "cityscapes", tmp_path / "data", "train", size=(16, 16))
    module = data_module("cityscapes.yaml", train=str(tmp_path / "data" / "train"), val=None, test=None, size=16, batch_size=2)
    batch = first_batch(module)
    assert tuple(batch["video"].shape[:2]) == (2, 30)
    assert batch["fps"].tolist() == pytest.approx([17.0, 17.0])
    assert "speed_valid" in batch["actions"]


def test_nuscenes_recipe_reads_converted_shards(tmp_path):
    build_tree(tmp_path / "nuscenes", [("scene-0001", 0.4, "feedback", False)])
    convert_nuscenes(tmp_path / "nuscenes", "v1.0-trainval", tmp_path / "data", split="train")
    train = [{"path": str(tmp_path / "data" / "train"), "weight": 1.0, "name": "nuscenes"}]
    module = data_module("nuscenes.yaml", train=train, val=None, size=[16, 32], num_frames=31)  # the whole scene: frames with and without a future
    batch = first_batch(module)
    actions = batch["actions"]
    assert tuple(batch["video"].shape[:2]) == (1, 31)
    for key in ("speed", "yaw_rate", "steering", "trajectory", "command", "goal"):
        assert actions[f"{key}_valid"].any(), key
