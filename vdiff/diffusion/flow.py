"""Flow matching (rectified flow) as a training process, beside DDPM and EDM.

The path from data to noise is a straight line, ONE time per clip ``t`` ``(B,)`` in [0, 1]::

    x_t = (1 - t) * x0 + t * eps          t = 0: the clean clip, t = 1: pure standard-normal noise

and the network predicts the velocity along it, ``v = dx_t / dt = eps - x0`` (Liu et al. 2022, rectified
flow; Lipman et al. 2022; SD3, Esser et al. 2024). The loss is the plain MSE of the velocity over
generated elements. From a velocity estimate: ``x0 = x_t - t v``, ``eps = x_t + (1 - t) v``.

Conventions
-----------
* The network is called through the denoiser contract (:mod:`vdiff.diffusion.common`) on ``x_t`` itself
  (no preconditioning: the path keeps unit-scale inputs) with ``noise_level = time_scale * t``, a float32
  ``(B,)`` tensor: by default ``1000 t``, SD3's and diffusers' ``timestep = sigma * 1000``, the same range as
  the DDPM timesteps a VDT or UNet time embedding is built for. Its output is the velocity ``(B, T, C, H, W)``.
* Training times: a :class:`TimeSampler` draws ``t`` (:class:`LogitNormalTime`, SD3's ``t = sigmoid(m + s n)``,
  or :class:`UniformTime`), then the timestep shift :func:`shift_time` moves it toward noise,
  ``t' = shift t / (1 + (shift - 1) t)`` (SD3 section 5.3.2: larger images keep more of their signal at a
  given t, so they need more noise; ``shift = 1`` changes nothing, SD3 uses 3 at 1024 px). The process's
  ``shift`` applies to the drawn training times and is the samplers' default.
* Given content (``given_mask`` true) enters clean: ``x_t`` holds ``x0`` there, the network sees the clip's
  ``t`` everywhere, and the loss counts generated elements only (as DDPM and EDM).
* ``training_losses`` returns :data:`~vdiff.diffusion.common.LOSS_KEYS`; ``noise_level`` is ``t`` ``(B,)``
  (after the shift) and ``vb`` is 0.

Samplers (Euler, Heun on the shifted time grid :func:`flow_times`) live in :mod:`vdiff.diffusion.flow_samplers`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from vdiff.diffusion.common import DenoiserNetwork, append_dims, masked_mean, replace_given

__all__ = ["FlowMatching", "LogitNormalTime", "TimeSampler", "UniformTime", "flow_times", "shift_time"]


def _check_shift(shift: float, where: str) -> float:
    shift = float(shift)
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"{where}: shift must be a finite number > 0 (1 = no shift), got {shift}")
    return shift


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3's timestep shift ``t' = shift t / (1 + (shift - 1) t)`` of times in [0, 1] (a tensor or a float).

    It fixes 0 and 1 and is increasing; ``shift > 1`` moves every time toward noise (``shift = 3``:
    0.5 -> 0.75), ``shift < 1`` toward data, ``shift = 1`` is the identity. The signal-to-noise ratio
    ``((1 - t) / t)^2`` is divided by ``shift^2``.
    """
    shift = _check_shift(shift, "shift_time")
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_times(
    steps: int, shift: float = 1.0, t_min: float | None = None, device: torch.device | str | None = None
) -> Tensor:
    """The sampling time grid, ``(steps + 1,)`` float64, decreasing from 1 to a trailing 0.

    ``steps`` times evenly spaced from 1 down to ``t_min``, each shifted (:func:`shift_time`), then 0.
    ``t_min`` None is ``1 / steps``: the uniform grid ``linspace(1, 0, steps + 1)`` before the shift (the
    rectified-flow and Flux reference grid). SD3's reference code and diffusers'
    ``FlowMatchEulerDiscreteScheduler`` use ``t_min = shift_time(1 / 1000, shift)`` (their smallest shifted
    training time), which puts the last network call close to t = 0; with it this grid equals their sigmas.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow_times: steps must be an int >= 1, got {steps!r}")
    t_min = 1.0 / steps if t_min is None else float(t_min)
    if not 0.0 < t_min <= 1.0:
        raise ValueError(f"flow_times: t_min must be in (0, 1], got {t_min}")
    times = shift_time(torch.linspace(1.0, t_min, steps, dtype=torch.float64), shift)
    return torch.cat([times, times.new_zeros(1)]).to(device)


class TimeSampler(ABC):
    """Base of training-time distributions on [0, 1]: ``(batch, device, generator) -> (batch,)``, one per clip.

    A base class rather than a Protocol so that LightningCLI recipes can name any subclass.
    """

    @abstractmethod
    def __call__(
        self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return ``(batch,)`` float32 times in [0, 1]."""


