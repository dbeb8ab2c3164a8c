import argparse
import json

import cv2
import numpy as np
import pytest

from tests.convert.helpers import frame_index_from_level, indexed_video, read_shard_set
from vdiff.data.convert import cityscapes
from vdiff.data.convert.cityscapes import convert_cityscapes

H, W = 24, 48  # a tiny 1:2 frame, the aspect ratio of Cityscapes' 1024x2048


def make_tree(root, split="train"):
    """Three full snippets, one short one, one with a corrupt frame; vehicle json for one snippet."""
    frames = indexed_video(30, height=H, width=W, level_step=6)
    snippets = {("aachen", 0): True, ("aachen", 1): False, ("bochum", 3): False}
    for (city, seq), with_vehicle in snippets.items():
        folder = root / "leftImg8bit_sequence" / split / city
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(30):
            name = f"{city}_{seq:06d}_{k + 100:06d}"
            cv2.imwrite(str(folder / f"{name}_leftImg8bit.png"), frames[k][..., ::-1])
            if with_vehicle:
                vfolder = root / "vehicle_sequence" / split / city
                vfolder.mkdir(parents=True, exist_ok=True)
                record = {"gpsHeading": 10.0, "gpsLatitude": 50.7, "gpsLongitude": 6.1, "outsideTemperature": 20.0,
                          "speed": 5.0 + 0.1 * k, "yawRate": 0.01 * k}
                (vfolder / f"{name}_vehicle.json").write_text(json.dumps(record))
    bochum = root / "leftImg8bit_sequence" / split / "bochum"
    (bochum / "bochum_000003_000105_leftImg8bit.png").write_bytes(b"\x89PNG truncated")
    for k in range(20):  # a run shorter than 30 frames
        cv2.imwrite(str(bochum / f"bochum_000004_{k:06d}_leftImg8bit.png"), frames[k][..., ::-1])
    return frames


def test_snippets_to_30_frame_clips_with_vehicle_actions(tmp_path):
    source = make_tree(tmp_path)
    report = convert_cityscapes(tmp_path, tmp_path / "out", "train", size=(16, 16))
    assert report.clips_kept == 2 and report.dropped["too_short"] == 1
    assert [(item, reason) for item, reason, _ in report.failed] == [("bochum_000003_000100", "unreadable")]
    samples = read_shard_set(tmp_path / "out" / "train")
    assert sorted(samples) == ["aachen_000000_000100", "aachen_000001_000100"]
    for frames, meta in samples.values():
        assert frames.shape == (30, 16, 16, 3) and meta.fps == 17.0 and meta.source == "cityscapes"
        assert [frame_index_from_level(f, level_step=6) for f in frames] == list(range(30))
        squashed = np.stack([cv2.resize(f, (16, 16), interpolation=cv2.INTER_AREA) for f in source])
        assert np.abs(frames.astype(int) - squashed.astype(int)).mean() < 3
    actions = samples["aachen_000000_000100"][1].actions
    assert set(actions) == {"speed", "yaw_rate"}
    np.testing.assert_allclose(actions["speed"], 5.0 + 0.1 * np.arange(30))
    np.testing.assert_allclose(actions["yaw_rate"], 0.01 * np.arange(30))
    assert samples["aachen_000001_000100"][1].actions == {}  # no vehicle json: actions invalid


def test_crop_keeps_the_centre(tmp_path):
    folder = tmp_path / "leftImg8bit_sequence" / "val" / "lindau"
    folder.mkdir(parents=True)
    image = np.zeros((H, W, 3), np.uint8)
    image[:, :16] = (200, 30, 30)
    image[:, 16:32] = (30, 200, 30)
    image[:, 32:] = (30, 30, 200)
    for k in range(30):
        cv2.imwrite(str(folder / f"lindau_000000_{k:06d}_leftImg8bit.png"), image[..., ::-1])
    convert_cityscapes(tmp_path, tmp_path / "out", "val", size=(16, 16), resize="crop")
    ((frames, meta),) = read_shard_set(tmp_path / "out" / "val").values()
    # The centred 24x24 crop spans source columns 12..35: red 12-15, green 16-31, blue 32-35, so at
    # 16 px wide red covers output columns 0-2 and blue 13-15 (a squash would put red in 0-5).
    dominant = [int(np.argmax(frames[0][:, col].mean(axis=0))) for col in range(16)]
    assert dominant[0] == 0 and dominant[4] == 1 and dominant[8] == 1 and dominant[11] == 1 and dominant[15] == 2
    assert meta.extra["resize"] == "crop"


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit_sequence"):
        convert_cityscapes(tmp_path, tmp_path / "out", "test")


def test_cli(tmp_path, capsys):
    make_tree(tmp_path)
    parser = argparse.ArgumentParser()
    cityscapes.add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--out", str(tmp_path / "out"), "--split", "train", "--size", "16", "32", "--workers", "2"])
    assert cityscapes.run(args) == 0
    err = capsys.readouterr().err
    assert "cityscapes train: 100%" in err and "3/3" in err and "clip/s" in err  # a progress bar over the clips
    samples = read_shard_set(tmp_path / "out" / "train")
    assert len(samples) == 2 and all(m.width == 32 and m.height == 16 for _, m in samples.values())
