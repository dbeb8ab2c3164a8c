"""Procedurally generated driving-like video with truthful per-frame actions (``vdiff data synth``).

What a video shows
------------------
A forward-facing pinhole camera on a car driving along a two-lane road: sky with distant hills at
the horizon, grass, asphalt with solid edge lines and a dashed centre line, white posts on the
right verge, trees on the left, other cars in the left lane (constant speed, same direction or
oncoming) and boxes bouncing (ballistically) beside the road. Everything is drawn with analytic box
filtering (each pixel gets the exact fraction of a band, dash or box that covers it), so edges are
anti-aliased and H.264 at the default CRF keeps the picture clean.

Motion model (what makes the actions truthful)
----------------------------------------------
The road is the ego car's own path: a curve with curvature ``kappa(s)`` over arc length ``s``
(piecewise constant with linear ramps, i.e. clothoid transitions) and the car drives along it with a
speed ``v(t)`` that is piecewise constant with bounded acceleration (sometimes braking to a stop
and holding it). This is a kinematic bicycle model at the rear axle with wheelbase ``L`` and a
steering ratio ``r``:

    road-wheel angle   delta = steering_wheel / r
    curvature          kappa = tan(delta) / L
    yaw rate           yaw_rate = v * kappa = v * tan(steering_wheel / r) / L

Heading and position are integrated from ``kappa(s)`` on a fine arc-length grid, and every action
is read off those same arrays: ``speed = v``, ``steering`` (steering-wheel degrees) from ``kappa`` at
the car, ``yaw_rate = v * kappa``, ``trajectory`` = the car's own positions 0.5/1/1.5/2 s later in
the ego frame of the current frame (x forward, y left), ``goal`` = the +2 s position projected with
the camera (normalised image coordinates, ``None`` when outside the image), and ``command`` = what
the car does over the next 2 s (stop if it covers less than 2 m, left/right if its heading turns by
more than 0.1 rad, else straight). The picture is rendered from the same poses, so the frames show
exactly what the actions say.

Sign conventions (docs/architecture.md, actions: + = left) and why the picture turns the right way
-----------------------------------------------------------------------------
The ego frame has x forward, y left, z up; positive yaw rate and positive steering turn the car to
the left (counter-clockwise seen from above). The camera projects an ego-frame point (x, y, z) to
column ``u = cx - f * y / x`` and row ``v = cy + f * (h - z) / x``: a point to the left (y > 0)
appears left of the image centre. A world-fixed point at bearing ``b`` (angle from the heading,
+ = left) sits at ``u = cx - f * tan(b)``. When the car yaws left by ``dpsi`` every bearing
decreases by ``dpsi``, so every ``u`` increases: **the scene (road, lane markings, posts, the hills
on the horizon) moves to the RIGHT in the image during a left turn**, exactly as through a real
windscreen. The road ahead, which is the car's future path, bends to the left in the picture at the
same time. Tests measure both on the rendered frames.

Speed is visible as the dashes, posts and trees streaming toward the bottom of the picture by
``speed / fps`` metres of ground per frame; the hills, at infinity, move only with yaw.

Open ground
-----------
The road is the car's own path, so a picture of the road ahead shows where the car will drive: the future steering
can be read off the first frame. ``road=False`` leaves the road and its markings out (open grass, e.g. off-road
driving; set ``num_cars``, ``num_bouncers``, ``post_spacing`` and ``tree_spacing`` to 0 too, since they line the
path), and ``ground_texture`` > 0 paints world-fixed texture on the ground (plane waves of about that wavelength in
metres), so the ground streams toward the camera with the speed and sweeps sideways with the yaw. Then nothing in a
frame tells which way the car will steer: an action-conditioned model must read the steering. Both are off by
default (the pictures of every other setting are unchanged). ``hill_height`` (x the default elevation) and
``hill_haze`` (0: dark ridges) turn the faint hills into a tall skyline: at infinity it slides sideways with the yaw
alone, by ``focal * yaw`` pixels, which is what the Vista quickstart's steering test reads.

Shard sets
----------
:func:`write_synthetic_shards` renders, encodes (:func:`vdiff.data.video_io.encode_video`) and
writes one shard set with its parameters in the manifest's ``extra["synthetic"]``;
:func:`ensure_synthetic_shards` reuses a complete set with the same parameters, so a quickstart can
call it on every run. ``vdiff data synth --out DIR`` writes ``DIR/train`` and, with
``--val-videos M``, ``DIR/val`` (:func:`ensure_synthetic_splits`).

Randomness and determinism
--------------------------
:func:`render_drive` draws everything from ``numpy.random.default_rng(seed)`` (``seed`` may be an
int or a tuple of ints); the same seed gives byte-identical frames and actions. In a shard set,
video ``i`` uses the seed ``(seed, i)``; the validation split written by ``vdiff data synth
--val-videos`` uses indices from :data:`VAL_FIRST_INDEX` on, so it never overlaps training videos
and does not change when the number of training videos does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from vdiff.data.frame_size import add_size_argument
from vdiff.data.schema import COMMANDS, MANIFEST_NAME, TRAJECTORY_STEP_S, Manifest, VideoMeta

RENDERER_VERSION = 1  # bump whenever the same seed would render different frames or actions
SOURCE = "synthetic"
VAL_FIRST_INDEX = 1_000_000_000  # validation videos use seeds (seed, VAL_FIRST_INDEX + i)

NUM_WAYPOINTS = 4
HORIZON_S = NUM_WAYPOINTS * TRAJECTORY_STEP_S  # 2 s: trajectory, goal and command look this far ahead
STOP_DISTANCE_M = 2.0  # command "stop": the car covers less than this in the next HORIZON_S
TURN_HEADING_RAD = 0.1  # command "left"/"right": heading changes by more than this in the next HORIZON_S

Seed = int | Sequence[int]


# ----------------------------------------------------------------------------------------------
# Configuration and camera
# ----------------------------------------------------------------------------------------------


@dataclass
class DriveConfig:
    """Everything that shapes one synthetic drive. ``speed``/``steering`` set constant controls."""

    size: int = 64  # frames are size x size pixels
    num_frames: int = 24
    fps: float = 10.0
    speed_range: tuple[float, float] = (3.0, 14.0)  # cruising speeds, m/s
    steering_range: tuple[float, float] = (-60.0, 60.0)  # steering-wheel degrees, + = left
    speed: float | None = None  # constant speed (m/s) instead of random speed segments
    steering: float | None = None  # constant steering-wheel angle (deg) instead of random curves
    stop_prob: float = 0.15  # chance that a speed segment is a stop (brake to 0 and hold)
    speed_segment_s: tuple[float, float] = (1.5, 4.0)  # duration of one speed target, s
    curve_segment_m: tuple[float, float] = (15.0, 50.0)  # length of one curvature segment, m
    straight_prob: float = 0.35  # chance that a curvature segment is straight
    curve_ramp_m: float = 10.0  # length of the linear curvature transition between segments
    max_accel: float = 2.5  # m/s^2
    max_decel: float = 4.0  # m/s^2
    steering_ratio: float = 15.0  # steering-wheel angle / road-wheel angle
    wheelbase: float = 2.7  # m
    camera_height: float = 1.5  # m above the ground, at the rear axle
    fov_deg: float = 90.0  # horizontal field of view
    horizon: float = 0.4  # horizon row as a fraction of the image height (camera pitch 0)
    draw_distance: float = 60.0  # m; fog hides what lies farther
    lane_width: float = 3.5  # m; the car drives in the right lane of a two-lane road
    dash_length: float = 3.0  # m
    dash_gap: float = 6.0  # m
    num_cars: int = 2  # cars in the left lane
    num_bouncers: int = 1  # boxes bouncing beside the road
    post_spacing: float = 12.0  # m between posts on the right verge (0: none)
    tree_spacing: float = 18.0  # m between trees on the left (0: none)
    road: bool = True  # False: no road and no markings, open ground (see "Open ground" in the module docstring)
    ground_texture: float = 0.0  # m: wavelength of world-fixed ground texture (0: plain grass)
    hill_height: float = 1.0  # scales the hills' elevation above the horizon (1: low hills, about 4 degrees)
    hill_haze: float = 0.4  # fraction of haze colour in the hills (0.4: faint, distant; 0: dark, sharp ridges)

    def validate(self) -> DriveConfig:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"DriveConfig.{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.size, int) or self.size < 8:
            fail("size", "must be an integer >= 8")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            fail("num_frames", "must be a positive integer")
        if not (math.isfinite(self.fps) and self.fps > 0):
            fail("fps", "must be a positive number")
        for name in ("speed_range", "steering_range", "speed_segment_s", "curve_segment_m"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                fail(name, "must be (low, high) with low <= high")
        if self.speed_range[0] < 0 or (self.speed is not None and self.speed < 0):
            fail("speed_range" if self.speed is None else "speed", "speeds must be >= 0 (the car drives forward)")
        if self.speed_segment_s[0] <= 0 or self.curve_segment_m[0] <= 0:
            fail("speed_segment_s" if self.speed_segment_s[0] <= 0 else "curve_segment_m", "must be positive")
        limit = 0.9 * self.steering_ratio * 90.0  # road-wheel angle must stay below 81 degrees
        worst = max(abs(self.steering_range[0]), abs(self.steering_range[1]), abs(self.steering or 0.0))
        if worst >= limit:
            name = "steering_range" if self.steering is None else "steering"
            fail(name, f"|steering| must stay below {limit:.0f} deg")
        for name in ("stop_prob", "straight_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must be a probability in [0, 1]")
        for name in ("max_accel", "max_decel", "steering_ratio", "wheelbase", "camera_height", "draw_distance",
                     "lane_width", "dash_length", "dash_gap"):
            if not getattr(self, name) > 0:
                fail(name, "must be positive")
        if not 10.0 <= self.fov_deg <= 150.0:
            fail("fov_deg", "must be within [10, 150]")
        if not 0.05 <= self.horizon <= 0.9:
            fail("horizon", "must be within [0.05, 0.9]")
        for name in ("num_cars", "num_bouncers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "must be a non-negative integer")
        for name in ("post_spacing", "tree_spacing", "curve_ramp_m", "ground_texture"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not 0.0 < self.hill_height <= 8.0:
            fail("hill_height", "must be within (0, 8]")
        if not 0.0 <= self.hill_haze <= 1.0:
            fail("hill_haze", "must be within [0, 1]")
        return self


@dataclass(frozen=True)
class Camera:
    """The synthetic pinhole camera: at height ``height`` above the rear axle, looking forward, pitch 0.

    Image coordinates are continuous, ``u`` to the right and ``v`` down, pixel ``(i, j)`` covering
    ``[j, j+1] x [i, i+1]``; normalised coordinates divide by the image size.
    """

    size: int
    focal: float  # pixels
    cx: float  # principal point column (image centre)
    cy: float  # horizon row
    height: float  # m

    @classmethod
    def from_config(cls, cfg: DriveConfig) -> Camera:
        focal = 0.5 * cfg.size / math.tan(math.radians(cfg.fov_deg) / 2)
        return cls(size=cfg.size, focal=focal, cx=0.5 * cfg.size, cy=cfg.horizon * cfg.size, height=cfg.camera_height)

    def project(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Ego-frame point(s) (x forward, y left, z up; metres) -> image (u, v) in pixels. Needs x > 0."""
        x = np.asarray(x, dtype=np.float64)
        return self.cx - self.focal * np.asarray(y) / x, self.cy + self.focal * (self.height - np.asarray(z)) / x

    def ground_depth(self, v: np.ndarray | float) -> np.ndarray:
        """Forward distance (m) of the ground seen at image row coordinate ``v`` (below the horizon)."""
        return self.focal * self.height / (np.asarray(v, dtype=np.float64) - self.cy)


