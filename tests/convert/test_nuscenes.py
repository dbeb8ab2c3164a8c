"""A tiny nuScenes tree in the real layout: json tables, CAM_FRONT samples + sweeps at 12 Hz, CAN bus files.

Expected actions are computed here from the analytic ego motion (a straight line or a circular arc)
and an explicit pinhole projection, not with the converter's code.
"""

import argparse
import json
import math

import cv2
import numpy as np
import pytest

from tests.convert.helpers import frame_index_from_level, indexed_video, read_shard_set
from vdiff.data.convert import nuscenes
from vdiff.data.convert.nuscenes import convert_nuscenes
from vdiff.data.schema import COMMANDS

RATE, N = 12, 37  # 3 s of camera frames at 12 Hz
W, H = 64, 36
FX, CX, CY = 40.0, 32.0, 18.0
CAM_T = [1.5, 0.0, 1.5]
CAM_Q = [0.5, -0.5, 0.5, -0.5]  # camera z forward = ego x, camera x right = ego -y, y down = ego -z
HEADING0, ORIGIN = 0.6, np.array([300.0, 700.0])
SPEED = 5.0


def ego_local(t, yaw_rate):
    """Position in the scene's start frame after t seconds at SPEED and yaw_rate (+ = left)."""
    if yaw_rate == 0:
        return np.array([SPEED * t, 0.0])
    r = SPEED / yaw_rate
    return np.array([r * math.sin(yaw_rate * t), r * (1 - math.cos(yaw_rate * t))])


