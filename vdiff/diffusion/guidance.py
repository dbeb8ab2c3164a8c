"""Classifier-free guidance (CFG) shared by every sampler, and condition dropout for training it.

A guidance schedule gives one scale per frame, ``(T,)``; :func:`guided_call` runs the network once on
the unconditional and conditional halves stacked along the batch and mixes them as
``u + s[t] * (c - u)``. Samplers of every process (EDM, DDPM/DDIM) call the network only through
:func:`guided_call`, so a schedule plugs into all of them.

Schedules:

- :class:`VanillaCFG`: one scale for every frame.
- :class:`LinearCFG`: SVD's frame-wise schedule, linear from ``min_scale`` at frame 0 (the
  conditioning frame) to ``max_scale`` at the last frame.
- :class:`TriangleCFG`: Vista's variant for multi-round rollouts. Over ``u = linspace(0, 1, T)`` a
  triangle wave of period ``p``, ``w(u) = 2 * |u/p - floor(u/p + 1/2)|``, is mapped to
  ``min_scale + (max_scale - min_scale) * w(u)``. With the default ``p = 1`` the scale is
  ``min_scale`` at the first and the last frame and ``max_scale`` in the middle (a tent); the last
  frames of one round become the given first frames of the next, so they get low guidance too.
  Several periods are fused by ``"max"`` (Vista's default), ``"mean"`` or ``"multiply"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from vdiff.diffusion.common import DenoiserNetwork


@runtime_checkable
class Guidance(Protocol):
    """A per-frame CFG scale schedule."""

    def scale(self, num_frames: int, device: torch.device | None = None) -> Tensor:
        """Return the guidance scale of every frame, ``(num_frames,)`` float32."""
        ...


def _check_num_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"guidance: num_frames must be >= 1, got {num_frames}")


class VanillaCFG:
    """The same CFG scale for every frame (scale 1 is the plain conditional model)."""

    def __init__(self, scale: float) -> None:
        self.value = float(scale)

    def scale(self, num_frames: int, device: torch.device | None = None) -> Tensor:
        _check_num_frames(num_frames)
        return torch.full((num_frames,), self.value, dtype=torch.float32, device=device)

    def __repr__(self) -> str:
        return f"VanillaCFG(scale={self.value})"


class LinearCFG:
    """SVD's frame-wise CFG: ``linspace(min_scale, max_scale, T)``, ``min_scale`` at frame 0.

    SVD uses 1.0 -> 2.5 (14 frames), SVD-XT 1.5 -> 3.0 (25 frames). A one-frame clip gets ``min_scale``.
    """

    def __init__(self, min_scale: float = 1.0, max_scale: float = 2.5) -> None:
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)

    def scale(self, num_frames: int, device: torch.device | None = None) -> Tensor:
        _check_num_frames(num_frames)
        return torch.linspace(self.min_scale, self.max_scale, num_frames, dtype=torch.float32, device=device)

    def __repr__(self) -> str:
        return f"LinearCFG(min_scale={self.min_scale}, max_scale={self.max_scale})"


class TriangleCFG:
    """Vista's triangle-wave CFG for rollouts (see the module docstring for the exact shape).

    period: one period or several (in units of the clip length, ``u`` runs over [0, 1]); several
    waves are fused with ``period_fusing`` ("max", "mean" or "multiply") before mapping to
    ``[min_scale, max_scale]``.
    """

    def __init__(
        self,
        min_scale: float = 1.0,
        max_scale: float = 2.5,
        period: float | Sequence[float] = 1.0,
        period_fusing: Literal["max", "mean", "multiply"] = "max",
    ) -> None:
        periods = [float(period)] if isinstance(period, (int, float)) else [float(p) for p in period]
        if not periods or any(not (p > 0 and math.isfinite(p)) for p in periods):
            raise ValueError(f"TriangleCFG: period must be one or more positive numbers, got {period!r}")
        if period_fusing not in ("max", "mean", "multiply"):
            raise ValueError(f"TriangleCFG: period_fusing must be 'max', 'mean' or 'multiply', got {period_fusing!r}")
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.periods = periods
        self.period_fusing = period_fusing

    @staticmethod
    def triangle_wave(u: Tensor, period: float) -> Tensor:
        """Triangle wave in [0, 1]: 0 at multiples of ``period``, 1 halfway between them."""
        phase = u / period
        return 2.0 * (phase - torch.floor(phase + 0.5)).abs()

    def scale(self, num_frames: int, device: torch.device | None = None) -> Tensor:
        _check_num_frames(num_frames)
        u = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float32, device=device)
        waves = torch.stack([self.triangle_wave(u, p) for p in self.periods])  # (P, T)
        if self.period_fusing == "max":
            wave = waves.amax(dim=0)
        elif self.period_fusing == "mean":
            wave = waves.mean(dim=0)
        else:
            wave = waves.prod(dim=0)
        return self.min_scale + (self.max_scale - self.min_scale) * wave

    def __repr__(self) -> str:
        return (
            f"TriangleCFG(min_scale={self.min_scale}, max_scale={self.max_scale}, "
            f"period={self.periods}, period_fusing={self.period_fusing!r})"
        )


def _stack_conditions(cond: Mapping[str, object], uncond: Mapping[str, object]) -> dict[str, object]:
    """``cat([uncond[k], cond[k]])`` per key; keys only in ``cond`` are shared and duplicated."""
    extra = set(uncond) - set(cond)
    if extra:
        raise KeyError(f"guided_call: uncond has keys {sorted(extra)} that cond lacks; cond has {sorted(cond)}")
    out: dict[str, object] = {}
    for key, c in cond.items():
        u = uncond.get(key, c)
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if u.shape != c.shape:
                raise ValueError(f"guided_call: cond[{key!r}] has shape {tuple(c.shape)} but uncond[{key!r}] has {tuple(u.shape)}")
            out[key] = torch.cat([u, c.to(u.dtype)], dim=0)
        elif isinstance(c, Tensor) or isinstance(u, Tensor):
            raise TypeError(f"guided_call: cond[{key!r}] and uncond[{key!r}] must both be tensors or both be non-tensors")
        else:
            if u != c:
                raise ValueError(f"guided_call: non-tensor condition {key!r} differs between cond ({c!r}) and uncond ({u!r})")
            out[key] = c
    return out


def guided_call(
    net: DenoiserNetwork,
    x: Tensor,
    noise_level: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    given_mask: Tensor | None,
    guidance: Guidance | None,
) -> Tensor:
    """Call ``net`` under classifier-free guidance.

    x: ``(B, T, C, H, W)``; noise_level: ``(B,)``; cond/uncond: condition dicts whose tensors lead with
    the batch dim (a key missing from ``uncond`` is shared by both halves, e.g. fps); given_mask: bool
    broadcastable to ``x`` or None.

    With a guidance schedule and an ``uncond`` dict, the network runs ONCE on the batch
    ``cat([uncond, cond])`` (x, noise_level and given_mask duplicated) and returns
    ``u + s[t] * (c - u)`` with ``s = guidance.scale(T)`` broadcast over ``(B, T, C, H, W)``.
    Otherwise it is a single plain call ``net(x, noise_level, cond, given_mask)``.
    Returns the (guided) network output ``(B, T, C_out, H, W)``.
    """
    if guidance is None or uncond is None:
        return net(x, noise_level, cond, given_mask)
    if x.ndim != 5:
        raise ValueError(f"guided_call: x must be (B, T, C, H, W), got shape {tuple(x.shape)}")
    batch, frames = x.shape[:2]
    if noise_level.shape != (batch,):
        raise ValueError(f"guided_call: noise_level must be (B,) = ({batch},), got {tuple(noise_level.shape)}")
    mask2 = given_mask
    if given_mask is not None and given_mask.ndim == x.ndim and given_mask.shape[0] != 1:
        mask2 = torch.cat([given_mask, given_mask], dim=0)
    out = net(
        torch.cat([x, x], dim=0),
        torch.cat([noise_level, noise_level], dim=0),
        _stack_conditions(cond, uncond),  # type: ignore[arg-type]
        mask2,
    )
    out_uncond, out_cond = out.chunk(2, dim=0)
    scale = guidance.scale(frames, device=out.device).to(out.dtype).view(1, frames, 1, 1, 1)
    return out_uncond + scale * (out_cond - out_uncond)


def drop_conditions(
    cond: dict[str, Tensor],
    p: float | Mapping[str, float],
    generator: torch.Generator | None = None,
    *,
    groups: Sequence[Sequence[str]] = (),
    return_keep: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-sample condition dropout for training classifier-free guidance (dropped = zeros).

    cond: dict of tensors leading with the batch dim ``B``. p: one drop probability for every key, or
    a dict ``{key: p}`` (keys absent from the dict are never dropped). Each key draws its own
    Bernoulli per sample, except the keys in one of ``groups``: those share one draw per sample
    (e.g. ``[("context", "concat")]`` drops SVD's image embedding and concat latent together), and
    must have the same ``p``. Returns a new dict (inputs untouched); with ``return_keep=True`` also
    ``{key: keep (B,) bool}`` for every key.
    """
    if not cond:
        return ({}, {}) if return_keep else {}
    probs = {key: float(p.get(key, 0.0)) for key in cond} if isinstance(p, Mapping) else {key: float(p) for key in cond}
    if isinstance(p, Mapping):
        unknown = set(p) - set(cond)
        if unknown:
            raise KeyError(f"drop_conditions: p names keys {sorted(unknown)} that cond lacks; cond has {sorted(cond)}")
    for key, value in probs.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"drop_conditions: drop probability of {key!r} must be in [0, 1], got {value}")
    batch_sizes = {key: value.shape[0] for key, value in cond.items() if isinstance(value, Tensor) and value.ndim > 0}
    if len(set(batch_sizes.values())) != 1 or len(batch_sizes) != len(cond):
        raise ValueError(f"drop_conditions: every condition must be a tensor with the same batch dim, got {batch_sizes}")
    batch = next(iter(batch_sizes.values()))

    group_of: dict[str, int] = {}
    for index, group in enumerate(groups):
        for key in group:
            if key not in cond:
                raise KeyError(f"drop_conditions: group {list(group)} names {key!r}, which cond lacks")
            if key in group_of:
                raise ValueError(f"drop_conditions: key {key!r} is in more than one group")
            group_of[key] = index
        if len({probs[key] for key in group}) > 1:
            raise ValueError(f"drop_conditions: keys of group {list(group)} have different p: {[probs[k] for k in group]}")

    device = generator.device if generator is not None else next(iter(cond.values())).device
    group_keep: dict[int, Tensor] = {}
    out: dict[str, Tensor] = {}
    keep: dict[str, Tensor] = {}
    for key, value in cond.items():
        if key in group_of and group_of[key] in group_keep:
            key_keep = group_keep[group_of[key]]
        else:
            key_keep = torch.rand(batch, generator=generator, device=device) >= probs[key]
            if key in group_of:
                group_keep[group_of[key]] = key_keep
        key_keep = key_keep.to(value.device)
        keep[key] = key_keep
        mask = key_keep.reshape((batch,) + (1,) * (value.ndim - 1))
        out[key] = torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return (out, keep) if return_keep else out
