"""Per-sample transforms of video clips and their actions: resize/crop planning, goal points that
follow the crop, horizontal flip with mirrored actions, per-frame action arrays, and collation.

Conventions (docs/architecture.md, "Actions"): ``goal`` is a point in the image in normalised pixel
coordinates ``(x, y)``, 0 at the left/top edge and 1 at the right/bottom edge. Resizing keeps
normalised coordinates; cropping moves them: ``x_out = (x * W_resized - left) / W_out``. **A goal
that falls outside the crop is marked invalid** (and zeroed, like every invalid action entry), so
the model treats it as unconditional instead of being steered to a clamped, wrong point.

Flipping mirrors the scene left-right, so every left/right quantity changes sign: ``steering`` and
``yaw_rate`` negate, trajectory ``y`` (left) negates, goal ``x`` becomes ``1 - x``, and the commands
left (0) and right (2) swap. Speed, trajectory ``x`` and goal ``y`` stay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vdiff.data import batch as B
from vdiff.data.schema import ACTION_SHAPES, COMMANDS, action_values

_LEFT, _RIGHT = COMMANDS["left"], COMMANDS["right"]


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def cover_size(source_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-preserving resize of ``source_hw`` that covers ``out_hw`` (both (H, W)).

    For a square output this resizes the short side to the output size.
    """
    (h, w), (out_h, out_w) = source_hw, out_hw
    scale = max(out_h / h, out_w / w)
    return max(out_h, int(round(h * scale))), max(out_w, int(round(w * scale)))


@dataclass(frozen=True)
class CropPlan:
    """Where a clip's output comes from: decode at ``frame_hw`` (H, W), take the ``out_hw`` window at
    (``top``, ``left``), then mirror if ``flip``."""

    frame_hw: tuple[int, int]
    top: int
    left: int
    out_hw: tuple[int, int]
    flip: bool = False


def plan_crop(
    frame_hw: tuple[int, int],
    out_hw: tuple[int, int],
    mode: str,
    generator: np.random.Generator | None = None,
    flip: bool = False,
) -> CropPlan:
    """Plan an ``out_hw`` crop of frames of ``frame_hw``: ``"center"`` or ``"random"`` (uniform offsets
    drawn from ``generator``). Raises ValueError if the frame is smaller than the crop."""
    (h, w), (out_h, out_w) = frame_hw, out_hw
    if h < out_h or w < out_w:
        raise ValueError(f"frames of {h}x{w} are smaller than the crop {out_h}x{out_w} (H x W)")
    if mode == "center":
        top, left = (h - out_h) // 2, (w - out_w) // 2
    elif mode == "random":
        if generator is None:
            raise ValueError("a random crop needs a generator")
        top = int(generator.integers(h - out_h + 1))
        left = int(generator.integers(w - out_w + 1))
    else:
        raise ValueError(f"crop must be 'random' or 'center', got {mode!r}")
    return CropPlan(frame_hw=(h, w), top=top, left=left, out_hw=(out_h, out_w), flip=flip)


def crop_frames(frames: np.ndarray, plan: CropPlan) -> np.ndarray:
    """The crop window of ``(T, H, W, 3)`` frames, as a view (the flip is applied at collation)."""
    out_h, out_w = plan.out_hw
    return frames[:, plan.top : plan.top + out_h, plan.left : plan.left + out_w]