def build_tree(root, scenes):
    """scenes: list of (name, yaw_rate, can kind: 'feedback' | 'monitor' | None, drop an image: bool)."""
    tables = {name: [] for name in nuscenes.TABLES}
    tables["calibrated_sensor"] = [
        {"token": "cs-front", "sensor_token": "sensor-front", "translation": CAM_T, "rotation": CAM_Q,
         "camera_intrinsic": [[FX, 0, CX], [0, FX, CY], [0, 0, 1]]},
        {"token": "cs-back", "sensor_token": "sensor-back", "translation": [-1, 0, 1.5], "rotation": [0.5, 0.5, 0.5, 0.5],
         "camera_intrinsic": [[FX, 0, CX], [0, FX, CY], [0, 0, 1]]},
    ]
    images = indexed_video(N, height=H, width=W, level_step=6)
    for number, (name, yaw_rate, can, drop) in enumerate(scenes):
        t0 = 1_532_402_900_000_000 + number * 100_000_000
        tables["log"].append({"token": f"log-{name}", "logfile": f"n015-{name}", "vehicle": "n015", "date_captured": "2018-07-24", "location": "singapore-onenorth"})
        samples = [f"{name}-sample{i}" for i in range((N - 1) // 6 + 1)]
        for i, token in enumerate(samples):
            tables["sample"].append({"token": token, "timestamp": t0 + int(i * 0.5e6), "scene_token": f"{name}-token",
                                     "prev": samples[i - 1] if i else "", "next": samples[i + 1] if i + 1 < len(samples) else ""})
            tables["sample_data"].append({"token": f"{token}-back", "sample_token": token, "ego_pose_token": f"{name}-pose0",
                                          "calibrated_sensor_token": "cs-back", "timestamp": t0 + int(i * 0.5e6), "fileformat": "jpg",
                                          "is_key_frame": True, "height": H, "width": W, "filename": f"samples/CAM_BACK/{token}.jpg", "prev": "", "next": ""})
        tables["scene"].append({"token": f"{name}-token", "log_token": f"log-{name}", "nbr_samples": len(samples),
                                "first_sample_token": samples[0], "last_sample_token": samples[-1], "name": name, "description": "test"})
        for k in range(N):
            t = k / RATE
            key = k % 6 == 0
            folder = "samples" if key else "sweeps"
            filename = f"{folder}/CAM_FRONT/n015-{name}__CAM_FRONT__{k:03d}.jpg"
            if not (drop and k == 7):
                (root / folder / "CAM_FRONT").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / filename), images[k][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            local = ego_local(t, yaw_rate)
            c, s = math.cos(HEADING0), math.sin(HEADING0)
            world = ORIGIN + np.array([c * local[0] - s * local[1], s * local[0] + c * local[1]])
            yaw = HEADING0 + yaw_rate * t
            tables["ego_pose"].append({"token": f"{name}-pose{k}", "timestamp": t0 + round(t * 1e6),
                                       "rotation": [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)], "translation": [*world, 0.0]})
            tables["sample_data"].append({"token": f"{name}-sd{k}", "sample_token": samples[k // 6], "ego_pose_token": f"{name}-pose{k}",
                                          "calibrated_sensor_token": "cs-front", "timestamp": t0 + round(t * 1e6), "fileformat": "jpg",
                                          "is_key_frame": key, "height": H, "width": W, "filename": filename,
                                          "prev": f"{name}-sd{k - 1}" if k else "", "next": f"{name}-sd{k + 1}" if k + 1 < N else ""})
        (root / "can_bus").mkdir(exist_ok=True)
        if can == "feedback":  # radians, + = left, 100 Hz, spanning the scene
            messages = [{"utime": t0 + u * 10_000 - 500_000, "value": 0.1 + 0.05 * (u * 0.01 - 0.5)} for u in range(int(4.0 * 100))]
            (root / "can_bus" / f"{name}_steeranglefeedback.json").write_text(json.dumps(messages))
        elif can == "monitor":  # degrees, 2 Hz
            messages = [{"utime": t0 + int(u * 0.5e6), "steering": 30.0 - 2.0 * u * 0.5, "vehicle_speed": 18.0} for u in range(8)]
            (root / "can_bus" / f"{name}_vehicle_monitor.json").write_text(json.dumps(messages))
    (root / "v1.0-trainval").mkdir(parents=True)
    for table, records in tables.items():
        (root / "v1.0-trainval" / f"{table}.json").write_text(json.dumps(records))


def expected_goal(local_end):
    """Ground point (x, y, 0) in the ego frame through the camera, by hand: (u/W, v/H) or None."""
    d = np.array([local_end[0] - CAM_T[0], local_end[1] - CAM_T[1], -CAM_T[2]])
    x_cam, y_cam, z_cam = -d[1], -d[2], d[0]
    u, v = FX * x_cam / z_cam + CX, FX * y_cam / z_cam + CY
    return [u / W, v / H]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuscenes")
    build_tree(root, [
        ("scene-0001", 0.0, "feedback", False),  # train: straight
        ("scene-0003", 0.4, "monitor", False),  # val: left turn
        ("scene-0002", 0.0, None, False),  # train: no CAN bus -> skipped
        ("scene-0004", 0.0, "feedback", True),  # train: a missing image -> skipped
    ])
    reports = convert_nuscenes(root, "v1.0-trainval", root / "out")
    return root, reports


def test_splits_and_skipped_scenes(converted):
    root, reports = converted
    assert sorted(reports) == ["train", "val"]
    assert sorted(read_shard_set(root / "out" / "train")) == ["scene-0001"]
    assert sorted(read_shard_set(root / "out" / "val")) == ["scene-0003"]
    skipped = {item: reason for item, reason, _ in reports["train"].failed}
    assert skipped == {"scene-0002": "missing_can_bus", "scene-0004": "missing_images"}


@pytest.mark.parametrize("split, name, yaw_rate, command", [("train", "scene-0001", 0.0, "straight"), ("val", "scene-0003", 0.4, "left")])
def test_frames_and_actions(converted, split, name, yaw_rate, command):
    root, _ = converted
    frames, meta = read_shard_set(root / "out" / split)[name]
    assert meta.fps == 10.0 and meta.num_frames == 31 and frames.shape == (31, H, W, 3)  # 3 s at 10 Hz
    nearest = [round(1.2 * j) for j in range(31)]  # 12 Hz frame nearest to j / 10 s
    assert [frame_index_from_level(f, level_step=6) for f in frames] == nearest
    a = meta.actions
    assert set(a) == {"speed", "yaw_rate", "steering", "trajectory", "command", "goal"}
    np.testing.assert_allclose(a["speed"], SPEED, rtol=0.01)
    np.testing.assert_allclose(a["yaw_rate"], yaw_rate, atol=1e-6)
    valid = [i for i, k in enumerate(nearest) if k / RATE + 2.0 <= 3.0 + 1e-9]
    assert valid == list(range(11))
    assert [i for i, t in enumerate(a["trajectory"]) if t is not None] == valid
    for j in valid:
        k = nearest[j]
        t = k / RATE
        here, heading = ego_local(t, yaw_rate), yaw_rate * t
        c, s = math.cos(heading), math.sin(heading)
        want = []
        for step in range(1, 5):
            d = ego_local(t + 0.5 * step, yaw_rate) - here
            want.append([c * d[0] + s * d[1], -s * d[0] + c * d[1]])
        np.testing.assert_allclose(a["trajectory"][j], want, atol=0.02)
        assert a["command"][j] == COMMANDS[command]
        np.testing.assert_allclose(a["goal"][j], expected_goal(want[-1]), atol=0.01)
        if yaw_rate > 0:
            assert want[-1][1] > 0
        else:  # evenly spaced straight ahead
            np.testing.assert_allclose(np.array(want)[:, 0], [2.5, 5.0, 7.5, 10.0], atol=1e-3)
    assert a["command"][11] is None and a["goal"][11] is None
    times = np.array([k / RATE for k in nearest])
    if name == "scene-0001":  # steeranglefeedback: radians -> degrees
        np.testing.assert_allclose(a["steering"], np.degrees(0.1 + 0.05 * times), atol=0.01)
        assert meta.extra["steering_source"] == "steeranglefeedback"
    else:  # vehicle_monitor: degrees (2 Hz, interpolated)
        np.testing.assert_allclose(a["steering"], 30.0 - 2.0 * times, atol=0.01)
    assert meta.extra["scene"] == name and meta.extra["location"] == "singapore-onenorth"


def test_allow_missing_can_bus_and_clips(converted, tmp_path):
    root, _ = converted
    reports = convert_nuscenes(root, "v1.0-trainval", tmp_path / "out", split="train", allow_missing_can_bus=True, clip_frames=10, size=(18, 32))
    samples = read_shard_set(tmp_path / "out" / "train")
    assert sorted(samples) == [f"scene-000{n}-00{i}" for n in (1, 2) for i in range(3)]
    frames, meta = samples["scene-0002-001"]
    assert frames.shape == (10, 18, 32, 3) and "steering" not in meta.actions and "speed" in meta.actions
    assert meta.extra["first_frame"] == 10
    assert [item for item, _, _ in reports["train"].failed] == ["scene-0004"]


@pytest.mark.parametrize("contents", [b"[" * 200_000 + b"]" * 200_000, b'[{"utime": 1e400, "value": 0.1}]',
                                      b'[{"utime": 1, "value": NaN}]', b'{"utime": 1}'])  # fmt: skip
def test_a_malformed_can_bus_file_skips_its_scene_only(tmp_path, contents):
    root = tmp_path / "nuscenes"
    build_tree(root, [("scene-0001", 0.0, "feedback", False), ("scene-0005", 0.0, "feedback", False)])
    bad = root / "can_bus" / "scene-0005_steeranglefeedback.json"
    bad.write_bytes(contents)
    reports = convert_nuscenes(root, "v1.0-trainval", tmp_path / "out", split="train", clip_frames=30, size=(18, 32))
    assert sorted(read_shard_set(tmp_path / "out" / "train")) == ["scene-0001-000"]
    ((item, reason, message),) = reports["train"].failed
    assert (item, reason) == ("scene-0005", "bad_can_bus") and f"CAN bus file {bad}" in message


def test_crop_moves_the_goal(converted, tmp_path):
    root, _ = converted
    # On the constant left arc the goal 2 s ahead sits at u = 0.18 of the 64 px frame (column 11.7).
    u, v = expected_goal(ego_local(2.0, 0.4))
    assert 11 < u * W < 12.5
    # A centred 48x36 crop starts at column 8: u' = (u * 64 - 8) / 48, v unchanged.
    convert_nuscenes(root, "v1.0-trainval", tmp_path / "wide", split="val", size=(36, 48), resize="crop")
    _, meta = read_shard_set(tmp_path / "wide" / "val")["scene-0003"]
    for goal in meta.actions["goal"][:11]:
        assert goal == pytest.approx([(u * W - 8) / 48, v], abs=0.01)
    # A centred 36x36 crop starts at column 14: the goal leaves the frame and is invalid everywhere.
    convert_nuscenes(root, "v1.0-trainval", tmp_path / "square", split="val", size=(36, 36), resize="crop")
    _, meta = read_shard_set(tmp_path / "square" / "val")["scene-0003"]
    assert "goal" not in meta.actions and "trajectory" in meta.actions


def test_cli_and_bad_version(converted, tmp_path, capsys):
    root, _ = converted
    parser = argparse.ArgumentParser()
    nuscenes.add_arguments(parser)
    args = parser.parse_args([str(root), "--out", str(tmp_path / "out"), "--split", "val"])
    assert nuscenes.run(args) == 0
    assert sorted(read_shard_set(tmp_path / "out" / "val")) == ["scene-0003"]
    err = capsys.readouterr().err
    assert "nuScenes val: 100%" in err and "1/1" in err and "scene/s" in err  # a progress bar over the scenes
    with pytest.raises(ValueError, match="unknown nuScenes version"):
        convert_nuscenes(root, "v2.0", tmp_path / "other")
