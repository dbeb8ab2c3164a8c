"""Synthetic driving video: determinism, truthful actions, and the sign conventions measured on frames."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from vdiff.data.schema import ACTION_SHAPES, COMMANDS, TRAJECTORY_STEP_S, Manifest, VideoMeta
from vdiff.data.synthetic import (
    VAL_FIRST_INDEX,
    Camera,
    DriveConfig,
    add_arguments,
    curvature_to_steering,
    ensure_synthetic_shards,
    render_drive,
    run,
    steering_to_curvature,
    write_synthetic_shards,
)

# A bare scene: road and hills only, so measurements see nothing else move.
BARE = dict(num_cars=0, num_bouncers=0, post_spacing=0.0, tree_spacing=0.0)


def _gray(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _best_shift(a: np.ndarray, b: np.ndarray, shifts: np.ndarray) -> float:
    """The shift d (in samples, sub-sample) minimising sum((a(x) - b(x + d))^2) over the valid middle."""
    x = np.arange(a.shape[-1], dtype=np.float64)
    margin = int(np.ceil(np.abs(shifts).max())) + 1
    inner = slice(margin, a.shape[-1] - margin)
    errors = []
    for d in shifts:
        shifted = np.stack([np.interp(x + d, x, row) for row in np.atleast_2d(b)])
        errors.append(np.sum((np.atleast_2d(a)[:, inner] - shifted[:, inner]) ** 2))
    return float(shifts[int(np.argmin(errors))])


def _hill_band_shift(frames: np.ndarray, camera: Camera, gap: int) -> float:
    """Mean horizontal motion (pixels per frame, + = right) of the band just above the horizon."""
    gray = _gray(frames)
    rows = slice(int(camera.cy - 0.25 * camera.focal), int(camera.cy))
    cols = slice(int(0.25 * camera.size), int(0.75 * camera.size))  # near the centre tan(angle) ~ angle
    shifts = np.arange(-8, 8.001, 0.05)
    found = []
    for t in range(0, frames.shape[0] - gap, gap):
        # frame t + gap at column u + d matches frame t at u  <=>  the scene moved by d to the right
        found.append(_best_shift(gray[t, rows, cols], gray[t + gap, rows, cols], shifts))
    return float(np.mean(found)) / gap


# ----------------------------------------------------------------------------------------------
# Basics
# ----------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_schema():
    frames, actions = render_drive(7, 32, seed=3)
    assert frames.shape == (7, 32, 32, 3) and frames.dtype == np.uint8
    assert set(actions) == set(ACTION_SHAPES)
    meta = VideoMeta(fps=10.0, width=32, height=32, num_frames=7, source="synthetic", actions=actions).validate()
    assert VideoMeta.from_json(meta.to_json()).actions == actions
    for key, shape in ACTION_SHAPES.items():
        for value in actions[key]:
            if value is not None:
                assert np.asarray(value).shape == shape, key
    assert all(c in COMMANDS.values() for c in actions["command"])
    assert frames.std() > 10  # not a blank picture


def test_determinism_and_seed_independence():
    a_frames, a_actions = render_drive(6, 32, seed=(5, 2))
    b_frames, b_actions = render_drive(6, 32, seed=(5, 2))
    assert a_frames.tobytes() == b_frames.tobytes()
    assert json.dumps(a_actions) == json.dumps(b_actions)
    c_frames, c_actions = render_drive(6, 32, seed=(5, 3))
    assert a_frames.tobytes() != c_frames.tobytes()
    assert json.dumps(a_actions) != json.dumps(c_actions)


def test_bad_options_are_named():
    with pytest.raises(TypeError, match="wobble"):
        render_drive(4, 32, seed=0, wobble=1)
    with pytest.raises(ValueError, match="steering"):
        render_drive(4, 32, seed=0, steering=5000.0)
    with pytest.raises(ValueError, match="size"):
        DriveConfig(size=4).validate()


# ----------------------------------------------------------------------------------------------
# Sign conventions and speed, measured on the frames
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steering", [40.0, -40.0])
def test_steering_sign_moves_the_horizon_the_way_a_turn_looks(steering):
    """Left (+) steering yaws left, so the hills at the horizon move RIGHT in the image, at f * yaw_rate / fps."""
    frames, actions = render_drive(16, 64, seed=1, speed=9.0, steering=steering, **BARE)
    camera = Camera.from_config(DriveConfig(size=64))
    measured = _hill_band_shift(frames, camera, gap=3)  # pixels per frame, + = right
    yaw_rate = np.mean(actions["yaw_rate"])
    assert np.sign(yaw_rate) == np.sign(steering)
    expected = camera.focal * yaw_rate / 10.0  # small-angle: du = f * dpsi
    assert np.sign(measured) == np.sign(steering), (measured, expected)
    assert measured == pytest.approx(expected, rel=0.3), (measured, expected)



# Open ground under a mountain skyline (the Vista quickstart's scene): no road, world-fixed ground texture.
OPEN = dict(BARE, road=False, ground_texture=2.0, hill_height=3.0, hill_haze=0.0)


@pytest.mark.parametrize("steering", [150.0, -150.0])
def test_skyline_moves_with_the_yaw_alone_on_open_ground(steering):
    """The tall, dark skyline moves right in a left turn at f * yaw_rate / fps, and not at all driving straight."""
    frames, actions = render_drive(12, 64, seed=2, speed=5.0, steering=steering, fov_deg=60.0, horizon=0.45, **OPEN)
    camera = Camera.from_config(DriveConfig(size=64, fov_deg=60.0, horizon=0.45))
    expected = camera.focal * np.mean(actions["yaw_rate"]) / 10.0
    assert _hill_band_shift(frames, camera, gap=2) == pytest.approx(expected, rel=0.3)
    straight, _ = render_drive(12, 64, seed=2, speed=5.0, steering=0.0, fov_deg=60.0, horizon=0.45, **OPEN)
    assert abs(_hill_band_shift(straight, camera, gap=2)) < 0.1


def test_open_ground_has_no_road_and_a_textured_ground_that_streams_with_the_speed():
    options = dict(fov_deg=60.0, horizon=0.45, steering=0.0)
    road, _ = render_drive(6, 32, seed=3, speed=5.0, **options, **BARE)
    open_moving, _ = render_drive(6, 32, seed=3, speed=5.0, **options, **OPEN)
    open_parked, _ = render_drive(6, 32, seed=3, speed=0.0, **options, **OPEN)
    ground = slice(20, 32)  # rows below the horizon
    # the asphalt and its white lines are gone: the road scene's ground is greyer and brighter in the middle
    assert not np.array_equal(road[:, ground], open_moving[:, ground])
    texture = _gray(open_moving[0, ground]).std(axis=1).mean()
    assert texture > 2.0  # the texture varies across every ground row (plain grass would not)
    moved = np.abs(np.diff(_gray(open_moving[:, ground]), axis=0)).mean()
    parked = np.abs(np.diff(_gray(open_parked[:, ground]), axis=0)).mean()
    assert moved > 1.0 and parked < 1e-6  # world-fixed: it streams only when the car moves


def test_skyline_options_shape_the_hills():
    low, _ = render_drive(2, 32, seed=5, **BARE)
    tall, _ = render_drive(2, 32, seed=5, hill_height=3.0, hill_haze=0.0, **BARE)
    sky = slice(0, 12)  # rows above the horizon (0.4 * 32)
    def lateral_contrast(frame):  # what a sideways shift can be read from: variation along each row
        return _gray(frame[sky]).std(axis=1).mean()

    assert lateral_contrast(tall[0]) > 3 * lateral_contrast(low[0])  # taller, darker ridges
    with pytest.raises(ValueError, match="hill_height"):
        DriveConfig(hill_height=0.0).validate()
    with pytest.raises(ValueError, match="hill_haze"):
        DriveConfig(hill_haze=1.5).validate()
    with pytest.raises(ValueError, match="ground_texture"):
        DriveConfig(ground_texture=-1.0).validate()

def test_road_bends_toward_the_steering_side():
    """Far ahead the road (asphalt) lies left of where it lies for right steering, and vice versa."""
    camera = Camera.from_config(DriveConfig(size=64))
    centroids = {}
    for steering in (40.0, 0.0, -40.0):
        frames, _ = render_drive(4, 64, seed=2, speed=8.0, steering=steering, **BARE)
        rgb = frames.astype(np.float64)
        road = np.abs(rgb[..., 1] - rgb[..., 0]) < 12  # asphalt and haze are grey, grass is green
        v0 = int(np.ceil(camera.cy + camera.focal * camera.height / 20.0))  # ground 20 m ahead
        v1 = int(camera.cy + camera.focal * camera.height / 8.0)  # ... to 8 m ahead
        cols = np.arange(64)[None, None, :]
        band = road[:, v0:v1]
        centroids[steering] = float((band * cols).sum() / band.sum())
    assert centroids[40.0] < centroids[0.0] < centroids[-40.0], centroids


def _dash_scroll(frames: np.ndarray, camera: Camera) -> float:
    """Metres of ground the centre-line dashes move toward the camera per frame (straight road)."""
    depth_grid = np.arange(3.0, 12.0, 0.05)
    rows = np.arange(int(camera.cy) + 2, camera.size)
    depth = camera.ground_depth(rows + 0.5)
    u = camera.cx - camera.focal * 1.75 / depth  # centre line: half a lane left of the ego path
    inside = u >= 1
    rows, depth, u = rows[inside], depth[inside], u[inside]
    gray = _gray(frames)
    profiles = []
    for frame in gray:
        samples = np.array([frame[r, max(int(c) - 1, 0) : int(c) + 2].max() for r, c in zip(rows, u)])
        profiles.append(np.interp(depth_grid, depth[::-1], samples[::-1]))
    shifts = np.arange(0.0, 2.5, 0.02) / 0.05  # in depth-grid samples
    found = [_best_shift(profiles[t + 1], profiles[t], shifts) * 0.05 for t in range(len(profiles) - 1)]
    return float(np.median(found))


@pytest.mark.parametrize("speed", [4.0, 11.0])
def test_speed_is_the_scroll_rate_of_the_lane_markings(speed):
    frames, actions = render_drive(8, 128, seed=4, speed=speed, steering=0.0, **BARE)
    camera = Camera.from_config(DriveConfig(size=128))
    measured = _dash_scroll(frames, camera)
    assert measured == pytest.approx(speed / 10.0, rel=0.2, abs=0.06)
    assert actions["speed"] == pytest.approx([speed] * 8)


# ----------------------------------------------------------------------------------------------
# Actions are truthful
# ----------------------------------------------------------------------------------------------


def test_bicycle_model_links_speed_steering_and_yaw_rate():
    cfg = DriveConfig()
    for seed in range(4):
        _, a = render_drive(30, 16, seed=seed)
        speed, steering, yaw = map(np.array, (a["speed"], a["steering"], a["yaw_rate"]))
        assert yaw == pytest.approx(speed * steering_to_curvature(steering, cfg), abs=2e-5)
        moving = speed > 0.5
        assert np.all(np.sign(yaw[moving]) == np.sign(steering[moving]))
    assert curvature_to_steering(steering_to_curvature(33.0, cfg), cfg) == pytest.approx(33.0)


@pytest.mark.parametrize(
    "steering, command", [(45.0, COMMANDS["left"]), (0.0, COMMANDS["straight"]), (-45.0, COMMANDS["right"])]
)
def test_commands_and_trajectory_follow_the_motion(steering, command):
    _, a = render_drive(5, 16, seed=0, speed=8.0, steering=steering)
    assert a["command"] == [command] * 5
    traj = np.array(a["trajectory"])  # (T, 4, 2)
    assert np.all(np.diff(traj[..., 0], axis=1) > 0)  # forward motion: x grows along the trajectory
    if steering > 0:
        assert np.all(traj[..., 1] > 0)
    elif steering < 0:
        assert np.all(traj[..., 1] < 0)
    else:  # straight at constant speed: waypoints every speed * 0.5 s
        expected = 8.0 * TRAJECTORY_STEP_S * np.arange(1, 5)
        assert traj[..., 0] == pytest.approx(np.broadcast_to(expected, (5, 4)), abs=1e-3)
        assert traj[..., 1] == pytest.approx(np.zeros((5, 4)), abs=1e-6)


def test_standing_still_is_stop_with_no_goal():
    _, a = render_drive(5, 16, seed=0, speed=0.0, steering=20.0)
    assert a["command"] == [COMMANDS["stop"]] * 5
    assert a["goal"] == [None] * 5
    assert np.abs(np.array(a["trajectory"])).max() == 0.0
    assert a["yaw_rate"] == [0.0] * 5


def test_trajectory_matches_dead_reckoning_of_speed_and_yaw_rate():
    """Integrating the per-frame speed and yaw rate reproduces the +0.5 s waypoint of the trajectory."""
    fps, per_step = 10.0, int(TRAJECTORY_STEP_S * 10)
    for seed in range(3):
        _, a = render_drive(40, 16, seed=seed, fps=fps)
        speed, yaw, traj = np.array(a["speed"]), np.array(a["yaw_rate"]), np.array(a["trajectory"])
        for t in range(0, 40 - per_step, 7):
            x = y = psi = 0.0
            for k in range(t, t + per_step):  # trapezoid rule over one frame interval
                psi_next = psi + 0.5 * (yaw[k] + yaw[k + 1]) / fps
                step = 0.5 / fps
                x += step * (speed[k] * np.cos(psi) + speed[k + 1] * np.cos(psi_next))
                y += step * (speed[k] * np.sin(psi) + speed[k + 1] * np.sin(psi_next))
                psi = psi_next
            assert traj[t, 0] == pytest.approx([x, y], abs=0.05 + 0.01 * abs(x)), (seed, t)


def test_random_drives_command_and_goal_agree_with_trajectory():
    camera = Camera.from_config(DriveConfig(size=16))
    commands = set()
    for seed in range(12):
        _, a = render_drive(30, 16, seed=seed, stop_prob=0.5)
        traj = np.array(a["trajectory"])
        for t, command in enumerate(a["command"]):
            commands.add(command)
            final = traj[t, -1]
            if command == COMMANDS["stop"]:
                assert np.hypot(*final) < 2.0
            else:
                assert final[0] > 1.0
            if command == COMMANDS["left"]:
                assert final[1] > 0
            if command == COMMANDS["right"]:
                assert final[1] < 0
            goal = a["goal"][t]
            if goal is not None:
                u, v = camera.project(final[0], final[1])
                assert goal == pytest.approx([u / 16, v / 16], abs=1e-5)
                assert 0 <= goal[0] <= 1 and camera.cy / 16 < goal[1] <= 1  # on the ground, below the horizon
    assert commands == {0, 1, 2, 3}  # random drives turn both ways, go straight and stop


# ----------------------------------------------------------------------------------------------
# Predictability: motion extrapolated from two frames beats copying the last frame
# ----------------------------------------------------------------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-10)))


def _block_motion_prediction(prev2: np.ndarray, prev: np.ndarray, block: int = 8, reach: int = 3) -> np.ndarray:
    """Constant-velocity prediction: each block of ``prev`` moved as much again as it did since ``prev2``."""
    size = prev.shape[0]
    pad2, pad1 = np.pad(prev2, reach, mode="edge"), np.pad(prev, reach, mode="edge")
    nb = size // block
    best_err = np.full((nb, nb), np.inf)
    best = np.zeros((nb, nb, 2), dtype=int)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            # content now at p was at p - d in prev2
            source = pad2[reach - dy : reach - dy + size, reach - dx : reach - dx + size]
            err = ((prev - source) ** 2).reshape(nb, block, nb, block).sum(axis=(1, 3))
            better = err < best_err - 1e-9
            best_err[better] = err[better]
            best[better] = (dy, dx)
    pred = np.empty_like(prev)
    for i in range(nb):
        for j in range(nb):
            dy, dx = best[i, j]
            r, c = i * block + reach - dy, j * block + reach - dx
            pred[i * block : (i + 1) * block, j * block : (j + 1) * block] = pad1[r : r + block, c : c + block]
    return pred


def test_motion_is_predictable_from_the_previous_frames():
    copy_psnr, pred_psnr, diffs = [], [], []
    for seed in range(3):
        frames, _ = render_drive(12, 64, seed=seed)
        gray = _gray(frames)
        for t in range(2, 12):
            diffs.append(np.abs(gray[t] - gray[t - 1]).mean())
            copy_psnr.append(_psnr(gray[t - 1], gray[t]))
            pred_psnr.append(_psnr(_block_motion_prediction(gray[t - 2], gray[t - 1]), gray[t]))
    assert np.mean(diffs) > 1.0  # consecutive frames clearly differ
    assert np.mean(pred_psnr) > np.mean(copy_psnr) + 1.0, (np.mean(pred_psnr), np.mean(copy_psnr))


# ----------------------------------------------------------------------------------------------
# Shards and the command line
# ----------------------------------------------------------------------------------------------


def test_shards_written_readable_and_reused(tmp_path, monkeypatch):
    from vdiff.data import synthetic
    from vdiff.data.shards import iter_raw_samples, read_json_meta
    from vdiff.data.video_io import decode_all

    out = tmp_path / "set"
    manifest = write_synthetic_shards(out, num_videos=3, num_frames=6, size=32, seed=7, max_count=2)
    assert manifest.num_samples == 3 and manifest.num_frames == 18 and len(manifest.shards) == 2
    assert Manifest.load(out).num_frames == 18
    seen = []
    for shard in manifest.shard_paths(out):
        for key, files in iter_raw_samples(shard):
            meta = read_json_meta(files)
            video = decode_all(files["mp4"])
            assert video.shape == (6, 32, 32, 3) and meta.num_frames == 6 and meta.source == "synthetic"
            index = int(key.rsplit("-", 1)[1])
            frames, actions = render_drive(6, 32, seed=(7, index))
            assert meta.actions == actions
            assert np.abs(video.astype(float) - frames).mean() < 4.0  # the mp4 holds the rendered frames
            seen.append(index)
    assert sorted(seen) == [0, 1, 2]

    # Same parameters: nothing is rendered again.
    def fail(*args, **kwargs):
        raise AssertionError("re-rendered a complete shard set")

    monkeypatch.setattr(synthetic, "_render_sample", fail)
    assert ensure_synthetic_shards(out, num_videos=3, num_frames=6, size=32, seed=7, max_count=2).num_samples == 3
    monkeypatch.undo()
    # Different parameters: the set is replaced.
    again = ensure_synthetic_shards(out, num_videos=2, num_frames=4, size=32, seed=7)
    assert again.num_frames == 8 and sorted(p.name for p in out.glob("*.tar")) == ["synth-000000.tar"]


def test_refuses_to_overwrite_foreign_shards(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not listed"):
        write_synthetic_shards(tmp_path, num_videos=1, num_frames=2, size=16, seed=0)


def test_cli_writes_train_and_val(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--num-videos", "2", "--frames", "3", "--size", "16", "--seed", "1",
         "--val-videos", "1", "--shard-size", "1"]
    )
    assert run(args) == 0
    train, val = Manifest.load(tmp_path / "train"), Manifest.load(tmp_path / "val")
    assert (train.num_samples, train.num_frames, len(train.shards)) == (2, 6, 2)
    assert (val.num_samples, val.num_frames) == (1, 3)
    assert val.extra["synthetic"]["first_index"] == VAL_FIRST_INDEX
    printed = capsys.readouterr()
    assert "2 videos, 6 frames" in printed.out and "done in" in printed.out
    # the videos being written show as they go (a first run can take minutes): a bar per split, on stderr
    assert f"writing synthetic videos to {tmp_path / 'train'}: 100%" in printed.err and "2/2" in printed.err
    assert f"writing synthetic videos to {tmp_path / 'val'}: 100%" in printed.err and "1/1" in printed.err


def test_the_synthetic_datamodule_shows_its_first_run_writing_videos(tmp_path, capsys):
    from vdiff.data.synthetic_datamodule import SyntheticDrivingDataModule

    data = SyntheticDrivingDataModule(num_videos=2, val_videos=0, video_frames=3, video_size=16, size=16, num_frames=3,
                                      cache_dir=str(tmp_path), synth_workers=2)
    data.prepare_data()
    assert "writing synthetic videos to" in capsys.readouterr().err
    data.prepare_data()  # the cache holds them: nothing written, nothing shown
    assert "writing synthetic videos" not in capsys.readouterr().err


def test_library_writes_quietly_unless_asked(tmp_path, capsys):
    write_synthetic_shards(tmp_path / "quiet", num_videos=1, num_frames=2, size=16, seed=0)
    assert capsys.readouterr().err == ""
    write_synthetic_shards(tmp_path / "shown", num_videos=2, num_frames=2, size=16, seed=0, workers=2, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_worker_processes_write_identical_shards(tmp_path):
    one = write_synthetic_shards(tmp_path / "one", num_videos=3, num_frames=3, size=16, seed=2)
    two = write_synthetic_shards(tmp_path / "two", num_videos=3, num_frames=3, size=16, seed=2, workers=2)
    assert [s.path for s in one.shards] == [s.path for s in two.shards]
    for shard in one.shards:
        assert (tmp_path / "one" / shard.path).read_bytes() == (tmp_path / "two" / shard.path).read_bytes()