def _draw_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device | str | None:
    """Draw on the generator's device (a CPU generator then seeds the same times on any device)."""
    return generator.device if generator is not None else device


class LogitNormalTime(TimeSampler):
    """SD3's logit-normal times: ``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``, ONE per clip.

    ``mean = 0, std = 1`` (SD3's choice) weights the middle of the path, where the velocity is hardest to
    predict; a positive ``mean`` moves the mass toward noise. Returns ``(batch,)`` float32 in (0, 1).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not (std >= 0 and math.isfinite(std)) or not math.isfinite(mean):
            raise ValueError(f"LogitNormalTime: need a finite mean and a finite std >= 0, got mean={mean}, std={std}")
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        normal = torch.randn(batch, generator=generator, device=_draw_device(device, generator))
        return torch.sigmoid(self.mean + self.std * normal).to(device)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean}, std={self.std})"


class UniformTime(TimeSampler):
    """Uniform times ``t ~ U[0, 1)`` (the original rectified flow), ONE per clip; ``(batch,)`` float32."""

    def __call__(self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(batch, generator=generator, device=_draw_device(device, generator)).to(device)

    def __repr__(self) -> str:
        return "UniformTime()"


def _per_clip_time(t: Tensor | float, x: Tensor, where: str, check_range: bool = False) -> Tensor:
    """``t`` as a float ``(B,)`` tensor on ``x``'s device (a scalar is broadcast to every clip); ``check_range``:
    also check that every time lies in [0, 1] (a device sync: done on times a caller passed, not on drawn ones)."""
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.float()
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{where}: t must be a scalar or (B,) = ({x.shape[0]},), one time per clip; got shape {tuple(t.shape)}")
    if check_range and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{where}: flow times must lie in [0, 1] (0 = clean, 1 = noise), got {t.tolist()}")
    return t


class FlowMatching:
    """Flow matching (rectified flow): the straight path ``x_t = (1 - t) x0 + t eps`` and a velocity loss.

    time_sampler: the training-time distribution, a :class:`TimeSampler` (default ``LogitNormalTime(0, 1)``,
    SD3's). shift: the timestep shift (:func:`shift_time`) applied to the drawn training times and used by
    the samplers unless they name their own (1 = none; SD3 uses 3 for 1024 px images). time_scale: the
    network sees ``noise_level = time_scale * t`` (default 1000, SD3's and diffusers' timestep convention).

    A recipe names it as the ``diffusion:`` group::

        diffusion:
          class_path: vdiff.diffusion.flow.FlowMatching
          init_args:
            time_sampler: {class_path: vdiff.diffusion.flow.LogitNormalTime, init_args: {mean: 0.0, std: 1.0}}
            shift: 1.0
        sampler: {name: flow_euler, steps: 10}
    """

    def __init__(self, time_sampler: TimeSampler | None = None, shift: float = 1.0, time_scale: float = 1000.0) -> None:
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"FlowMatching: time_scale must be a finite number > 0, got {time_scale}")
        if time_sampler is not None and not callable(time_sampler):
            raise TypeError(f"FlowMatching: time_sampler must be a TimeSampler, got {type(time_sampler).__name__}")
        self.time_sampler = time_sampler if time_sampler is not None else LogitNormalTime()
        self.shift = _check_shift(shift, "FlowMatching")
        self.time_scale = float(time_scale)

    def __repr__(self) -> str:
        return f"FlowMatching(time_sampler={self.time_sampler!r}, shift={self.shift}, time_scale={self.time_scale})"

    def network_time(self, t: Tensor) -> Tensor:
        """The ``noise_level`` the network sees for times ``t`` ``(B,)``: ``time_scale * t``, float32 ``(B,)``."""
        return (t.to(torch.float64 if t.device.type != "mps" else torch.float32) * self.time_scale).to(torch.float32)

    def sample_times(self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Training times ``(batch,)``: drawn by the time sampler, then shifted by ``shift``."""
        t = self.time_sampler(batch, device, generator)
        return shift_time(t, self.shift) if self.shift != 1.0 else t

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """The point of the path ``x_t = (1 - t) x0 + t noise`` ``(B, T, C, H, W)``; t ``(B,)`` or a scalar."""
        t = append_dims(_per_clip_time(t, x0, "FlowMatching.add_noise"), x0.ndim).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def velocity(
        self, net: DenoiserNetwork, x_t: Tensor, t: Tensor | float, cond: dict[str, Tensor], given_mask: Tensor | None = None
    ) -> Tensor:
        """The network's velocity ``(B, T, C, H, W)`` at ``x_t`` (holding ``x0`` where ``given_mask`` is true) and
        times ``t`` ``(B,)`` or a scalar: ``net(x_t, time_scale * t, cond, given_mask)``, shape-checked."""
        t = _per_clip_time(t, x_t, "FlowMatching.velocity")
        out = net(x_t, self.network_time(t), cond, given_mask)
        if out.shape != x_t.shape:
            raise ValueError(
                f"FlowMatching: the network returned shape {tuple(out.shape)}, expected the velocity {tuple(x_t.shape)}"
            )
        return out

    def denoise(
        self, net: DenoiserNetwork, x_t: Tensor, t: Tensor | float, cond: dict[str, Tensor], given_mask: Tensor | None = None
    ) -> Tensor:
        """The x0 estimate ``x_t - t v`` ``(B, T, C, H, W)`` (see :meth:`velocity`)."""
        t_clip = _per_clip_time(t, x_t, "FlowMatching.denoise")
        v = self.velocity(net, x_t, t_clip, cond, given_mask)
        return x_t - append_dims(t_clip, x_t.ndim).to(x_t.dtype) * v.to(x_t.dtype)

    def weight(self, t: Tensor) -> Tensor:
        """Per-clip weight ``1 / t^2`` ``(B,)``: the velocity error is the x0 error over ``t``
        (``v_hat - v = -(x0_hat - x0) / t``), so this weight on an x0-space squared error gives the velocity loss's
        scale. Losses on the x0 estimate (Vista's dynamics and structure terms) use it as they use EDM's weight."""
        return t.to(torch.promote_types(t.dtype, torch.float32)) ** -2

    def training_losses(
        self,
        net: DenoiserNetwork,
        x0: Tensor,
        cond: dict[str, Tensor],
        given_mask: Tensor | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The velocity loss on a batch of clean clips.

        x0: ``(B, T, C, H, W)``; given_mask: bool broadcastable to x0 (true = given: enters clean and is left out
        of the loss) or None; noise: standard normal like x0 (default: drawn); t: ``(B,)`` times in [0, 1], used
        as given (default: :meth:`sample_times`, shifted). Returns the keys every vdiff process returns
        (:data:`~vdiff.diffusion.common.LOSS_KEYS`): ``loss`` (scalar, mean over clips of ``loss_per_clip``),
        ``loss_per_clip`` ``(B,)`` (the squared velocity error ``(v_hat - (eps - x0))^2`` averaged over generated
        elements), ``mse`` (scalar, the same, detached), ``vb`` (0), ``noise_level`` (t ``(B,)``) and ``denoised``
        (``x_t - t v_hat``, with its gradient, the given content pasted in). The error is taken in at least float32.
        """
        if x0.ndim != 5:
            raise ValueError(f"FlowMatching.training_losses: x0 must be (B, T, C, H, W), got shape {tuple(x0.shape)}")
        if given_mask is not None:
            if given_mask.dtype != torch.bool:
                raise TypeError(f"FlowMatching.training_losses: given_mask must be bool (true = given), got {given_mask.dtype}")
            torch.broadcast_shapes(given_mask.shape, x0.shape)
        given_t = t is not None
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, generator)
        t = _per_clip_time(t, x0, "FlowMatching.training_losses", check_range=given_t)
        if noise is None:
            draw = _draw_device(x0.device, generator)
            noise = torch.randn(x0.shape, generator=generator, device=draw, dtype=x0.dtype).to(x0.device)
        elif noise.shape != x0.shape:
            raise ValueError(f"FlowMatching.training_losses: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        x_t = replace_given(self.add_noise(x0, noise, t), x0, given_mask)  # given content enters clean
        velocity = self.velocity(net, x_t, t, cond, given_mask)  # (B, T, C, H, W)
        loss_dtype = torch.promote_types(velocity.dtype, torch.float32)
        target = noise.to(loss_dtype) - x0.to(loss_dtype)
        loss_per_clip = masked_mean((velocity.to(loss_dtype) - target) ** 2, given_mask)  # (B,)
        denoised = x_t - append_dims(t, x0.ndim).to(x_t.dtype) * velocity.to(x_t.dtype)
        return {
            "loss": loss_per_clip.mean(),
            "loss_per_clip": loss_per_clip,
            "mse": loss_per_clip.detach().mean(),
            "vb": loss_per_clip.new_zeros(()),
            "noise_level": t,
            "denoised": replace_given(denoised, x0, given_mask),
        }
