"""VideoDataModule's option groups (decoding, augmentation, loader): each reaches what it configures, a recipe
writes them as mappings, and the flat names they replaced fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdiff.data.datamodule import VideoDataModule
from vdiff.data.options import Augmentation, Decoding, LoaderOptions


def test_each_group_reaches_what_it_configures(video_shards):
    folder, _ = video_shards
    dm = VideoDataModule(
        train=str(folder), val=str(folder), num_frames=3, size=16, num_workers=1, target_fps=5.0,
        decoding=Decoding(resize=False, threads=2),
        augmentation=Augmentation(crop="center", flip=True),
        loader=LoaderOptions(pin_memory=True, prefetch_factor=3, worker_start_method="spawn", float_on_device=False),
    )  # fmt: skip
    assert (dm.spec.target_fps, dm.spec.frame_stride, dm.spec.resize, dm.spec.decode_threads) == (5.0, None, False, 2)
    assert dm.eval_spec.target_fps == 5.0
    assert dm.train_stream_kwargs() == {"crop": "center", "flip": True}
    assert dm.collate_fn().keywords == {"normalize": True}  # float in the workers
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.prefetch_factor == 3 and loader.pin_memory
        assert loader.multiprocessing_context.get_start_method() == "spawn"


def test_groups_default_and_accept_mappings(video_shards):
    folder, _ = video_shards
    dm = VideoDataModule(train=str(folder), num_workers=0)
    assert (dm.decoding, dm.augmentation, dm.loader) == (Decoding(), Augmentation(), LoaderOptions())
    assert dm.spec.resize and dm.spec.decode_threads == 1 and dm.train_stream_kwargs() == {"crop": "random", "flip": False}
    dm = VideoDataModule(train=str(folder), num_workers=0, decoding={"threads": 2}, augmentation={"flip": True},
                         loader={"float_on_device": False})  # as a YAML recipe gives them  # fmt: skip
    assert dm.spec.decode_threads == 2 and dm.augmentation.flip and not dm.loader.float_on_device


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decoding": {"threads": 0}}, "decoding: threads must be an integer >= 1"),
        ({"augmentation": {"crop": "middle"}}, "augmentation: crop must be 'random' or 'center'"),
        ({"loader": {"prefetch_factor": 0}}, "loader: prefetch_factor must be an integer >= 1"),
        ({"decoding": {"target_fps": 5.0}}, r"decoding: unknown field\(s\) \['target_fps'\]; the fields are \['resize', "),
    ],
)
def test_a_bad_option_fails_in_one_line_naming_its_group(video_shards, kwargs, message):
    folder, _ = video_shards
    with pytest.raises(ValueError, match=message) as info:
        VideoDataModule(train=str(folder), **kwargs)
    assert "\n" not in str(info.value)


def test_a_recipe_writes_the_groups_and_a_flat_name_fails(video_shards):
    jsonargparse = pytest.importorskip("jsonargparse")
    folder, _ = video_shards
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=VideoDataModule)
    recipe = f"""
data:
  class_path: vdiff.data.datamodule.VideoDataModule
  init_args:
    train: {folder}
    num_frames: 4
    size: 16
    decoding: {{threads: 2}}
    augmentation: {{crop: center}}
    loader: {{prefetch_factor: 2}}
    num_workers: 0
"""
    dm = parser.instantiate(parser.parse_string(recipe)).data
    assert dm.spec.decode_threads == 2 and dm.augmentation.crop == "center" and dm.loader.prefetch_factor == 2
    with pytest.raises((jsonargparse.ArgumentError, SystemExit, ValueError), match="flip"):
        parser.parse_string(recipe.replace("augmentation: {crop: center}", "flip: true"))


def test_the_command_line_changes_one_field_of_a_recipes_group(capsys):
    import yaml

    from vdiff.cli import main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "svd_xt.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(recipe), "--data.init_args.decoding.threads", "3", "--data.init_args.augmentation.flip",
              "true", "--print_config"])  # fmt: skip
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["decoding"] == {"resize": True, "threads": 3}  # the recipe's resize kept
    assert data["augmentation"] == {"crop": "center", "flip": True} and data["target_fps"] == 7.0
