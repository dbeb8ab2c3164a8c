"""``vdiff data nuscenes ROOT --version v1.0-trainval --out DIR``: CAM_FRONT at 10 Hz with actions.

Input (the nuScenes download unpacked into ROOT, CAN bus expansion in ``ROOT/can_bus``)::

    ROOT/v1.0-trainval/{scene,sample,sample_data,ego_pose,calibrated_sensor,log}.json
    ROOT/samples/CAM_FRONT/*.jpg   (keyframes, 2 Hz)
    ROOT/sweeps/CAM_FRONT/*.jpg    (the other frames; together about 12 Hz)
    ROOT/can_bus/scene-0001_steeranglefeedback.json, scene-0001_vehicle_monitor.json, ...

Per scene, the CAM_FRONT frames (keyframes and sweeps, found by the ``CAM_FRONT`` folder in their
``filename``) are ordered by timestamp and resampled to 10 Hz as Vista does: output frame ``k`` is
the frame nearest to ``k / 10`` s after the first. One sample per scene (about 200 frames) or clips of
``clip_frames``. Output: ``DIR/<split>/`` shards per official split
(:mod:`~vdiff.data.convert.nuscenes_splits`); ``source = "nuscenes"``, ``fps = 10``.

Actions per frame (docs/architecture.md, "Actions"; math in :mod:`~vdiff.data.convert.ego`), all from the ego poses of
the camera frames (``ego_pose`` at each image's timestamp) except steering:

* ``speed`` m/s (forward component), ``yaw_rate`` rad/s (+ = left);
* ``trajectory``: the next 4 positions at +0.5 s steps in the ego frame (x forward, y left); invalid
  for the last 2 s of a scene;
* ``command`` from that trajectory (thresholds in :mod:`~vdiff.data.convert.ego`);
* ``goal``: the ego position 2 s ahead, on the ground (ego z = 0), projected into the frame with
  the camera's ``calibrated_sensor`` intrinsics and extrinsics, as ``(u / W, v / H)`` of the output
  frame (a crop moves it; outside the crop or behind the camera is invalid);
* ``steering`` in steering-wheel degrees, + = left, from the CAN bus ``steeranglefeedback``
  messages (``value``, radians, + = left turn, 100 Hz; devkit ``docs/can_bus.md``), interpolated at
  each frame; when a scene has only ``vehicle_monitor`` (``steering``, degrees, 2 Hz) that is used.
  Never invented: frames outside the CAN messages' time span are ``null``.

A scene without CAN bus data (no steeranglefeedback nor vehicle_monitor file; the devkit lists 21
such scenes) or with a missing or unreadable CAM_FRONT image is reported and skipped, as the issue
asks; ``allow_missing_can_bus=True`` keeps such scenes with steering absent instead. A scene whose CAN bus file
is malformed (not json, not a list of messages, a value that is not a finite number) is reported as
``bad_can_bus``, and a clip whose metadata breaks the schema (e.g. a value beyond float32) as ``bad_metadata``;
the other scenes are converted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vdiff.data.convert import DatasetReport, parallel_map
from vdiff.data.convert.ego import (
    PoseTrack,
    command_from_trajectory,
    crop_goal,
    future_waypoints,
    project_to_image,
    speed_and_yaw_rate,
    yaw_from_quaternion,
)
from vdiff.data.convert.frames import RESIZE_MODES, crop_box, read_image, resize_image
from vdiff.data.convert.nuscenes_splits import default_splits, scenes_in_split
from vdiff.data.frame_size import add_size_argument
from vdiff.data.schema import SchemaError, VideoMeta, parse_json
from vdiff.data.shards import ShardWriter
from vdiff.data.video_io import DEFAULT_CRF, encode_video

NUSCENES_FPS = 10.0
CAMERA = "CAM_FRONT"
TABLES = ("scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "log")
GOAL_HORIZON_STEPS = 4  # the goal is the last trajectory waypoint: 2 s ahead


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def load_table(root: Path, version: str, name: str) -> list[dict[str, Any]]:
    path = root / version / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"nuScenes table {path} is missing (ROOT/{version}/{name}.json)")
    try:
        data = parse_json(path.read_bytes(), f"nuScenes table {path}")
    except SchemaError as err:
        raise ValueError(str(err)) from None
    if not isinstance(data, list):
        raise ValueError(f"nuScenes table {path} must be a json list of records")
    return data


def _need(record: dict, field: str, table: str) -> Any:
    if field not in record:
        raise ValueError(f"nuScenes table {table}: record {record.get('token', '?')} has no field {field!r}")
    return record[field]


def scene_frames(root: Path, version: str, camera: str = CAMERA) -> tuple[list[dict], dict[str, list[dict]], dict[str, dict]]:
    """Scenes, the camera's frames of each scene (sorted by time, with pose and calibration), and logs."""
    scenes = load_table(root, version, "scene")
    sample_scene = {_need(s, "token", "sample"): _need(s, "scene_token", "sample") for s in load_table(root, version, "sample")}
    poses = {_need(p, "token", "ego_pose"): p for p in load_table(root, version, "ego_pose")}
    calibs = {_need(c, "token", "calibrated_sensor"): c for c in load_table(root, version, "calibrated_sensor")}
    logs = {_need(entry, "token", "log"): entry for entry in load_table(root, version, "log")}
    frames: dict[str, list[dict]] = defaultdict(list)
    for record in load_table(root, version, "sample_data"):
        filename = _need(record, "filename", "sample_data")
        parts = filename.split("/")
        if len(parts) < 3 or parts[1] != camera or parts[0] not in ("samples", "sweeps"):
            continue
        scene_token = sample_scene.get(_need(record, "sample_token", "sample_data"))
        if scene_token is None:
            raise ValueError(f"sample_data {record['token']}: sample {record['sample_token']} is not in sample.json")
        pose = poses.get(_need(record, "ego_pose_token", "sample_data"))
        calib = calibs.get(_need(record, "calibrated_sensor_token", "sample_data"))
        if pose is None or calib is None:
            raise ValueError(f"sample_data {record['token']}: its ego_pose or calibrated_sensor record is missing")
        frames[scene_token].append(
            {
                "filename": filename,
                "timestamp": int(_need(record, "timestamp", "sample_data")),
                "width": int(record.get("width") or 0),
                "height": int(record.get("height") or 0),
                "is_key_frame": bool(record.get("is_key_frame", False)),
                "translation": _need(pose, "translation", "ego_pose"),
                "rotation": _need(pose, "rotation", "ego_pose"),
                "cam_translation": _need(calib, "translation", "calibrated_sensor"),
                "cam_rotation": _need(calib, "rotation", "calibrated_sensor"),
                "intrinsic": _need(calib, "camera_intrinsic", "calibrated_sensor"),
            }
        )
    for items in frames.values():
        items.sort(key=lambda f: f["timestamp"])
    return scenes, frames, logs