def move_goal(goal: np.ndarray, valid: np.ndarray, plan: CropPlan) -> tuple[np.ndarray, np.ndarray]:
    """Map ``(T, 2)`` normalised goal points of the source frame into the output frame of ``plan``.

    Points outside the crop become invalid (and zero). Returns new ``(goal, valid)`` arrays.
    """
    (h, w), (out_h, out_w) = plan.frame_hw, plan.out_hw
    x = (goal[:, 0] * w - plan.left) / out_w
    y = (goal[:, 1] * h - plan.top) / out_h
    if plan.flip:
        x = 1.0 - x
    inside = valid & (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    moved = np.stack([x, y], axis=-1).astype(np.float32)
    moved[~inside] = 0.0
    return moved, inside


# ----------------------------------------------------------------------------------------------
# Actions
# ----------------------------------------------------------------------------------------------


def clip_actions(actions: Mapping[str, Sequence[Any]], indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-frame action arrays of a clip from a sample's json actions (``VideoMeta.actions``).

    Returns, for every key of :data:`ACTION_SHAPES`, ``(T, *shape)`` float32 (``command`` int64) and
    ``<key>_valid`` ``(T,)`` bool. A missing key, a ``null`` entry or a non-finite value is invalid
    (zero). Raises SchemaError naming the action and frame for an entry :func:`vdiff.data.schema.action_values`
    refuses (wrong shape or type, beyond float32's range, a command not one of 0..3).
    """
    num = len(indices)
    out: dict[str, np.ndarray] = {}
    for key, shape in ACTION_SHAPES.items():
        dtype = np.int64 if key == "command" else np.float32
        values = np.zeros((num, *shape), dtype=dtype)
        valid = np.zeros(num, dtype=bool)
        per_frame = actions.get(key)
        if per_frame is not None:
            known_values, valid = action_values(key, [per_frame[i] for i in indices], indices)
            values[:] = known_values
        out[key] = values
        out[B.valid_key(key)] = valid
    return out


def flip_actions(actions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirror left/right in clip actions (in place and returned); ``goal`` is handled by :func:`move_goal`."""
    actions["steering"] = -actions["steering"]
    actions["yaw_rate"] = -actions["yaw_rate"]
    trajectory = actions["trajectory"].copy()
    trajectory[..., 1] = -trajectory[..., 1]
    actions["trajectory"] = trajectory
    command = actions["command"].copy()
    command[actions["command"] == _LEFT] = _RIGHT
    command[actions["command"] == _RIGHT] = _LEFT
    actions["command"] = command
    return actions


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 video in [0, 255] to contiguous float32 in [-1, 1] (any shape); float input is returned as is."""
    if video.dtype != torch.uint8:
        return video
    return video.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0).contiguous()


def motion_scores(samples: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``(B,)`` float32 ``motion_score`` of clip items (NaN where an item has none)."""
    return torch.tensor([float(s.get("motion_score", math.nan)) for s in samples], dtype=torch.float32)


def collate_clips(samples: Sequence[dict[str, Any]], normalize: bool = True) -> dict[str, Any]:
    """Stack decoded clips into a batch following :mod:`vdiff.data.batch`.

    Each sample holds ``video`` ``(T, H, W, 3)`` uint8 (a view; its crop plan's flip not yet
    applied), ``flip``, ``fps``, ``motion_score`` (NaN when absent), ``frame_indices``, ``key``,
    ``source`` and ``actions``. The frames
    are copied once, channels last (a plain copy, several times faster than transposing), and the
    batch's ``video`` is a ``(B, T, 3, H, W)`` view of them. With ``normalize`` it becomes contiguous
    float in [-1, 1] here; otherwise it stays uint8 for :func:`normalize_video` after the transfer
    to the device, where the transposition is cheap.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    t, h, w, c = samples[0]["video"].shape
    # numpy copies here: torch's intra-op threads made this copy 20x slower on busy CPUs.
    stacked = np.empty((len(samples), t, h, w, c), dtype=np.uint8)
    for row, sample in enumerate(samples):
        frames = sample["video"]  # (T, H, W, 3), a view of the decoded crop
        stacked[row] = frames[:, :, ::-1] if sample["flip"] else frames
    video = torch.from_numpy(stacked).permute(0, 1, 4, 2, 3)  # (B, T, 3, H, W), channels-last strides
    batch: dict[str, Any] = {
        B.VIDEO: normalize_video(video) if normalize else video,
        B.FPS: torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        B.MOTION_SCORE: motion_scores(samples),
        B.FRAME_INDICES: torch.tensor(np.stack([s["frame_indices"] for s in samples]), dtype=torch.long),
        B.KEY: [s["key"] for s in samples],
        B.SOURCE: [s["source"] for s in samples],
        B.ACTIONS: {
            name: torch.from_numpy(np.stack([s["actions"][name] for s in samples])) for name in samples[0]["actions"]
        },
    }
    return batch