# ----------------------------------------------------------------------------------------------
# Motion: speed over time, curvature over arc length, poses
# ----------------------------------------------------------------------------------------------

_SIM_DT = 0.01  # s, time step of the speed integration
_PATH_DS = 0.25  # m, arc-length step of the path integration
_PATH_BEHIND_M = 120.0  # path also extends this far behind the start (oncoming cars pass behind)


def steering_to_curvature(steering_deg: np.ndarray | float, cfg: DriveConfig) -> np.ndarray:
    """Kinematic bicycle: steering-wheel degrees -> path curvature (1/m, + = left)."""
    return np.tan(np.radians(steering_deg) / cfg.steering_ratio) / cfg.wheelbase


def curvature_to_steering(kappa: np.ndarray | float, cfg: DriveConfig) -> np.ndarray:
    """Inverse of :func:`steering_to_curvature`."""
    return np.degrees(np.arctan(np.asarray(kappa) * cfg.wheelbase)) * cfg.steering_ratio


@dataclass
class Drive:
    """One simulated drive: the path (road centre of the ego lane) and the speed profile."""

    path_s: np.ndarray  # (K,) arc length, m (world-fixed; 0 = the car's start)
    path_x: np.ndarray  # (K,) world position, m
    path_y: np.ndarray  # (K,)
    path_heading: np.ndarray  # (K,) rad
    path_kappa: np.ndarray  # (K,) 1/m
    time: np.ndarray  # (N,) s
    speed: np.ndarray  # (N,) m/s
    distance: np.ndarray  # (N,) arc length travelled, m

    def arc_at(self, t: np.ndarray) -> np.ndarray:
        return np.interp(t, self.time, self.distance)

    def speed_at(self, t: np.ndarray) -> np.ndarray:
        return np.interp(t, self.time, self.speed)

    def pose_at(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World (x, y, heading) of the path at arc length(s) ``s``."""
        return (
            np.interp(s, self.path_s, self.path_x),
            np.interp(s, self.path_s, self.path_y),
            np.interp(s, self.path_s, self.path_heading),
        )

    def kappa_at(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self.path_s, self.path_kappa)


def _speed_profile(cfg: DriveConfig, rng: np.random.Generator, duration: float) -> tuple[np.ndarray, np.ndarray]:
    """Speed on a fine time grid: piecewise-constant targets reached with bounded acceleration."""
    steps = int(math.ceil(duration / _SIM_DT)) + 1
    time = np.arange(steps) * _SIM_DT
    if cfg.speed is not None:
        return time, np.full(steps, float(cfg.speed))
    speed = np.empty(steps)
    start, current = 0, None
    while start < steps:
        length = rng.uniform(*cfg.speed_segment_s)
        stop = rng.random() < cfg.stop_prob
        target = 0.0 if stop else rng.uniform(*cfg.speed_range)
        end = min(steps, max(start + 1, int(round((time[start] + length) / _SIM_DT))))
        if current is None:  # the clip starts at its first target speed, or brakes into a first stop
            current = rng.choice([0.0, rng.uniform(*cfg.speed_range)]) if stop else target
        # Move toward the target at the acceleration limit, then hold it (bounded-acceleration ramps).
        elapsed = time[start:end] - time[start] + _SIM_DT
        speed[start:end] = current + np.clip(target - current, -cfg.max_decel * elapsed, cfg.max_accel * elapsed)
        start, current = end, float(speed[end - 1])
    return time, speed


def _curvature_profile(cfg: DriveConfig, rng: np.random.Generator, s: np.ndarray) -> np.ndarray:
    """Curvature over the arc-length grid ``s``: random segments joined by linear ramps."""
    if cfg.steering is not None:
        return np.full(s.shape, float(steering_to_curvature(cfg.steering, cfg)))
    steering = np.zeros(s.shape)
    start, first = 0.0, True
    while start < s[-1]:
        length = rng.uniform(*cfg.curve_segment_m)
        if first or rng.random() >= cfg.straight_prob:
            value = rng.uniform(*cfg.steering_range)
        else:
            value = 0.0
        steering[(s >= start) & (s < start + length)] = value
        start, first = start + length, False
    steering[s < 0] = steering[np.searchsorted(s, 0.0)]  # the road behind the start continues the first curve
    kappa = steering_to_curvature(steering, cfg)
    ramp = int(round(cfg.curve_ramp_m / _PATH_DS))
    if ramp > 1:  # a box filter turns steps into linear ramps (clothoids); edges padded with their value
        padded = np.pad(kappa, (ramp // 2, ramp - 1 - ramp // 2), mode="edge")
        kappa = np.convolve(padded, np.full(ramp, 1.0 / ramp), mode="valid")
    return kappa


def simulate_drive(cfg: DriveConfig, rng: np.random.Generator) -> Drive:
    """Speed profile for the clip plus HORIZON_S, and a path long enough for everything drawn."""
    duration = (cfg.num_frames - 1) / cfg.fps + HORIZON_S + 0.5
    time, speed = _speed_profile(cfg, rng, duration)
    distance = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * _SIM_DT)])
    car_reach = (cfg.speed_range[1] if cfg.speed is None else cfg.speed) * duration
    length = distance[-1] + 1.5 * cfg.draw_distance + 2 * car_reach + 60.0
    s = np.arange(-_PATH_BEHIND_M - car_reach, length + _PATH_DS, _PATH_DS)
    kappa = _curvature_profile(cfg, rng, s)
    # Integrate heading and position from s = 0 both ways (trapezoid rule on the same grid).
    zero = int(np.searchsorted(s, 0.0))
    s = s - s[zero]  # put a grid point exactly at the start
    dheading = 0.5 * (kappa[1:] + kappa[:-1]) * _PATH_DS
    heading = np.concatenate([[0.0], np.cumsum(dheading)])
    heading -= heading[zero]
    dx = 0.5 * (np.cos(heading[1:]) + np.cos(heading[:-1])) * _PATH_DS
    dy = 0.5 * (np.sin(heading[1:]) + np.sin(heading[:-1])) * _PATH_DS
    px = np.concatenate([[0.0], np.cumsum(dx)])
    py = np.concatenate([[0.0], np.cumsum(dy)])
    return Drive(s, px - px[zero], py - py[zero], heading, kappa, time, speed, distance)


def to_ego(x: np.ndarray, y: np.ndarray, ego_x: np.ndarray, ego_y: np.ndarray, ego_heading: np.ndarray):
    """World points -> ego frame (x forward, y left) of poses given by ``ego_*`` (broadcasting)."""
    dx, dy = x - ego_x, y - ego_y
    cos, sin = np.cos(ego_heading), np.sin(ego_heading)
    return cos * dx + sin * dy, -sin * dx + cos * dy


# ----------------------------------------------------------------------------------------------
# Actions
# ----------------------------------------------------------------------------------------------


def drive_actions(drive: Drive, cfg: DriveConfig, camera: Camera) -> dict[str, list]:
    """Per-frame actions in the schema of :mod:`vdiff.data.schema`, read off the simulated motion."""
    t = np.arange(cfg.num_frames) / cfg.fps  # (T,)
    s_now = drive.arc_at(t)  # (T,)
    ex, ey, eh = drive.pose_at(s_now)
    speed = drive.speed_at(t)
    kappa = drive.kappa_at(s_now)
    steps = TRAJECTORY_STEP_S * np.arange(1, NUM_WAYPOINTS + 1)  # (4,)
    s_future = drive.arc_at(t[:, None] + steps[None, :])  # (T, 4)
    fx, fy, fh = drive.pose_at(s_future)
    tx, ty = to_ego(fx, fy, ex[:, None], ey[:, None], eh[:, None])  # (T, 4) each
    trajectory = np.stack([tx, ty], axis=-1)  # (T, 4, 2)

    travelled = s_future[:, -1] - s_now
    turn = fh[:, -1] - eh
    command = np.where(turn > TURN_HEADING_RAD, COMMANDS["left"], COMMANDS["straight"])
    command = np.where(turn < -TURN_HEADING_RAD, COMMANDS["right"], command)
    command = np.where(travelled < STOP_DISTANCE_M, COMMANDS["stop"], command)

    goals: list[list[float] | None] = []
    for gx, gy in trajectory[:, -1]:
        goal = None
        if gx > 1e-3:
            u, v = camera.project(gx, gy, 0.0)
            nu, nv = float(u) / cfg.size, float(v) / cfg.size
            if 0.0 <= nu <= 1.0 and 0.0 <= nv <= 1.0:
                goal = [round(nu, 6), round(nv, 6)]
        goals.append(goal)

    def r(a: np.ndarray) -> list:
        return np.round(a.astype(np.float64), 6).tolist()

    return {
        "speed": r(speed),
        "steering": r(curvature_to_steering(kappa, cfg)),
        "yaw_rate": r(speed * kappa),
        "command": command.astype(int).tolist(),
        "trajectory": r(trajectory),
        "goal": goals,
    }


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _cover(lo: np.ndarray, hi: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Fraction of each unit cell ``[c, c+1]`` covered by the interval ``[lo, hi]`` (broadcasting)."""
    return np.maximum(np.minimum(cells + 1, hi) - np.maximum(cells, lo), 0)  # never above 1


def _dash_integral(s: np.ndarray, dash: float, period: float) -> np.ndarray:
    """Length of dashes in ``[0, s]`` for a pattern of ``dash`` metres painted every ``period``."""
    return np.floor(s / period) * dash + np.minimum(np.mod(s, period), dash)


def _level(rgb: Sequence[float] | np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> the float32 pixel level used while drawing: ``255 * rgb + 0.5``.

    Every drawing step mixes colours with weights that sum to one, so the +0.5 carries through to
    the final picture and truncating to uint8 rounds to the nearest level (one pass instead of three).
    """
    return (np.asarray(rgb, dtype=np.float64) * 255.0 + 0.5).astype(np.float32)


@dataclass
class _Scene:
    """Colours and objects of one drive (drawn from the scene random stream)."""

    sky_top: np.ndarray
    haze: np.ndarray
    hills: np.ndarray
    grass: np.ndarray
    asphalt: np.ndarray
    paint: np.ndarray
    hill_terms: np.ndarray  # (M, 3): frequency (integer), amplitude (rad), phase
    hill_base: float
    boxes: list[dict[str, Any]]  # see _scene_boxes
    ground_terms: np.ndarray | None = None  # (M, 4): wavelength (m), direction (rad), phase, amplitude


def _make_scene(cfg: DriveConfig, rng: np.random.Generator, drive: Drive) -> _Scene:
    def jitter(rgb: Sequence[float], amount: float) -> np.ndarray:
        return _level(np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0.0, 1.0))

    freqs = np.array([2, 3, 5, 8, 13, 21], dtype=np.float64)
    amps = rng.uniform(0.3, 1.0, freqs.size) * 0.05 / np.sqrt(freqs / 2.0)
    phases = rng.uniform(0, 2 * np.pi, freqs.size)
    scene = _Scene(
        sky_top=jitter((0.30, 0.50, 0.85), 0.08),
        haze=jitter((0.78, 0.82, 0.88), 0.05),
        hills=jitter((0.42, 0.52, 0.50), 0.08),
        grass=jitter((0.30, 0.48, 0.20), 0.07),
        asphalt=jitter((0.32, 0.32, 0.34), 0.04),
        paint=_level((0.95, 0.95, 0.90)),
        hill_terms=np.stack([freqs, amps, phases], axis=1),
        hill_base=float(rng.uniform(0.05, 0.09)),
        boxes=[],
    )
    t_end = (cfg.num_frames - 1) / cfg.fps
    s_start, s_end = 0.0, float(drive.arc_at(np.array(t_end)))
    lane = cfg.lane_width
    # Other cars: left lane (lateral +lane from the ego path), constant speed along the road.
    for _ in range(cfg.num_cars):
        oncoming = rng.random() < 0.5
        if oncoming:
            car_speed = -rng.uniform(5.0, 12.0)
            s0 = s_start + rng.uniform(20.0, 20.0 + cfg.draw_distance + 12.0 * t_end)
        else:
            car_speed = rng.uniform(*cfg.speed_range)
            s0 = s_start + rng.uniform(8.0, 0.7 * cfg.draw_distance)
        body = jitter(rng.choice([(0.8, 0.1, 0.1), (0.1, 0.3, 0.8), (0.9, 0.8, 0.1), (0.9, 0.9, 0.9),
                                  (0.1, 0.1, 0.1), (0.2, 0.6, 0.3)]), 0.08)
        scene.boxes.append(dict(s0=s0, v=car_speed, lateral=lane, z=0.3, width=1.8, height=1.1, color=body,
                                window=True, bounce=None))
    # Bouncing boxes on the right verge: ballistic hops z(t) = 4 H tau (1 - tau), tau = phase within a hop.
    for _ in range(cfg.num_bouncers):
        scene.boxes.append(dict(s0=s_start + rng.uniform(10.0, 0.6 * cfg.draw_distance), v=0.0,
                                lateral=-rng.uniform(2.5, 5.0), z=0.0, width=0.8, height=0.8,
                                color=jitter(rng.choice([(0.95, 0.5, 0.1), (0.8, 0.2, 0.7), (0.2, 0.8, 0.9)]), 0.05),
                                window=False, bounce=(rng.uniform(0.8, 2.0), rng.uniform(0.6, 1.2), rng.uniform())))
    # World-fixed posts (right verge) and trees (left), at jittered spacing.
    reach = s_end + cfg.draw_distance
    for spacing, lateral, width, height, color in (
        (cfg.post_spacing, -(0.5 * lane + 1.2), 0.25, 1.2, (0.92, 0.92, 0.92)),
        (cfg.tree_spacing, 1.5 * lane + 2.5, 2.2, 4.5, (0.13, 0.36, 0.13)),
    ):
        if spacing <= 0:
            continue
        s = s_start - 2.0 + rng.uniform(0, spacing)
        while s < reach:
            scene.boxes.append(dict(s0=s, v=0.0, lateral=lateral + rng.uniform(-0.3, 0.3), z=0.0, width=width,
                                    height=height * rng.uniform(0.85, 1.15), color=jitter(color, 0.04),
                                    window=False, bounce=None))
            s += spacing * rng.uniform(0.8, 1.2)
    if cfg.ground_texture > 0:  # drawn last: every other choice of a seed stays what it was without texture
        count = 4
        scene.ground_terms = np.stack([cfg.ground_texture * rng.uniform(1.0, 2.5, count),
                                       rng.uniform(0, np.pi, count), rng.uniform(0, 2 * np.pi, count),
                                       rng.uniform(0.5, 1.0, count) / count], axis=1)
    return scene


def _render_sky(cfg: DriveConfig, camera: Camera, scene: _Scene, heading: np.ndarray) -> np.ndarray:
    """Sky gradient with hills at infinity; they move only with the heading (T,) -> (T, S, S, 3)."""
    size = cfg.size
    rows = np.arange(size, dtype=np.float32)
    ramp = np.clip((rows + 0.5) / max(camera.cy, 1.0), 0.0, 1.0)[:, None]  # 0 at the top, 1 at the horizon
    sky = (scene.sky_top[None, :] * (1 - ramp) + scene.haze[None, :] * ramp).astype(np.float32)  # (S, 3)
    frames = np.empty((heading.size, size, size, 3), dtype=np.float32)
    sky_rows = min(int(math.ceil(camera.cy)), size)  # the ground (drawn next) covers every row below
    frames[:, :sky_rows] = sky[None, :sky_rows, None, :]
    cols = np.arange(size, dtype=np.float64) + 0.5
    azimuth = heading[:, None] + np.arctan((camera.cx - cols[None, :]) / camera.focal)  # (T, S), + = left
    freq, amp, phase = scene.hill_terms.T
    elevation = cfg.hill_height * (scene.hill_base + np.sum(amp * np.sin(azimuth[..., None] * freq + phase), axis=-1))
    top = (camera.cy - camera.focal * np.tan(np.maximum(elevation, 0.005))).astype(np.float32)  # (T, S) ridge row
    r0, r1 = max(int(top.min()), 0), min(int(math.ceil(camera.cy)), size)  # only the hill band changes
    band_rows = rows[r0:r1, None]
    coverage = _cover(top[:, None, :], np.float32(camera.cy), band_rows[None])[..., None]  # (T, rows, S, 1)
    hills = ((1 - cfg.hill_haze) * scene.hills + cfg.hill_haze * scene.haze).astype(np.float32)  # distant: hazy
    band = frames[:, r0:r1]
    frames[:, r0:r1] = band + coverage * (hills - band)
    return frames


def _road_geometry(cfg: DriveConfig, drive: Drive, s_now: np.ndarray, pose, depths: np.ndarray):
    """For every frame and each ground depth in ``depths`` (D,): the road centre's lateral offset,
    the road's heading relative to the car, the world arc length there, and whether the road reaches
    that depth. Returns four (T, D) arrays."""
    ex, ey, eh = pose
    ahead = np.arange(0.0, 1.6 * cfg.draw_distance, 0.5)  # (J,)
    px, py, ph = drive.pose_at(s_now[:, None] + ahead[None, :])  # (T, J)
    x, y = to_ego(px, py, ex[:, None], ey[:, None], eh[:, None])
    rel = ph - eh[:, None]
    # Road centre (between the two lanes) lies half a lane to the left of the ego path.
    half = 0.5 * cfg.lane_width
    x, y = x - half * np.sin(rel), y + half * np.cos(rel)
    # Beyond the point where the road turns more than ~70 degrees it is no longer a function of depth:
    # freeze it there (such depths get masked out as unreached).
    bad = np.abs(rel) > 1.2
    bad[:, :2] = False
    stop = np.where(bad.any(axis=1), np.argmax(bad, axis=1), ahead.size)  # (T,)
    frozen = np.arange(ahead.size)[None, :] >= stop[:, None]
    last = np.take_along_axis(x, stop[:, None] - 1, axis=1)
    xs = np.maximum.accumulate(np.where(frozen, last, x), axis=1)
    reach = xs[:, -1]
    # One np.interp for all frames: frame i's depths and samples are offset by i * block.
    block = 10.0 * (ahead[-1] + depths.max() + 1.0)
    offset = block * np.arange(len(s_now))[:, None]
    query = (depths[None, :] + offset).ravel()
    grid = (xs + offset).ravel()

    def at_depths(values: np.ndarray) -> np.ndarray:
        return np.interp(query, grid, values.ravel()).reshape(len(s_now), depths.size)

    arc = s_now[:, None] + ahead[None, :]
    return at_depths(y), at_depths(rel), at_depths(arc), depths[None, :] <= reach[:, None]


def _render_ground(cfg: DriveConfig, camera: Camera, scene: _Scene, drive: Drive, s_now, pose, frames) -> None:
    """Grass, road, edge lines and dashed centre line, box-filtered per pixel, fogged with distance."""
    size = cfg.size
    first = int(math.floor(camera.cy))
    rows = np.arange(first, size, dtype=np.float64)  # rows that hold ground
    far = cfg.draw_distance * 1.5
    top = np.maximum(rows, camera.cy)  # the ground part of each row: [top, rows + 1]
    ground_frac = (rows + 1 - top).astype(np.float32)  # < 1 only on the horizon row
    d_far = np.minimum(camera.ground_depth(np.maximum(top, camera.cy + 1e-6)), far)  # (R,) far edge
    d_near = np.minimum(camera.ground_depth(rows + 1), far)  # (R,) near edge
    d_mid = np.minimum(camera.ground_depth(0.5 * (top + rows + 1)), far)  # (R,)
    depths = np.concatenate([d_mid, d_far, d_near])
    lateral, rel, arc, reached = _road_geometry(cfg, drive, s_now, pose, depths)
    r = rows.size
    lat, cos_rel = lateral[:, :r], np.maximum(np.cos(rel[:, :r]), 0.3)
    arc_far, arc_near = arc[:, r:2 * r], arc[:, 2 * r:]
    on_road = reached[:, :r]

    period = cfg.dash_length + cfg.dash_gap
    span = arc_far - arc_near
    dash_cov = np.where(
        span > 1e-6,
        (_dash_integral(arc_far, cfg.dash_length, period) - _dash_integral(arc_near, cfg.dash_length, period))
        / np.maximum(span, 1e-6),
        (np.mod(arc_near, period) < cfg.dash_length).astype(np.float64),
    )

    cols = np.arange(size, dtype=np.float32)[None, None, :]
    scale = (camera.focal / d_mid).astype(np.float32)[None, :, None]  # pixels per metre at each row
    lat, cos_rel = lat.astype(np.float32), cos_rel.astype(np.float32)
    dash_cov, on_road = dash_cov.astype(np.float32), on_road.astype(np.float32)
    cx = np.float32(camera.cx)

    def band(center: np.ndarray, half_width: np.ndarray) -> np.ndarray:
        # Lateral band [center - half, center + half] (metres, + = left) -> per-pixel coverage (T, R, S).
        lo = cx - (center + half_width)[..., None] * scale
        hi = cx - (center - half_width)[..., None] * scale
        return _cover(lo, hi, cols)

    if cfg.road:
        line = np.float32(0.1) / cos_rel  # lines are 0.2 m wide
        road = band(lat, np.float32(cfg.lane_width) / cos_rel) * on_road[..., None]
        edge_offset = np.float32(cfg.lane_width - 0.25) / cos_rel
        paint = np.minimum(band(lat + edge_offset, line) + band(lat - edge_offset, line)
                           + band(lat, line) * dash_cov[..., None], 1) * on_road[..., None]
    else:  # open ground: grass everywhere
        road = paint = np.zeros((len(s_now), r, size), dtype=np.float32)
    # Mix four colours with per-pixel weights that sum to one, one colour channel at a time
    # (contiguous planes with scalar factors are about twice as fast as (..., 3)-broadcasting or a GEMM).
    fog = np.exp(-d_mid / (0.35 * cfg.draw_distance)).astype(np.float32)[None, :, None]  # (1, R, 1)
    keep = fog * (1 - paint)  # unpainted surface
    w_asphalt = keep * road
    w_grass = keep - w_asphalt
    w_paint = fog * paint
    w_haze = 1 - fog
    color = np.empty((*paint.shape, 3), dtype=np.float32)  # (T, R, S, 3)
    grass = _ground_shade(camera, scene, pose, d_mid, size) if scene.ground_terms is not None else None
    for ch in range(3):
        plane = w_grass * (scene.grass[ch] if grass is None else grass * scene.grass[ch])
        plane += w_asphalt * scene.asphalt[ch]
        plane += w_paint * scene.paint[ch]
        plane += w_haze * scene.haze[ch]
        color[..., ch] = plane
    if ground_frac[0] < 1:  # the horizon row is only partly ground
        frames[:, first] += ground_frac[0] * (color[:, 0] - frames[:, first])
        frames[:, first + 1:] = color[:, 1:]
    else:
        frames[:, first:] = color


def _ground_shade(camera: Camera, scene: _Scene, pose, depths: np.ndarray, size: int) -> np.ndarray:
    """World-fixed ground texture: a brightness factor ``(T, R, S)`` around 1 for the ground seen at each row's
    depth ``depths`` (R,) and each column, from the car's poses (T,). The texture is a sum of plane waves fixed in
    the world (``scene.ground_terms``); each wave fades where a pixel's footprint on the ground nears half its
    wavelength (a built-in low-pass, so the far ground does not alias)."""
    ex, ey, eh = (np.asarray(a, dtype=np.float64)[:, None, None] for a in pose)  # (T, 1, 1)
    d = depths[None, :, None]  # (1, R, 1)
    cols = np.arange(size, dtype=np.float64)[None, None, :] + 0.5
    lateral = (camera.cx - cols) * d / camera.focal  # (1, R, S): metres to the left at that depth
    wx = ex + np.cos(eh) * d - np.sin(eh) * lateral  # (T, R, S) world position of the ground seen there
    wy = ey + np.sin(eh) * d + np.cos(eh) * lateral
    footprint = np.maximum(d * d / (camera.focal * camera.height), d / camera.focal)  # (1, R, 1): m per pixel
    shade = np.ones(wx.shape, dtype=np.float64)
    for wavelength, direction, phase, amplitude in scene.ground_terms:
        fade = np.clip(1.0 - 2.0 * footprint / wavelength, 0.0, 1.0)
        along = wx * np.cos(direction) + wy * np.sin(direction)
        shade += amplitude * fade * np.sin(2 * np.pi * along / wavelength + phase)
    return shade.astype(np.float32)


def _render_boxes(cfg: DriveConfig, camera: Camera, scene: _Scene, drive: Drive, pose, frames) -> None:
    """Cars, posts, trees and bouncing boxes as camera-facing boxes, painted far to near."""
    if not scene.boxes:
        return
    ex, ey, eh = pose
    t = np.arange(cfg.num_frames) / cfg.fps  # (T,)
    items = []  # (x, y, z, width, height, color) each (T,) or scalar
    for box in scene.boxes:
        s = box["s0"] + box["v"] * t
        wx, wy, wh = drive.pose_at(s)
        # Lateral offset from the ego path along the path normal (-sin h, cos h).
        wx, wy = wx - box["lateral"] * np.sin(wh), wy + box["lateral"] * np.cos(wh)
        x, y = to_ego(wx, wy, ex, ey, eh)
        z = np.full_like(t, box["z"])
        if box["bounce"] is not None:
            hop_height, hop_period, phase = box["bounce"]
            tau = np.mod(t / hop_period + phase, 1.0)
            z = z + 4 * hop_height * tau * (1 - tau)
        items.append((x, y, z, box["width"], box["height"], box["color"]))
        if box["window"]:  # a dark windscreen band on the upper part of a car body, slightly nearer
            items.append((x - 0.05, y, z + 0.55 * box["height"], 0.8 * box["width"], 0.35 * box["height"],
                          _level((0.12, 0.14, 0.18))))
    xs = np.stack([it[0] for it in items], axis=1)  # (T, N)
    ys = np.stack([it[1] for it in items], axis=1)
    zs = np.stack([it[2] for it in items], axis=1)
    widths = np.array([it[3] for it in items])[None, :]
    heights = np.array([it[4] for it in items])[None, :]
    colors = np.stack([it[5] for it in items]).astype(np.float32)  # (N, 3)
    near, size = 1.0, cfg.size
    safe_x = np.maximum(xs, near)
    left = (camera.cx - camera.focal * (ys + 0.5 * widths) / safe_x).astype(np.float32)  # (T, N)
    right = (camera.cx - camera.focal * (ys - 0.5 * widths) / safe_x).astype(np.float32)
    bottom = (camera.cy + camera.focal * (camera.height - zs) / safe_x).astype(np.float32)
    top = (camera.cy + camera.focal * (camera.height - zs - heights) / safe_x).astype(np.float32)
    # Boxes fade out between 50% and 75% of the draw distance instead of popping in and out.
    fade = np.clip((0.75 * cfg.draw_distance - xs) / (0.25 * cfg.draw_distance), 0.0, 1.0).astype(np.float32)
    visible = (xs > near) & (fade > 0) & (right > 0) & (left < size) & (bottom > 0) & (top < size)
    if not visible.any():
        return
    cells = np.arange(size, dtype=np.float32)
    cov_x = _cover(left[..., None], right[..., None], cells) * fade[..., None]  # (T, N, S)
    cov_y = _cover(top[..., None], bottom[..., None], cells)  # (T, N, S)
    fog = np.exp(-xs / (0.35 * cfg.draw_distance)).astype(np.float32)[..., None]
    shade = scene.haze + fog * (colors[None] - scene.haze)  # (T, N, 3)
    c0 = np.clip(np.floor(left), 0, size).astype(int).tolist()  # pixel bounds as Python ints for slicing
    c1 = np.clip(np.ceil(right), 0, size).astype(int).tolist()
    r0 = np.clip(np.floor(top), 0, size).astype(int).tolist()
    r1 = np.clip(np.ceil(bottom), 0, size).astype(int).tolist()
    order = np.argsort(np.where(visible, -xs, np.inf), axis=1, kind="stable").tolist()  # far to near
    counts = visible.sum(axis=1).tolist()
    for f in range(cfg.num_frames):
        for n in order[f][: counts[f]]:
            a0, a1, b0, b1 = r0[f][n], r1[f][n], c0[f][n], c1[f][n]
            alpha = (cov_y[f, n, a0:a1, None] * cov_x[f, n, None, b0:b1])[..., None]
            patch = frames[f, a0:a1, b0:b1]
            patch += alpha * (shade[f, n] - patch)


def render_drive(
    num_frames: int, size: int, seed: Seed, fps: float = 10.0, **options: Any
) -> tuple[np.ndarray, dict[str, list]]:
    """Render one synthetic drive.

    ``options`` are any other :class:`DriveConfig` fields (e.g. ``speed=8.0, steering=45.0`` for
    constant controls, ``num_cars=0``). Returns ``frames`` ``(T, S, S, 3)`` uint8 RGB and the per-frame
    actions ``{"speed", "steering", "yaw_rate", "command", "trajectory", "goal"}``, each a list of
    ``num_frames`` entries (see the module docstring for units and signs).
    """
    known = {f.name for f in fields(DriveConfig)} - {"num_frames", "size", "fps"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"render_drive: unknown option(s) {unknown}; known: {sorted(known)}")
    cfg = DriveConfig(size=size, num_frames=num_frames, fps=fps, **options).validate()
    return render_config(cfg, seed)


def render_config(cfg: DriveConfig, seed: Seed) -> tuple[np.ndarray, dict[str, list]]:
    """:func:`render_drive` for a ready :class:`DriveConfig`."""
    rng = np.random.default_rng(seed)
    motion_rng, scene_rng = rng.spawn(2)  # scene choices never change the motion of a seed
    camera = Camera.from_config(cfg)
    drive = simulate_drive(cfg, motion_rng)
    scene = _make_scene(cfg, scene_rng, drive)
    t = np.arange(cfg.num_frames) / cfg.fps
    s_now = drive.arc_at(t)
    pose = drive.pose_at(s_now)
    frames = _render_sky(cfg, camera, scene, pose[2])
    _render_ground(cfg, camera, scene, drive, s_now, pose, frames)
    _render_boxes(cfg, camera, scene, drive, pose, frames)
    frames = frames.astype(np.uint8)  # levels carry +0.5 (see _level): truncation rounds
    return frames, drive_actions(drive, cfg, camera)


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


def video_key(seed: int, index: int) -> str:
    """Sample key of synthetic video ``index`` of stream ``seed`` (unique within a shard set)."""
    return f"synth-{seed}-{index:010d}"


def _render_sample(task: tuple[dict[str, Any], int, int, int | None]) -> tuple[str, bytes, VideoMeta]:
    """Render and encode one video (top level so worker processes can run it)."""
    from vdiff.data.video_io import DEFAULT_CRF, encode_video

    config, seed, index, crf = task
    cfg = DriveConfig(**config)
    frames, actions = render_config(cfg, (seed, index))
    mp4 = encode_video(frames, cfg.fps, crf=DEFAULT_CRF if crf is None else crf)
    meta = VideoMeta(
        fps=float(cfg.fps), width=cfg.size, height=cfg.size, num_frames=cfg.num_frames, source=SOURCE,
        actions=actions, extra={"seed": [seed, index], "renderer_version": RENDERER_VERSION},
    )
    return video_key(seed, index), mp4, meta


def synthetic_params(
    num_videos: int, num_frames: int, size: int, seed: int, fps: float = 10.0, crf: int | None = None,
    first_index: int = 0, **options: Any,
) -> dict[str, Any]:
    """What determines a synthetic shard set, as stored in its manifest's ``extra["synthetic"]``."""
    from vdiff.data.video_io import DEFAULT_CRF

    params = dict(
        renderer_version=RENDERER_VERSION, num_videos=num_videos, num_frames=num_frames, size=size, seed=seed,
        fps=float(fps), crf=DEFAULT_CRF if crf is None else crf, first_index=first_index, options=options,
    )
    return json.loads(json.dumps(params))  # as it reads back from json (tuples become lists)


def _check_write_args(num_videos: int, size: int, seed: int, first_index: int, max_count: int, workers: int) -> None:
    if not isinstance(num_videos, int) or num_videos < 1:
        raise ValueError(f"num_videos must be a positive integer, got {num_videos!r}")
    if size % 2:
        raise ValueError(f"size must be even (H.264 yuv420p), got {size}")
    if not isinstance(seed, int) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(
            f"seed must be an integer and first_index a non-negative integer, got {seed!r}, {first_index!r}"
        )
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def complete_manifest(out: str | Path, params: dict[str, Any]) -> Manifest | None:
    """The manifest in ``out`` if it was written with exactly ``params`` and all its shards exist."""
    out = Path(out)
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.load(out)
    except (OSError, ValueError):
        return None
    if manifest.extra.get("synthetic") != params or manifest.num_samples != params["num_videos"]:
        return None
    if not all((out / shard.path).is_file() for shard in manifest.shards):
        return None
    return manifest


def _replace_folder_contents(new: Path, out: Path) -> None:
    """Move the finished shard set in ``new`` to ``out``, first removing an earlier synthetic set there."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        old_files: list[Path] = []
        if (out / MANIFEST_NAME).is_file():
            try:
                old = Manifest.load(out)
            except ValueError as err:
                raise FileExistsError(f"{out} holds a manifest that is not a vdiff shard manifest ({err})") from None
            if "synthetic" not in old.extra:
                raise FileExistsError(f"{out} holds a shard set that vdiff data synth did not write; use another --out")
            old_files = [out / shard.path for shard in old.shards] + [out / MANIFEST_NAME]
        stray = sorted(p.name for p in out.glob("*.tar") if p not in old_files)
        if stray:
            raise FileExistsError(
                f"{out} holds shards not listed in a synthetic manifest ({stray[0]}, ...); use another --out"
            )
        for path in old_files:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in new.iterdir())
    for name in names:  # shards first, the manifest last: a manifest only ever names complete shards
        if name != MANIFEST_NAME:
            os.replace(new / name, out / name)
    os.replace(new / MANIFEST_NAME, out / MANIFEST_NAME)
    new.rmdir()


def write_synthetic_shards(
    out: str | Path,
    num_videos: int,
    num_frames: int,
    size: int,
    seed: int,
    fps: float = 10.0,
    max_count: int = 64,
    crf: int | None = None,
    workers: int = 1,
    first_index: int = 0,
    progress: bool = False,
    **options: Any,
) -> Manifest:
    """Render ``num_videos`` drives (video ``i`` with seed ``(seed, first_index + i)``), encode them as
    H.264 mp4 and write shards of at most ``max_count`` videos plus ``manifest.json`` into ``out``.

    ``options`` are :class:`DriveConfig` fields. The parameters are stored in the manifest's
    ``extra["synthetic"]`` (see :func:`ensure_synthetic_shards`). The set is built in a temporary
    folder beside ``out`` and moved in when complete, replacing an earlier synthetic set there;
    ``out`` holding other shards is an error. ``workers`` > 1 renders and encodes in processes.
    ``progress`` shows a bar on stderr (videos written, their rate and the time left).
    """
    from tqdm.auto import tqdm

    from vdiff.data.shards import ShardWriter

    _check_write_args(num_videos, size, seed, first_index, max_count, workers)
    config = asdict(DriveConfig(size=size, num_frames=num_frames, fps=fps, **options).validate())
    params = synthetic_params(num_videos, num_frames, size, seed, fps, crf, first_index, **options)
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tasks = [(config, seed, first_index + i, params["crf"]) for i in range(num_videos)]
    bar = tqdm(total=num_videos, desc=f"writing synthetic videos to {out}", unit="video", disable=not progress)
    try:
        with ShardWriter(tmp, prefix="synth", max_count=max_count, extra={"synthetic": params}) as writer:
            if workers == 1:
                results = map(_render_sample, tasks)
                for key, mp4, meta in results:
                    writer.write_video(key, mp4, meta)
                    bar.update()
            else:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    chunk = max(1, min(16, num_videos // (4 * workers)))
                    for key, mp4, meta in pool.map(_render_sample, tasks, chunksize=chunk):
                        writer.write_video(key, mp4, meta)
                        bar.update()
        manifest = writer.close()
        _replace_folder_contents(tmp, out)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def ensure_synthetic_shards(
    out: str | Path,
    num_videos: int,
    num_frames: int,
    size: int,
    seed: int,
    fps: float = 10.0,
    max_count: int = 64,
    crf: int | None = None,
    workers: int = 1,
    first_index: int = 0,
    progress: bool = False,
    **options: Any,
) -> Manifest:
    """:func:`write_synthetic_shards` unless ``out`` already holds a complete set with the same
    parameters (then it only reads the manifest), so a quickstart can call it on every run."""
    params = synthetic_params(num_videos, num_frames, size, seed, fps, crf, first_index, **options)
    manifest = complete_manifest(out, params)
    if manifest is not None:
        return manifest
    return write_synthetic_shards(out, num_videos, num_frames, size, seed, fps, max_count, crf, workers,
                                  first_index, progress, **options)


def ensure_synthetic_splits(
    out: str | Path,
    num_videos: int,
    num_frames: int,
    size: int,
    seed: int,
    val_videos: int = 0,
    **kwargs: Any,
) -> dict[str, Manifest]:
    """``out/train`` (videos ``(seed, i)``) and, when ``val_videos`` > 0, ``out/val`` (videos
    ``(seed, VAL_FIRST_INDEX + i)``): the layout ``vdiff data synth`` writes. ``kwargs`` go to
    :func:`ensure_synthetic_shards`. Returns ``{"train": manifest, "val": manifest}``."""
    if "first_index" in kwargs:
        raise TypeError("ensure_synthetic_splits chooses first_index itself (train 0, val VAL_FIRST_INDEX)")
    if val_videos < 0:
        raise ValueError(f"val_videos must be >= 0, got {val_videos}")
    out = Path(out)
    splits = {"train": ensure_synthetic_shards(out / "train", num_videos, num_frames, size, seed, **kwargs)}
    if val_videos:
        splits["val"] = ensure_synthetic_shards(out / "val", val_videos, num_frames, size, seed,
                                                first_index=VAL_FIRST_INDEX, **kwargs)
    return splits


# ----------------------------------------------------------------------------------------------
# Command line: vdiff data synth
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vdiff data synth``."""
    parser.add_argument("--out", required=True, help="output folder; shards go to OUT/train (and OUT/val)")
    parser.add_argument("--num-videos", type=int, default=256, help="training videos (default 256)")
    parser.add_argument("--frames", type=int, default=24, help="frames per video (default 24)")
    add_size_argument(parser, 64, "frame size, a square with an even side (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="video i uses seed (SEED, i) (default 0)")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate (default 10)")
    parser.add_argument("--shard-size", type=int, default=64, help="videos per shard (default 64)")
    parser.add_argument("--val-videos", type=int, default=0,
                        help=f"validation videos in OUT/val, seeds (SEED, {VAL_FIRST_INDEX} + i) (default 0)")
    parser.add_argument("--crf", type=int, default=None, help="libx264 CRF (default: video_io.DEFAULT_CRF)")
    parser.add_argument("--workers", type=int, default=1, help="render/encode processes (default 1)")
    parser.add_argument("--force", action="store_true", help="rewrite even if OUT already holds the same set")


def run(args: argparse.Namespace) -> int:
    """Run ``vdiff data synth``: write (or reuse) the shard sets and print a short summary."""
    height, width = args.size
    if height != width:
        raise ValueError(f"vdiff data synth renders square frames: give one number, --size N (got {height} {width})")
    args.size = height
    start = time.perf_counter()
    kwargs = dict(fps=args.fps, max_count=args.shard_size, crf=args.crf, workers=args.workers, progress=True)
    out = Path(args.out)
    if args.force:
        splits = {"train": write_synthetic_shards(out / "train", args.num_videos, args.frames, args.size,
                                                  args.seed, **kwargs)}
        if args.val_videos:
            splits["val"] = write_synthetic_shards(out / "val", args.val_videos, args.frames, args.size, args.seed,
                                                   first_index=VAL_FIRST_INDEX, **kwargs)
    else:
        splits = ensure_synthetic_splits(out, args.num_videos, args.frames, args.size, args.seed,
                                         val_videos=args.val_videos, **kwargs)
    seconds = time.perf_counter() - start
    for name, manifest in splits.items():
        print(f"{out / name}: {manifest.num_samples} videos, {manifest.num_frames} frames "
              f"({args.size}x{args.size} at {args.fps:g} fps) in {len(manifest.shards)} shard(s)")
    print(f"done in {seconds:.1f} s")
    return 0