# ----------------------------------------------------------------------------------------------
# CAN bus
# ----------------------------------------------------------------------------------------------


def load_steering(can_dir: Path, scene_name: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``(utime µs, steering-wheel degrees + = left, message name)`` for a scene, or None without CAN data."""
    feedback = can_dir / f"{scene_name}_steeranglefeedback.json"
    monitor = can_dir / f"{scene_name}_vehicle_monitor.json"
    for path, field_name, to_degrees in ((feedback, "value", math.degrees), (monitor, "steering", float)):
        if not path.is_file():
            continue
        try:
            messages = parse_json(path.read_bytes(), "the file")
            utime = np.array([int(m["utime"]) for m in messages], dtype=np.int64)
            value = np.array([to_degrees(float(m[field_name])) for m in messages], dtype=np.float64)
        except (SchemaError, KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"CAN bus file {path}: expected a list of {{utime, {field_name}}} messages ({err})") from None
        if not np.isfinite(value).all():
            raise ValueError(f"CAN bus file {path}: a {field_name!r} is not a finite number")
        if len(utime) == 0:
            continue
        order = np.argsort(utime)
        return utime[order], value[order], path.name.removeprefix(scene_name + "_").removesuffix(".json")
    return None


# ----------------------------------------------------------------------------------------------
# One scene
# ----------------------------------------------------------------------------------------------


def resample_indices(times: np.ndarray, fps: float) -> np.ndarray:
    """Index of the frame nearest to each output time ``k / fps`` (k = 0.. while within the scene)."""
    duration = times[-1] - times[0]
    count = int(math.floor(duration * fps + 1e-6)) + 1
    targets = times[0] + np.arange(count) / fps
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    left = right - 1
    nearer_left = (targets - times[left]) < (times[right] - targets)
    return np.where(nearer_left, left, right)


def scene_actions(
    frames: list[dict], chosen: np.ndarray, steering: tuple[np.ndarray, np.ndarray, str] | None, crop: tuple[float, float, float, float] | None
) -> dict[str, list[Any]]:
    """Per-frame actions of the chosen frames (see the module docstring)."""
    times = np.array([f["timestamp"] for f in frames], dtype=np.float64) / 1e6
    xy = np.array([f["translation"][:2] for f in frames], dtype=np.float64)
    yaw = yaw_from_quaternion(np.array([f["rotation"] for f in frames], dtype=np.float64))
    track = PoseTrack(times, xy, yaw)
    query = times[chosen]
    speed, yaw_rate, motion_valid = speed_and_yaw_rate(track, query)
    trajectory, traj_valid = future_waypoints(track, query)
    commands, goals = [], []
    for i, index in enumerate(chosen):
        if not traj_valid[i]:
            commands.append(None)
            goals.append(None)
            continue
        commands.append(command_from_trajectory(trajectory[i]))
        frame = frames[index]
        point = np.array([[*trajectory[i, GOAL_HORIZON_STEPS - 1], 0.0]])
        uv, ok = project_to_image(
            point, frame["cam_translation"], frame["cam_rotation"], np.array(frame["intrinsic"]), frame["width"], frame["height"]
        )
        if crop is not None:
            uv, ok = crop_goal(uv, ok, crop)
        goals.append([round(float(uv[0, 0]), 5), round(float(uv[0, 1]), 5)] if ok[0] else None)
    actions: dict[str, list[Any]] = {
        "speed": [round(float(v), 4) if ok else None for v, ok in zip(speed, motion_valid)],
        "yaw_rate": [round(float(v), 5) if ok else None for v, ok in zip(yaw_rate, motion_valid)],
        "trajectory": [np.round(t, 4).tolist() if ok else None for t, ok in zip(trajectory, traj_valid)],
        "command": commands,
        "goal": goals,
    }
    if steering is not None:
        utime, degrees, _ = steering
        stamps = np.array([frames[i]["timestamp"] for i in chosen], dtype=np.float64)
        inside = (stamps >= utime[0]) & (stamps <= utime[-1])
        values = np.interp(stamps, utime.astype(np.float64), degrees)
        actions["steering"] = [round(float(v), 3) if ok else None for v, ok in zip(values, inside)]
    return {k: v for k, v in actions.items() if any(x is not None for x in v)}


def _convert_scene(task: dict[str, Any]) -> tuple[str, list[tuple[str, bytes, str]] | None, str]:
    """Worker: one scene -> [(key, mp4, meta json)], or (name, None, error message)."""
    name, frames, root = task["name"], task["frames"], Path(task["root"])
    size, resize, fps = task["size"], task["resize"], task["fps"]
    times = np.array([f["timestamp"] for f in frames], dtype=np.float64) / 1e6
    chosen = resample_indices(times, fps)
    try:
        images = [read_image(root / frames[i]["filename"]) for i in chosen]
    except (ValueError, OSError) as err:
        return name, None, f"unreadable_image: {err}"
    height, width = images[0].shape[:2]
    for frame in frames:  # sample_data width/height can be absent; the image is the truth
        frame["width"] = frame["width"] or width
        frame["height"] = frame["height"] or height
    crop = None
    if size is not None and resize == "crop":
        top, left, h, w = crop_box(height, width, size[0], size[1])
        crop = (top / height, left / width, h / height, w / width)
    video = np.stack([resize_image(img, size, resize) for img in images])
    if video.shape[1] % 2 or video.shape[2] % 2:
        return name, None, f"odd_size: frames are {video.shape[2]}x{video.shape[1]}; give an even --size"
    actions = scene_actions(frames, chosen, task["steering"], crop)
    stamps = [frames[i]["timestamp"] for i in chosen]
    clip_frames = task["clip_frames"] or len(chosen)
    samples = []
    for number, start in enumerate(range(0, len(chosen) - clip_frames + 1, clip_frames)):
        part = slice(start, start + clip_frames)
        key = name if task["clip_frames"] is None else f"{name}-{number:03d}"
        meta = VideoMeta(
            fps=fps,
            width=int(video.shape[2]),
            height=int(video.shape[1]),
            num_frames=clip_frames,
            source="nuscenes",
            actions={k: v[part] for k, v in actions.items() if any(x is not None for x in v[part])},
            extra={
                **task["extra"],
                "first_frame": start,
                "timestamps": stamps[part],
                "key_frames": [bool(frames[i]["is_key_frame"]) for i in chosen[part]],
                "resize": resize,
            },
        )
        samples.append((key, encode_video(video[part], fps, crf=task["crf"]), meta.to_json()))
    return name, samples, ""


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


def convert_nuscenes(
    root: str | Path,
    version: str,
    out: str | Path,
    split: str | Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
    resize: str = "squash",
    fps: float = NUSCENES_FPS,
    clip_frames: int | None = None,
    camera: str = CAMERA,
    can_bus_dir: str | Path | None = None,
    allow_missing_can_bus: bool = False,
    workers: int = 1,
    crf: int = DEFAULT_CRF,
    shard_max_count: int = 1000,
    progress: bool = False,
) -> dict[str, DatasetReport]:
    """Convert the scenes of each split into ``out/<split>/`` shards; returns ``{split: DatasetReport}``.

    ``split``: a split name, several, or None for the version's own (trainval: train and val).
    ``size=None`` keeps the source resolution (1600x900); ``clip_frames=None`` writes one sample per scene.
    ``progress`` shows a bar per split on stderr (scenes converted, the time left).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    splits = list(default_splits(version)) if split is None else ([split] if isinstance(split, str) else list(split))
    members = {s: scenes_in_split(s) for s in splits}
    root = Path(root)
    can_dir = Path(can_bus_dir) if can_bus_dir is not None else root / "can_bus"
    started = time.perf_counter()
    scenes, frames, logs = scene_frames(root, version, camera)
    reports: dict[str, DatasetReport] = {}
    for split_name in splits:
        target = Path(out) / split_name
        report = DatasetReport(out=str(target), split=split_name)
        tasks = []
        for scene in sorted(scenes, key=lambda s: s["name"]):
            name = scene["name"]
            if name not in members[split_name]:
                continue
            items = frames.get(scene["token"], [])
            if len(items) < 2:
                report.failed.append((name, "missing_images", f"fewer than 2 {camera} frames in sample_data"))
                continue
            missing = next((f["filename"] for f in items if not (root / f["filename"]).is_file()), None)
            if missing is not None:
                report.failed.append((name, "missing_images", f"{root / missing} does not exist"))
                continue
            try:
                steering = load_steering(can_dir, name)
            except ValueError as err:  # a malformed CAN bus file: this scene is reported, the others converted
                report.failed.append((name, "bad_can_bus", str(err)))
                continue
            if steering is None and not allow_missing_can_bus:
                report.failed.append((name, "missing_can_bus", f"no {name}_steeranglefeedback.json or _vehicle_monitor.json in {can_dir}"))
                continue
            log = logs.get(scene.get("log_token"), {})
            extra = {
                "scene": name,
                "split": split_name,
                "camera": camera,
                "log": log.get("logfile"),
                "location": log.get("location"),
                "steering_source": None if steering is None else steering[2],
            }
            tasks.append(
                {"name": name, "frames": items, "root": str(root), "size": size, "resize": resize, "fps": fps,
                 "clip_frames": clip_frames, "steering": steering, "extra": extra, "crf": crf}
            )
        manifest_extra = {"converter": "vdiff.data.convert.nuscenes", "version": version, "split": split_name, "camera": camera}
        with ShardWriter(target, max_count=shard_max_count, extra=manifest_extra) as writer:
            bar = f"nuScenes {split_name}" if progress else None
            for name, samples, error in parallel_map(_convert_scene, tasks, workers, progress=bar, unit="scene"):
                if samples is None:
                    reason, _, message = error.partition(": ")
                    report.failed.append((name, reason, message))
                    continue
                if not samples:
                    report.dropped["too_short"] += 1
                for key, mp4, meta in samples:
                    try:  # actions from poses or CAN values beyond the schema (float32) drop this clip only
                        parsed = VideoMeta.from_json(meta)
                        writer.write_video(key, mp4, parsed)
                    except SchemaError as err:
                        report.failed.append((key, "bad_metadata", str(err)))
                        continue
                    report.clips_kept += 1
                    report.frames_kept += parsed.num_frames
        report.seconds = time.perf_counter() - started
        reports[split_name] = report
    return reports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="nuScenes root holding <version>/, samples/, sweeps/ and can_bus/")
    parser.add_argument("--version", default="v1.0-trainval", help="table folder (v1.0-trainval, v1.0-mini, v1.0-test)")
    parser.add_argument("--out", required=True, help="output folder; shards go to OUT/<split>/")
    parser.add_argument("--split", nargs="+", default=None, help="official splits to write (default: those of the version)")
    add_size_argument(parser, None, "output frame size (default: the source's, 900 1600)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="squash", help="squash or centre crop to --size (default squash)")
    parser.add_argument("--fps", type=float, default=NUSCENES_FPS, help="output frame rate (default 10, as Vista)")
    parser.add_argument("--clip-frames", type=int, default=None, help="cut scenes into clips of this many frames (default: one sample per scene)")
    parser.add_argument("--camera", default=CAMERA, help="camera channel (default CAM_FRONT)")
    parser.add_argument("--can-bus", default=None, help="CAN bus expansion folder (default ROOT/can_bus)")
    parser.add_argument("--allow-missing-can-bus", action="store_true", help="keep scenes without CAN bus data (steering invalid) instead of skipping them")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--crf", type=int, default=DEFAULT_CRF, help=f"x264 quality (default {DEFAULT_CRF})")


def run(args: argparse.Namespace) -> int:
    reports = convert_nuscenes(
        args.root,
        args.version,
        args.out,
        split=args.split,
        size=None if args.size is None else tuple(args.size),
        resize=args.resize,
        fps=args.fps,
        clip_frames=args.clip_frames,
        camera=args.camera,
        can_bus_dir=args.can_bus,
        allow_missing_can_bus=args.allow_missing_can_bus,
        workers=args.workers,
        crf=args.crf,
        progress=True,
    )
    for report in reports.values():
        print(report.summary(), file=sys.stdout)
    return 0
