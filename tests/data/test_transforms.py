"""Crop planning, goal points that follow resize/crop/flip, action arrays, flips and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdiff.data import batch as B
from vdiff.data.schema import ACTION_KEYS, ACTION_SHAPES, SchemaError
from vdiff.data.transforms import (
    CropPlan,
    clip_actions,
    collate_clips,
    cover_size,
    crop_frames,
    flip_actions,
    move_goal,
    normalize_video,
    plan_crop,
)


def test_cover_size_keeps_aspect_and_covers():
    assert cover_size((256, 256), (128, 128)) == (128, 128)
    assert cover_size((900, 1600), (320, 576)) == (324, 576)  # width binds: 576/1600 = 0.36
    assert cover_size((1080, 1920), (256, 256)) == (256, 455)  # short side to 256
    assert cover_size((100, 50), (64, 64)) == (128, 64)


def test_plan_crop_center_random_and_errors():
    plan = plan_crop((40, 60), (20, 30), "center")
    assert (plan.top, plan.left) == (10, 15)
    tops, lefts = set(), set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        plan = plan_crop((40, 60), (20, 30), "random", rng)
        assert 0 <= plan.top <= 20 and 0 <= plan.left <= 30
        tops.add(plan.top)
        lefts.add(plan.left)
    assert tops == set(range(21)) and lefts == set(range(31))
    with pytest.raises(ValueError, match="smaller than the crop"):
        plan_crop((10, 60), (20, 30), "center")
    with pytest.raises(ValueError, match="random' or 'center"):
        plan_crop((40, 60), (20, 30), "middle")


def test_crop_frames_is_the_window():
    frames = np.arange(2 * 6 * 8 * 3, dtype=np.uint8).reshape(2, 6, 8, 3)
    plan = CropPlan(frame_hw=(6, 8), top=2, left=3, out_hw=(3, 4))
    np.testing.assert_array_equal(crop_frames(frames, plan), frames[:, 2:5, 3:7])


@pytest.mark.parametrize("flip", [False, True])
def test_move_goal_through_resize_and_crop(flip):
    # Source 900x1600 resized to cover 320x576 -> 324x576; crop at top 4, left 0 (center).
    source_hw, out_hw = (900, 1600), (320, 576)
    frame_hw = cover_size(source_hw, out_hw)
    plan = CropPlan(frame_hw=frame_hw, top=2, left=0, out_hw=out_hw, flip=flip)
    # Goals in source pixels, then normalised by the source size.
    pixels = np.array([[800.0, 450.0], [0.0, 0.0], [1600.0, 10.0], [100.0, 899.0], [1200.0, 600.0]])
    goal = (pixels / [1600.0, 900.0]).astype(np.float32)
    valid = np.array([True, True, True, True, False])
    moved, inside = move_goal(goal, valid, plan)
    scale = frame_hw[0] / 900.0
    for i, (px, py) in enumerate(pixels):
        x = (px * scale - 0) / 576  # independent arithmetic: scale pixels, shift by the crop, normalise
        y = (py * scale - 2) / 320
        expect_inside = valid[i] and 0 <= x <= 1 and 0 <= y <= 1
        assert inside[i] == expect_inside, i
        if expect_inside:
            np.testing.assert_allclose(moved[i], [1 - x if flip else x, y], atol=1e-3)
        else:
            np.testing.assert_array_equal(moved[i], [0.0, 0.0])
    assert inside.tolist() == [True, False, True, False, False]  # y=0 and y=899 leave the 2-pixel crop


def _meta_actions(num_frames=5):
    return {
        "speed": [1.0, 2.0, None, 4.0, 5.0],
        "steering": [10.0, -20.0, 30.0, float("nan"), 0.0],
        "command": [0, 1, 2, 3, 0],
        "trajectory": [[[1.0, 0.5]] * 4] * num_frames,
        "goal": [[0.5, 0.5]] * num_frames,
    }


def test_clip_actions_values_masks_and_missing_keys():
    out = clip_actions(_meta_actions(), [1, 2, 3])
    assert set(out) == set(ACTION_KEYS) | {B.valid_key(k) for k in ACTION_KEYS}
    for key, shape in ACTION_SHAPES.items():
        assert out[key].shape == (3, *shape)
        assert out[B.valid_key(key)].dtype == bool
    assert out["command"].dtype == np.int64 and out["speed"].dtype == np.float32
    assert out["speed"].tolist() == [2.0, 0.0, 4.0] and out["speed_valid"].tolist() == [True, False, True]
    assert out["steering_valid"].tolist() == [True, True, False]  # NaN is unknown
    assert out["steering"][2] == 0.0
    assert out["yaw_rate_valid"].tolist() == [False] * 3 and not out["yaw_rate"].any()
    assert out["command"].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "actions, match",
    [
        ({"goal": [[0.5]] * 5}, "goal.*expected shape"),
        ({"command": [7] * 5}, "not one of 0..3"),
        ({"speed": ["fast"] * 5}, "not numeric"),
    ],
)
def test_clip_actions_rejects_malformed_entries(actions, match):
    with pytest.raises(SchemaError, match=match):
        clip_actions(actions, [0, 1])


def test_flip_actions_mirrors_left_and_right():
    actions = clip_actions(_meta_actions(), [0, 1, 2, 3, 4])
    flipped = flip_actions({k: v.copy() for k, v in actions.items()})
    np.testing.assert_array_equal(flipped["steering"], -actions["steering"])
    np.testing.assert_array_equal(flipped["yaw_rate"], -actions["yaw_rate"])
    np.testing.assert_array_equal(flipped["speed"], actions["speed"])
    np.testing.assert_array_equal(flipped["trajectory"][..., 0], actions["trajectory"][..., 0])
    np.testing.assert_array_equal(flipped["trajectory"][..., 1], -actions["trajectory"][..., 1])
    assert flipped["command"].tolist() == [2, 1, 0, 3, 2]  # left <-> right; straight and stop stay


def _sample(key, flip, t=3, h=4, w=5, actions=True):
    frames = np.random.default_rng(len(key)).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    acts = clip_actions(_meta_actions() if actions else {}, list(range(t)))
    return {"video": frames, "flip": flip, "fps": 10.0, "frame_indices": np.arange(t), "key": key,
            "source": "s", "actions": acts}


@pytest.mark.parametrize("normalize", [True, False])
def test_collate_layout_flip_and_normalisation(normalize):
    samples = [_sample("a", False), _sample("bb", True, actions=False)]
    batch = collate_clips(samples, normalize=normalize)
    video = batch[B.VIDEO]
    assert video.shape == (2, 3, 3, 4, 5)
    assert video.dtype == (torch.float32 if normalize else torch.uint8)
    expected = torch.stack(
        [torch.from_numpy(samples[0]["video"]), torch.from_numpy(samples[1]["video"][:, :, ::-1].copy())]
    ).permute(0, 1, 4, 2, 3)
    if normalize:
        assert video.min() >= -1 and video.max() <= 1
        torch.testing.assert_close(video, expected.float() / 127.5 - 1)
    else:
        torch.testing.assert_close(video, expected)
        torch.testing.assert_close(normalize_video(video), expected.float() / 127.5 - 1)
    assert batch[B.FPS].shape == (2,) and batch[B.FRAME_INDICES].dtype == torch.long
    assert batch[B.KEY] == ["a", "bb"]
    assert batch[B.ACTIONS]["speed_valid"][1].tolist() == [False] * 3  # source without actions
    assert batch[B.ACTIONS]["trajectory"].shape == (2, 3, 4, 2)
