import math

import numpy as np
import pytest

from vdiff.data.convert.ego import (
    PoseTrack,
    command_from_trajectory,
    future_waypoints,
    project_to_image,
    speed_and_yaw_rate,
    yaw_from_quaternion,
)
from vdiff.data.schema import COMMANDS

NUSCENES_FRONT = (0.5, -0.5, 0.5, -0.5)  # camera z forward = ego x, camera x right = ego -y, camera y down = ego -z


def arc_track(speed: float, yaw_rate: float, heading0: float = 0.6, duration: float = 6.0, rate: float = 12.0):
    """Poses on a circle (or a line when yaw_rate == 0) in a world frame rotated by heading0."""
    t = np.arange(int(duration * rate) + 1) / rate
    if yaw_rate == 0:
        local = np.stack([speed * t, np.zeros_like(t)], axis=-1)
    else:
        r = speed / yaw_rate
        local = np.stack([r * np.sin(yaw_rate * t), r * (1 - np.cos(yaw_rate * t))], axis=-1)
    c, s = math.cos(heading0), math.sin(heading0)
    world = local @ np.array([[c, s], [-s, c]]) + np.array([100.0, -40.0])
    return PoseTrack(t, world, heading0 + yaw_rate * t)


def test_straight_constant_speed():
    track = arc_track(speed=5.0, yaw_rate=0.0)
    times = np.array([0.0, 1.0, 2.5, 4.0])
    speed, yaw_rate, valid = speed_and_yaw_rate(track, times)
    assert valid.all()
    np.testing.assert_allclose(speed, 5.0, atol=1e-9)
    np.testing.assert_allclose(yaw_rate, 0.0, atol=1e-9)
    trajectory, ok = future_waypoints(track, times)
    assert ok.tolist() == [True, True, True, True]
    expected = np.stack([2.5 * np.arange(1, 5), np.zeros(4)], axis=-1)  # evenly spaced, straight ahead
    for waypoints in trajectory:
        np.testing.assert_allclose(waypoints, expected, atol=1e-9)
        assert command_from_trajectory(waypoints) == COMMANDS["straight"]
    _, late = future_waypoints(track, np.array([4.5]))
    assert not late[0]  # the track ends before +2 s


@pytest.mark.parametrize("yaw_rate, command", [(0.4, "left"), (-0.4, "right")])
def test_turns(yaw_rate, command):
    track = arc_track(speed=5.0, yaw_rate=yaw_rate)
    speed, measured, _ = speed_and_yaw_rate(track, np.array([2.0]))
    assert speed[0] == pytest.approx(5.0, rel=1e-2)
    assert measured[0] == pytest.approx(yaw_rate, rel=1e-3)
    trajectory, ok = future_waypoints(track, np.array([1.0]))
    assert ok[0]
    r = 5.0 / yaw_rate
    tau = 0.5 * np.arange(1, 5)
    expected = np.stack([r * np.sin(yaw_rate * tau), r * (1 - np.cos(yaw_rate * tau))], axis=-1)
    np.testing.assert_allclose(trajectory[0], expected, atol=0.01)
    assert np.sign(trajectory[0][-1, 1]) == np.sign(yaw_rate)  # left turn: y > 0
    assert command_from_trajectory(trajectory[0]) == COMMANDS[command]


def test_stop_and_slow_turn():
    assert command_from_trajectory(np.array([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [0.4, 0.01]])) == COMMANDS["stop"]
    # 2 m/s turning at 0.5 rad/s: only 1.8 m to the side after 2 s, but at a clear bearing (29 deg).
    track = arc_track(speed=2.0, yaw_rate=0.5)
    trajectory, _ = future_waypoints(track, np.array([0.0]))
    assert 0.75 < trajectory[0][-1, 1] < 2.0
    assert command_from_trajectory(trajectory[0]) == COMMANDS["left"]


def test_yaw_from_quaternion():
    for yaw in (-2.5, -0.3, 0.0, 1.2, 3.0):
        q = np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
        assert yaw_from_quaternion(q) == pytest.approx(yaw)


def test_projection_into_the_front_camera():
    k = np.array([[40.0, 0, 32.0], [0, 40.0, 18.0], [0, 0, 1]])
    cam_t = np.array([1.5, 0.0, 1.5])
    points = np.array([[10.0, 0.0, 0.0], [10.0, 2.0, 0.0], [-5.0, 0.0, 0.0], [3.0, 30.0, 0.0]])
    uv, valid = project_to_image(points, cam_t, NUSCENES_FRONT, k, 64, 36)
    assert valid.tolist() == [True, True, False, False]  # behind the camera; far outside the image
    # Straight ahead on the ground: camera coordinates (x right, y down, z forward) = (0, 1.5, 8.5).
    assert uv[0] == pytest.approx([32.0 / 64, (40.0 * 1.5 / 8.5 + 18.0) / 36])
    # 2 m to the left appears left of the centre: x_cam = -2.
    assert uv[1] == pytest.approx([(40.0 * -2.0 / 8.5 + 32.0) / 64, (40.0 * 1.5 / 8.5 + 18.0) / 36])
