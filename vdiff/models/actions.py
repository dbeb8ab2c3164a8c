"""Vista's action conditioning: a batch's per-frame actions -> one feature vector per clip.

The batch holds every action of :data:`vdiff.data.schema.ACTION_SHAPES` per frame, ``(B, T, *shape)``, with a bool
``<key>_valid`` ``(B, T)`` beside it (``vdiff.data.batch``; SI units, + = left). Vista (OpenDriveLab/Vista) conditions
on 19 scalars per clip, each turned into a 128-d sinusoid (its ``ConcatTimestepEmbedderND(outdim=128)``: ``[cos, sin]``
of the scalar times ``exp(-ln(10000) * i / 64)``, ``i < 64``), concatenated in its conditioner's order into a
``19 * 128 = 2432``-d vector, which every cross-attention of the UNet reads (``UNetSVDConfig.action_dim``,
``cond["actions"]``). The layout of :meth:`ActionEncoder.forward`'s ``(B, 2432)`` output:

===============  =======  ==========  ==============================================================================
type             scalars  features    values (frame ``r`` = ``reference_frame``, 0: the conditioning frame)
===============  =======  ==========  ==============================================================================
``command``      1        0:128       ``command[:, r]`` (0 left, 1 straight, 2 right, 3 stop), as a number
``trajectory``   8        128:1152    ``trajectory[:, r]`` (4 waypoints at +0.5 s steps, metres, x forward, y left),
                                      flattened ``x1, y1, x2, y2, ...``
``speed``        4        1152:1664   ``speed`` (m/s) at the 4 frames ``future_seconds`` after frame ``r``
``steering``     4        1664:2176   ``steering`` (steering-wheel degrees, + = left) at the same frames, ``/ 780``
``goal``         2        2176:2432   ``goal[:, r]`` (normalised image coordinates x, y in [0, 1])
===============  =======  ==========  ==============================================================================

Where the values and constants come from (Vista's ``vwm/data/subsets/nuscenes.py``, ``sample.py`` and its training
configs; its nuScenes annotations are sampled at the 2 Hz key frames):

- ``command``: the clip's command as is (``cmd``), no normalisation.
- ``trajectory``: ``traj[2:]``, the 4 future waypoints after the current position, no normalisation (metres). vdiff's
  ego frame is x forward, y left; Vista's annotation script is not in its repository, so the axis convention of a
  Vista checkpoint's trajectories is not checked here.
- ``speed`` / ``steering``: ``speed[1:]`` and ``angle[1:] / 780``: the 4 values after the current one at the key
  frames, i.e. +0.5, +1.0, +1.5, +2.0 s (``future_seconds``; with the clip's fps, frames ``round(s * fps)`` after
  ``r``: 5, 10, 15, 20 at Vista's 10 Hz). The steering divisor 780 is Vista's (its CAN-bus angle). Vista does not
  scale speed; its annotation's speed unit is not stated in its repository (nuScenes' CAN ``vehicle_monitor``
  reports km/h): ``speed_scale`` multiplies vdiff's m/s (1.0: m/s as is; 3.6 gives km/h).
- ``goal``: Vista divides nuScenes pixel coordinates by 1600 and 900 (the image size); vdiff's goal is already
  normalised by the image size, so ``goal_scale`` is 1.
- Vista's training conditioner lists command, trajectory, speed, angle, goal in that order: the layout above.

Missing or invalid actions are ZEROS (Vista feeds zeros for an absent action and for a dropped one; the sinusoid of
the value 0 is not zeros). A type is valid for a clip when every value it reads is valid (``<key>_valid``) and
finite, and, for speed and steering, when the 4 future frames lie inside the clip; a key missing from the dict is
invalid for every clip. All zeros is the unconditional vector.

Training helpers: :func:`keep_one_action_type` keeps one randomly chosen valid action type per clip (Vista trains
on one action mode per sample: trajectory, command, speed + steering together, or goal; :data:`ACTION_GROUPS`), and
:func:`drop_actions` drops each type per clip with its own probability for classifier-free guidance (Vista: 0.15 for
every action). Both work on the per-type validity that :meth:`ActionEncoder.values` returns, so
``encoder.embed(values, drop_actions(keep_one_action_type(valid, g), 0.15, g))`` is a training vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from vdiff.nn.embeddings import timestep_embedding

ACTION_TYPES: tuple[str, ...] = ("command", "trajectory", "speed", "steering", "goal")  # the feature order
ACTION_SCALARS: dict[str, int] = {"command": 1, "trajectory": 8, "speed": 4, "steering": 4, "goal": 2}  # 19
# Vista's action modes: one per training sample (speed and steering together, as its "steer" mode).
ACTION_GROUPS: tuple[tuple[str, ...], ...] = (("trajectory",), ("command",), ("speed", "steering"), ("goal",))
VISTA_EMBED_DIM = 128  # sinusoid width per scalar (Vista's outdim)
VISTA_STEERING_DIVISOR = 780.0  # Vista: angle / 780
VISTA_FUTURE_SECONDS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # speed/steering instants: nuScenes' 2 Hz key frames
VISTA_FPS = 10.0  # Vista's clips: 25 frames at 10 Hz
VISTA_CFG_DROP = 0.15  # Vista's ucg_rate of every action
VISTA_ACTION_DIM = sum(ACTION_SCALARS.values()) * VISTA_EMBED_DIM  # 2432


def valid_key(action: str) -> str:
    """Name of the validity mask of an action in a batch's ``actions`` dict: ``valid_key("speed") ==
    "speed_valid"`` (the batch contract, :mod:`vdiff.data.batch`, re-exports it: data sits above models)."""
    return f"{action}_valid"


class ActionEncoder(nn.Module):
    """The batch's action dict -> per-clip action features ``(B, action_dim)`` (module docstring for the layout,
    constants and their sources). No parameters: the features are fixed sinusoids.

    Args:
        embed_dim: sinusoid width per scalar (Vista: 128); ``action_dim = 19 * embed_dim``.
        max_period: the sinusoid's longest period (Vista: 10000).
        reference_frame: the frame whose command, trajectory and goal are read, and after which speed and steering
            are read (0: the conditioning frame; negative counts from the end).
        future_seconds: when speed and steering are read, in seconds after the reference frame (4 values).
        default_fps: the frame rate used when ``forward``/``values`` get no ``fps`` (Vista's 10 Hz).
        speed_scale, steering_scale, trajectory_scale, goal_scale, command_scale: multipliers of the raw values
            (Vista: 1, 1/780, 1, 1 for vdiff's normalised goal, 1).
    """

    def __init__(
        self,
        embed_dim: int = VISTA_EMBED_DIM,
        max_period: float = 10000.0,
        reference_frame: int = 0,
        future_seconds: Sequence[float] = VISTA_FUTURE_SECONDS,
        default_fps: float = VISTA_FPS,
        speed_scale: float = 1.0,
        steering_scale: float = 1.0 / VISTA_STEERING_DIVISOR,
        trajectory_scale: float = 1.0,
        goal_scale: float = 1.0,
        command_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"ActionEncoder: embed_dim must be even and >= 2, got {embed_dim}")
        if len(future_seconds) != ACTION_SCALARS["speed"] or any(not s > 0 for s in future_seconds):
            raise ValueError(
                f"ActionEncoder: future_seconds must be {ACTION_SCALARS['speed']} positive times, got {future_seconds}"
            )
        if not default_fps > 0:
            raise ValueError(f"ActionEncoder: default_fps must be positive, got {default_fps}")
        self.embed_dim = int(embed_dim)
        self.max_period = float(max_period)
        self.reference_frame = int(reference_frame)
        self.future_seconds = tuple(float(s) for s in future_seconds)
        self.default_fps = float(default_fps)
        self.scales = {
            "command": float(command_scale),
            "trajectory": float(trajectory_scale),
            "speed": float(speed_scale),
            "steering": float(steering_scale),
            "goal": float(goal_scale),
        }

    @property
    def num_scalars(self) -> int:
        return sum(ACTION_SCALARS.values())

    @property
    def action_dim(self) -> int:
        """Width of the features (``UNetSVDConfig.action_dim``): ``19 * embed_dim`` (Vista: 2432)."""
        return self.num_scalars * self.embed_dim

    def slices(self) -> dict[str, slice]:
        """Where each action type's features lie in the ``(B, action_dim)`` vector."""
        out, start = {}, 0
        for name in ACTION_TYPES:
            stop = start + ACTION_SCALARS[name] * self.embed_dim
            out[name] = slice(start, stop)
            start = stop
        return out

    def values(
        self, actions: Mapping[str, Tensor], fps: Tensor | float | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The normalised scalars of every type, ``{type: (B, n)}`` float32, and whether each type is valid per clip,
        ``{type: (B,)}`` bool (invalid types' scalars are zeros).

        actions: the batch's action dict (``(B, T, *shape)`` values and ``(B, T)`` ``<key>_valid``; absent keys are
        invalid); fps: the clips' frame rate ``(B,)`` or one number (None: ``default_fps``)."""
        present = [key for key in ACTION_TYPES if key in actions]
        if not present:
            raise ValueError(
                f"ActionEncoder: the action dict holds none of {list(ACTION_TYPES)} (keys: {sorted(actions)})"
            )
        for key in present:
            if valid_key(key) not in actions:
                raise KeyError(f"ActionEncoder: actions[{key!r}] has no {valid_key(key)!r} beside it")
        first = actions[present[0]]
        B, T, device = first.shape[0], first.shape[1], first.device
        r = self.reference_frame + T if self.reference_frame < 0 else self.reference_frame
        if not 0 <= r < T:
            raise ValueError(f"ActionEncoder: reference_frame={self.reference_frame} is outside a clip of {T} frames")
        rows = torch.arange(B, device=device)

        def checked(key: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
            value, valid = actions[key], actions[valid_key(key)]
            if tuple(value.shape) != (B, T, *shape) or tuple(valid.shape) != (B, T):
                raise ValueError(
                    f"ActionEncoder: actions[{key!r}] must be ({B}, {T}{''.join(f', {s}' for s in shape)}) with "
                    f"{valid_key(key)!r} ({B}, {T}), got {tuple(value.shape)} and {tuple(valid.shape)}"
                )
            return value.float(), valid.bool()

        scalars: dict[str, Tensor] = {}
        valid: dict[str, Tensor] = {}
        for key in ACTION_TYPES:
            n = ACTION_SCALARS[key]
            if key not in actions:
                scalars[key] = torch.zeros(B, n, device=device)
                valid[key] = torch.zeros(B, dtype=torch.bool, device=device)
                continue
            if key in ("speed", "steering"):
                value, ok = checked(key, ())  # (B, T)
                index = self._future_frames(fps, r, B, device)  # (B, 4) long, may run past the clip
                inside = (index < T).all(dim=1)  # (B,)
                index = index.clamp(max=T - 1)
                picked = value[rows[:, None], index]  # (B, 4)
                ok = ok[rows[:, None], index].all(dim=1) & inside  # (B,)
            else:
                shape = {"command": (), "trajectory": (4, 2), "goal": (2,)}[key]
                value, ok = checked(key, shape)
                picked = value[:, r].reshape(B, n)  # (B, n)
                ok = ok[:, r]  # (B,)
            ok = ok & torch.isfinite(picked).all(dim=1)
            scaled = picked * self.scales[key]
            scalars[key] = torch.where(ok[:, None], scaled, torch.zeros((), device=device))  # (B, n)
            valid[key] = ok
        return scalars, valid

    def _future_frames(self, fps: Tensor | float | None, r: int, batch: int, device: torch.device) -> Tensor:
        """``(B, 4)`` frame indices ``r + round(s * fps)`` for ``s`` in ``future_seconds``."""
        if fps is None:
            fps = self.default_fps
        fps = torch.as_tensor(fps, dtype=torch.float32, device=device)
        if fps.ndim == 0:
            fps = fps.expand(batch)
        if fps.shape != (batch,) or not bool((fps > 0).all()):
            raise ValueError(f"ActionEncoder: fps must be positive, one number or ({batch},), got {tuple(fps.shape)}")
        seconds = torch.tensor(self.future_seconds, dtype=torch.float32, device=device)  # (4,)
        return r + torch.round(seconds[None] * fps[:, None]).long()  # (B, 4)

    def embed(self, scalars: Mapping[str, Tensor], valid: Mapping[str, Tensor]) -> Tensor:
        """``(B, action_dim)`` float32: each scalar's ``embed_dim``-d sinusoid in the layout order, zeros for the
        types ``valid`` marks false. scalars: ``{type: (B, n)}``; valid: ``{type: (B,)}`` bool."""
        values = torch.cat([scalars[key] for key in ACTION_TYPES], dim=1)  # (B, 19)
        keep = torch.cat(
            [valid[key].bool()[:, None].expand(-1, ACTION_SCALARS[key]) for key in ACTION_TYPES], dim=1
        )  # (B, 19)
        B, n = values.shape
        features = timestep_embedding(values.reshape(B * n), self.embed_dim, self.max_period).view(B, n, -1)
        features = features * keep[..., None].to(features.dtype)  # (B, 19, embed_dim): invalid types -> zeros
        return features.reshape(B, n * self.embed_dim)

    def forward(self, actions: Mapping[str, Tensor], fps: Tensor | float | None = None) -> Tensor:
        """Features ``(B, action_dim)`` of every valid action (sampling; see :meth:`training_features`)."""
        return self.embed(*self.values(actions, fps))

    def training_features(
        self,
        actions: Mapping[str, Tensor],
        fps: Tensor | float | None = None,
        generator: torch.Generator | None = None,
        one_type: bool = True,
        drop: float | Mapping[str, float] = VISTA_CFG_DROP,
    ) -> Tensor:
        """Features for a training batch: one valid action type per clip (:func:`keep_one_action_type`, if
        ``one_type``), then per-type CFG dropout (:func:`drop_actions` with ``drop``). ``(B, action_dim)``."""
        scalars, valid = self.values(actions, fps)
        if one_type:
            valid = keep_one_action_type(valid, generator)
        valid = drop_actions(valid, drop, generator)
        return self.embed(scalars, valid)

    def to_dict(self) -> dict[str, float | int | list[float]]:
        """The constructor arguments (plain numbers and a list): ``ActionEncoder(**encoder.to_dict())`` rebuilds it
        (checkpoints store this)."""
        return dict(embed_dim=self.embed_dim, max_period=self.max_period, reference_frame=self.reference_frame,
                    future_seconds=list(self.future_seconds), default_fps=self.default_fps,
                    **{f"{key}_scale": value for key, value in self.scales.items()})

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, action_dim={self.action_dim}, reference_frame={self.reference_frame}, "
            f"future_seconds={self.future_seconds}, default_fps={self.default_fps}, scales={self.scales}"
        )


def _uniform(batch: int, columns: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``(batch, columns)`` uniforms drawn on the generator's device, moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(batch, columns, generator=generator, device=where).to(device)


def keep_one_action_type(
    valid: Mapping[str, Tensor],
    generator: torch.Generator | None = None,
    groups: Sequence[Sequence[str]] = ACTION_GROUPS,
) -> dict[str, Tensor]:
    """Keep, per clip, one group of action types chosen uniformly among the groups with a valid type, and mark the
    other types invalid (Vista trains on one action mode per sample). valid: ``{type: (B,)}`` bool (as
    :meth:`ActionEncoder.values` gives); groups: the modes (default :data:`ACTION_GROUPS`: trajectory, command,
    speed + steering, goal), each type in one group at most (types in none are always dropped). A clip without a
    valid type keeps nothing. Seeded by ``generator`` (one ``(B, len(groups))`` uniform draw). Returns a new dict."""
    seen = [key for group in groups for key in group]
    if len(seen) != len(set(seen)) or not set(seen) <= set(valid):
        raise ValueError(f"keep_one_action_type: groups {groups} must name distinct types of {sorted(valid)}")
    first = next(iter(valid.values()))
    B, device = first.shape[0], first.device
    group_valid = torch.stack(
        [torch.stack([valid[key].bool() for key in group]).any(dim=0) for group in groups], dim=1
    )  # (B, G)
    scores = torch.where(group_valid, _uniform(B, len(groups), generator, device), -1.0)  # (B, G)
    chosen = scores.argmax(dim=1)  # (B,): uniform among the valid groups
    out = {key: torch.zeros_like(v, dtype=torch.bool) for key, v in valid.items()}
    for g, group in enumerate(groups):
        keep = (chosen == g) & group_valid[:, g]
        for key in group:
            out[key] = valid[key].bool() & keep
    return out


def drop_actions(
    valid: Mapping[str, Tensor],
    p: float | Mapping[str, float] = VISTA_CFG_DROP,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-action classifier-free-guidance dropout: each type is dropped (marked invalid, so its features are zeros)
    per clip with probability ``p`` (one number, or ``{type: p}``; types absent from the mapping are never dropped),
    independently (Vista: 0.15 for each). valid: ``{type: (B,)}`` bool. Returns a new dict."""
    probs = {key: float(p.get(key, 0.0)) if isinstance(p, Mapping) else float(p) for key in valid}
    if isinstance(p, Mapping) and set(p) - set(valid):
        raise KeyError(f"drop_actions: p names {sorted(set(p) - set(valid))}, not among {sorted(valid)}")
    if any(not 0.0 <= q <= 1.0 for q in probs.values()):
        raise ValueError(f"drop_actions: probabilities must be in [0, 1], got {probs}")
    keys = list(valid)
    first = valid[keys[0]]
    u = _uniform(first.shape[0], len(keys), generator, first.device)  # (B, K)
    return {key: valid[key].bool() & (u[:, i] >= probs[key]) for i, key in enumerate(keys)}
