"""Ego-motion math shared by the driving converters: from a pose track to the actions of docs/architecture.md ("Actions").

Conventions (those of the action schema): SI units; the world frame is right-handed with z up, so a
positive yaw rate turns the vehicle left (counter-clockwise seen from above); the ego frame has x
forward, y left. A :class:`PoseTrack` holds timestamped 2-D poses (position and yaw) and is queried at
arbitrary times by linear interpolation, so frames need not coincide with pose samples.

* speed: the forward component of the velocity (central difference over ``±half_window`` seconds,
  one-sided at the ends of the track), m/s; negative when reversing.
* yaw rate: the derivative of the unwrapped yaw over the same window, rad/s, + = left.
* trajectory: the positions at ``+0.5, +1.0, +1.5, +2.0`` s in the ego frame at the query time;
  invalid where the track ends before the last waypoint.
* command (:func:`command_from_trajectory`): ``stop`` when the last waypoint is less than
  :data:`STOP_DISTANCE_M` away (mean speed under 0.5 m/s over 2 s); otherwise ``left`` / ``right``
  when the last waypoint lies more than :data:`TURN_LATERAL_M` to the side, or more than
  :data:`TURN_MIN_LATERAL_M` to the side at a bearing beyond :data:`TURN_ANGLE_DEG` (slow turns at
  intersections); ``straight`` otherwise.
* goal (:func:`project_to_image`): a point in the ego frame projected through a pinhole camera whose
  pose in the ego frame and intrinsics are given (nuScenes ``calibrated_sensor``), as normalised
  image coordinates ``(u / W, v / H)``; invalid behind the camera or outside the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vdiff.data.schema import COMMANDS, TRAJECTORY_STEP_S

TRAJECTORY_STEPS = 4
STOP_DISTANCE_M = 1.0
TURN_LATERAL_M = 2.0
TURN_MIN_LATERAL_M = 0.75
TURN_ANGLE_DEG = 12.0
MIN_DEPTH_M = 0.5  # a goal closer than this in front of the camera is invalid


def yaw_from_quaternion(q: np.ndarray) -> np.ndarray:
    """Yaw (rotation about z, rad) of quaternions ``(..., 4)`` in ``(w, x, y, z)`` order (nuScenes')."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a unit quaternion ``(w, x, y, z)``."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass
class PoseTrack:
    """Ego poses in a z-up world frame: ``times`` ``(N,)`` s (increasing), ``xy`` ``(N, 2)`` m, ``yaw`` ``(N,)`` rad."""

    times: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray

    def __post_init__(self) -> None:
        times = np.asarray(self.times, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        self.times = times[order]
        self.xy = np.asarray(self.xy, dtype=np.float64)[order].reshape(-1, 2)
        self.yaw = np.unwrap(np.asarray(self.yaw, dtype=np.float64)[order])
        if len(self.times) < 2:
            raise ValueError(f"a pose track needs at least 2 poses, got {len(self.times)}")
        if np.any(np.diff(self.times) <= 0):
            raise ValueError("pose track times must be strictly increasing (duplicate timestamps)")

    @property
    def start(self) -> float:
        return float(self.times[0])

    @property
    def end(self) -> float:
        return float(self.times[-1])

    def position(self, t: np.ndarray) -> np.ndarray:
        """World positions ``(len(t), 2)`` at times ``t`` (clamped to the track)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        return np.stack([np.interp(t, self.times, self.xy[:, 0]), np.interp(t, self.times, self.xy[:, 1])], axis=-1)

    def heading(self, t: np.ndarray) -> np.ndarray:
        """Unwrapped yaw ``(len(t),)`` at times ``t`` (clamped to the track)."""
        return np.interp(np.atleast_1d(np.asarray(t, dtype=np.float64)), self.times, self.yaw)


def to_ego_frame(points: np.ndarray, origin: np.ndarray, yaw: float) -> np.ndarray:
    """World points ``(..., 2)`` into the ego frame at ``origin`` ``(2,)`` with heading ``yaw`` (x forward, y left)."""
    c, s = np.cos(yaw), np.sin(yaw)
    d = np.asarray(points, dtype=np.float64) - origin
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def speed_and_yaw_rate(track: PoseTrack, times: np.ndarray, half_window: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward speed (m/s) and yaw rate (rad/s, + = left) at ``times``; third output: valid mask.

    A time outside the track is invalid; near the ends the difference is one-sided.
    """
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    lo = np.clip(times - half_window, track.start, track.end)
    hi = np.clip(times + half_window, track.start, track.end)
    dt = hi - lo
    valid = (times >= track.start - 1e-6) & (times <= track.end + 1e-6) & (dt > 1e-6)
    safe_dt = np.where(dt > 1e-6, dt, 1.0)
    velocity = (track.position(hi) - track.position(lo)) / safe_dt[:, None]
    yaw = track.heading(times)
    forward = velocity[:, 0] * np.cos(yaw) + velocity[:, 1] * np.sin(yaw)
    yaw_rate = (track.heading(hi) - track.heading(lo)) / safe_dt
    return np.where(valid, forward, 0.0), np.where(valid, yaw_rate, 0.0), valid


def future_waypoints(
    track: PoseTrack, times: np.ndarray, steps: int = TRAJECTORY_STEPS, step_s: float = TRAJECTORY_STEP_S
) -> tuple[np.ndarray, np.ndarray]:
    """Positions at ``t + k * step_s`` (k = 1..steps) in the ego frame at ``t``: ``(N, steps, 2)``, valid ``(N,)``."""
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    out = np.zeros((len(times), steps, 2))
    valid = (times >= track.start - 1e-6) & (times + steps * step_s <= track.end + 1e-6)
    offsets = step_s * np.arange(1, steps + 1)
    for i, t in enumerate(times):
        if not valid[i]:
            continue
        origin = track.position(t)[0]
        out[i] = to_ego_frame(track.position(t + offsets), origin, float(track.heading(t)[0]))
    return out, valid


def command_from_trajectory(trajectory: np.ndarray) -> int:
    """High-level command (schema codes: 0 left, 1 straight, 2 right, 3 stop) from waypoints ``(K, 2)``."""
    x, y = float(trajectory[-1, 0]), float(trajectory[-1, 1])
    if np.hypot(x, y) < STOP_DISTANCE_M:
        return COMMANDS["stop"]
    bearing = np.degrees(np.arctan2(y, x))
    if y > TURN_LATERAL_M or (y > TURN_MIN_LATERAL_M and bearing > TURN_ANGLE_DEG):
        return COMMANDS["left"]
    if y < -TURN_LATERAL_M or (y < -TURN_MIN_LATERAL_M and bearing < -TURN_ANGLE_DEG):
        return COMMANDS["right"]
    return COMMANDS["straight"]


def project_to_image(
    points_ego: np.ndarray,
    camera_translation: np.ndarray,
    camera_rotation: np.ndarray,
    intrinsic: np.ndarray,
    width: int,
    height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Project ego-frame points ``(N, 3)`` into a camera image; returns ``(N, 2)`` ``(u/W, v/H)`` and a valid mask.

    ``camera_translation`` / ``camera_rotation`` (quaternion ``w, x, y, z``) place the camera in the
    ego frame (``p_ego = R p_cam + t``, nuScenes ``calibrated_sensor``); the camera looks along its
    +z axis with x right and y down; ``intrinsic`` is the 3x3 pinhole matrix.
    """
    points = np.atleast_2d(np.asarray(points_ego, dtype=np.float64))
    rotation = quaternion_to_matrix(camera_rotation)
    in_camera = (points - np.asarray(camera_translation, dtype=np.float64)) @ rotation  # R^T (p - t), row form
    depth = in_camera[:, 2]
    safe = np.where(depth > MIN_DEPTH_M, depth, 1.0)
    pixels = in_camera @ np.asarray(intrinsic, dtype=np.float64).T
    u, v = pixels[:, 0] / safe, pixels[:, 1] / safe
    valid = (depth > MIN_DEPTH_M) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    uv = np.stack([u / width, v / height], axis=-1)
    return np.where(valid[:, None], uv, 0.0), valid


def crop_goal(uv: np.ndarray, valid: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Move normalised image points into a crop ``box = (top, left, height, width)`` given as fractions of the image."""
    top, left, h, w = box
    u = (uv[:, 0] - left) / w
    v = (uv[:, 1] - top) / h
    inside = valid & (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    return np.where(inside[:, None], np.stack([u, v], axis=-1), 0.0), inside
