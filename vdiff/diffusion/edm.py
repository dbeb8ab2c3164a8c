"""EDM (Karras et al. 2022) as a training process: preconditioning, sigma sampling, loss weights, offset noise.

The noisy clip is ``x = x0 + sigma * n`` with ONE sigma per clip ``(B,)``. The denoiser is

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), cond, given_mask)

where ``F`` is the network (a :class:`~vdiff.diffusion.common.DenoiserNetwork`, called through the denoiser
contract) and ``D`` is :class:`PreconditionedDenoiser`.
Given content (``given_mask`` true) enters clean: the noisy input holds ``x0`` there, while the
preconditioning still uses the clip's sigma everywhere (as Vista does); the loss counts generated
elements only. Samplers live in :mod:`vdiff.diffusion.karras`.

Preconditionings (each maps sigma ``(B,)`` to ``(c_skip, c_out, c_in, c_noise)``, each ``(B,)``):

- :class:`EDMPrecond`: EDM's, with ``sigma_data`` (0.5 for images in [-1, 1]).
- :class:`VScalingPrecond`: SVD's ``VScalingWithEDMcNoise``, v-prediction with ``sigma_data = 1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

from vdiff.diffusion.common import DenoiserNetwork, append_dims, masked_mean, replace_given

OffsetNoiseScope = Literal["clip", "frame"]
LossWeightingName = Literal["unit", "edm", "v", "eps"]


# --------------------------------------------------------------------------------------------------
# Preconditioning
# --------------------------------------------------------------------------------------------------


class Preconditioning(Protocol):
    """Maps sigma ``(B,)`` to ``(c_skip, c_out, c_in, c_noise)``, each ``(B,)``."""

    sigma_data: float

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


class EDMPrecond:
    """EDM preconditioning (Karras et al. 2022, Table 1).

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4.
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"EDMPrecond: sigma_data must be positive, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = 1.0 / total.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise

    def __repr__(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data})"


class VScalingPrecond:
    """SVD's V-scaling with EDM's c_noise (v-prediction, sigma_data = 1).

    c_skip = 1 / (s^2 + 1), c_out = -s / sqrt(s^2 + 1), c_in = 1 / sqrt(s^2 + 1), c_noise = ln(s) / 4.
    """

    sigma_data = 1.0

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        total = sigma**2 + 1.0
        c_skip = 1.0 / total
        c_out = -sigma / total.sqrt()
        c_in = 1.0 / total.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise

    def __repr__(self) -> str:
        return "VScalingPrecond()"


def _per_clip_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return sigma as a float ``(B,)`` tensor on ``x``'s device; a scalar is broadcast to every clip."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or (B,) = ({x.shape[0]},), one per clip; got shape {tuple(sigma.shape)}")
    return sigma


class PreconditionedDenoiser:
    """EDM's preconditioned denoiser around a network: ``D(x; sigma)``.

    ``denoise(net, x_noisy, sigma, cond, given_mask)``: x_noisy ``(B, T, C, H, W)`` (holding ``x0``
    where ``given_mask`` is true), sigma ``(B,)`` or a scalar, cond a dict, given_mask bool
    broadcastable to ``x`` or None. Returns ``D`` ``(B, T, C, H, W)``, the estimate of ``x0``.
    The network sees ``c_in * x`` and ``c_noise`` ``(B,)``; every element of a clip uses its sigma.
    """

    def __init__(self, precond: Preconditioning) -> None:
        self.precond = precond

    def denoise(
        self,
        net: DenoiserNetwork,
        x_noisy: Tensor,
        sigma: Tensor | float,
        cond: dict[str, Tensor],
        given_mask: Tensor | None = None,
    ) -> Tensor:
        sigma = _per_clip_sigma(sigma, x_noisy)
        c_skip, c_out, c_in, c_noise = self.precond(sigma)  # each (B,)
        c_skip, c_out, c_in = (append_dims(c, x_noisy.ndim).to(x_noisy.dtype) for c in (c_skip, c_out, c_in))
        out = net(c_in * x_noisy, c_noise, cond, given_mask)  # (B, T, C, H, W)
        if out.shape != x_noisy.shape:
            raise ValueError(
                f"PreconditionedDenoiser: the network returned shape {tuple(out.shape)}, "
                f"expected {tuple(x_noisy.shape)}"
            )
        return c_skip * x_noisy + c_out * out

    __call__ = denoise


# --------------------------------------------------------------------------------------------------
# Sigma sampling, loss weighting, offset noise
# --------------------------------------------------------------------------------------------------


class SigmaSampler(ABC):
    """Base of training-sigma distributions: ``(batch, device, generator) -> (batch,)``, one per clip.

    A base class rather than a Protocol so that LightningCLI recipes can name any subclass.
    """

    @abstractmethod
    def __call__(
        self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return ``(batch,)`` positive sigmas."""


class LogNormalSigma(SigmaSampler):
    """Training sigmas with ``ln sigma ~ N(p_mean, p_std^2)``, ONE per clip.

    EDM uses (-1.2, 1.2); SVD fine-tunes commonly (0.7, 1.6); Vista (1.0, 1.6).
    ``__call__(batch, device, generator)`` returns ``(batch,)`` float32.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if not p_std >= 0:
            raise ValueError(f"LogNormalSigma: p_std must be >= 0, got {p_std}")
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def __call__(self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        normal = torch.randn(batch, generator=generator, device=device)
        return (self.p_mean + self.p_std * normal).exp()

    def __repr__(self) -> str:
        return f"LogNormalSigma(p_mean={self.p_mean}, p_std={self.p_std})"


def loss_weight(name: LossWeightingName, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """Per-clip loss weight ``lambda(sigma)`` ``(B,)``.

    unit: 1; edm: (s^2 + sd^2) / (s sd)^2 (EDM's, giving unit effective weight on F);
    v: (s^2 + 1) / s^2 (SVD's, EDM's with sd = 1); eps: 1 / s^2 (the eps-prediction MSE).
    """
    if name == "unit":
        return torch.ones_like(sigma)
    if name == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if name == "v":
        return (sigma**2 + 1.0) / sigma**2
    if name == "eps":
        return sigma**-2
    raise ValueError(f"loss weighting must be 'unit', 'edm', 'v' or 'eps', got {name!r}")


def offset_noise(
    shape: tuple[int, int, int, int, int] | torch.Size,
    scope: OffsetNoiseScope = "clip",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Unit-variance offset noise for a ``(B, T, C, H, W)`` clip, constant over ``H, W``.

    scope "clip": ``(B, 1, C, 1, 1)``, one value per clip and channel (shared by every frame);
    scope "frame": ``(B, T, C, 1, 1)``, one per frame and channel (as Vista). Multiply by the level.
    """
    if len(shape) != 5:
        raise ValueError(f"offset_noise: shape must be (B, T, C, H, W), got {tuple(shape)}")
    batch, frames, channels = shape[0], shape[1], shape[2]
    if scope == "clip":
        return torch.randn(batch, 1, channels, 1, 1, generator=generator, device=device, dtype=dtype)
    if scope == "frame":
        return torch.randn(batch, frames, channels, 1, 1, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"offset_noise: scope must be 'clip' or 'frame', got {scope!r}")


# --------------------------------------------------------------------------------------------------
# The training process
# --------------------------------------------------------------------------------------------------


class EDMDiffusion:
    """EDM training process and the denoiser the Karras samplers use.

    precond: :class:`EDMPrecond` or :class:`VScalingPrecond`. sigma_sampler: a :class:`SigmaSampler`
    ``(batch, device, generator) -> (B,)`` such as :class:`LogNormalSigma`. loss_weighting: "unit",
    "edm", "v", "eps" (or a callable ``sigma (B,) -> (B,)``); "edm" uses the precond's sigma_data.
    offset_noise: level added to the training noise (0 disables); offset_noise_scope: "clip"
    (per clip and channel) or "frame" (per frame and channel, as Vista).

    SVD-style: ``EDMDiffusion(VScalingPrecond(), LogNormalSigma(0.7, 1.6), "v")``.
    """

    def __init__(
        self,
        precond: Preconditioning | None = None,
        sigma_sampler: SigmaSampler | None = None,
        loss_weighting: LossWeightingName | Callable[[Tensor], Tensor] = "edm",
        offset_noise: float = 0.0,
        offset_noise_scope: OffsetNoiseScope = "clip",
    ) -> None:
        if offset_noise_scope not in ("clip", "frame"):
            raise ValueError(f"EDMDiffusion: offset_noise_scope must be 'clip' or 'frame', got {offset_noise_scope!r}")
        if not (offset_noise >= 0 and math.isfinite(offset_noise)):
            raise ValueError(f"EDMDiffusion: offset_noise must be a finite level >= 0, got {offset_noise}")
        if isinstance(loss_weighting, str):
            loss_weight(loss_weighting, torch.ones(1))  # validates the name early
        self.precond = precond if precond is not None else EDMPrecond()
        self.sigma_sampler = sigma_sampler if sigma_sampler is not None else LogNormalSigma()
        self.loss_weighting = loss_weighting
        self.offset_noise = float(offset_noise)
        self.offset_noise_scope = offset_noise_scope
        self.denoiser = PreconditionedDenoiser(self.precond)

    def denoise(
        self,
        net: DenoiserNetwork,
        x_noisy: Tensor,
        sigma: Tensor | float,
        cond: dict[str, Tensor],
        given_mask: Tensor | None = None,
    ) -> Tensor:
        """``D(x_noisy; sigma)`` ``(B, T, C, H, W)``; see :class:`PreconditionedDenoiser`."""
        return self.denoiser.denoise(net, x_noisy, sigma, cond, given_mask)

    def weight(self, sigma: Tensor) -> Tensor:
        """Per-clip loss weight ``(B,)``."""
        if callable(self.loss_weighting):
            return self.loss_weighting(sigma)
        return loss_weight(self.loss_weighting, sigma, self.precond.sigma_data)

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training noise ``(B, T, C, H, W)``: standard normal plus the offset noise, if any."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.offset_noise > 0:
            offset = offset_noise(x0.shape, self.offset_noise_scope, generator, x0.device, x0.dtype)
            noise = noise + self.offset_noise * offset
        return noise

    def training_losses(
        self,
        net: DenoiserNetwork,
        x0: Tensor,
        cond: dict[str, Tensor],
        given_mask: Tensor | None = None,
        noise: Tensor | None = None,
        sigma: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The weighted denoising loss on a batch of clean clips.

        x0: ``(B, T, C, H, W)``; given_mask: bool broadcastable to x0 (true = given, enters clean and
        is left out of the loss) or None; noise: the full training noise (used as is; default
        :meth:`sample_noise`); sigma: ``(B,)`` (default: drawn by the sigma sampler, one per clip).
        Returns the keys every vdiff process returns (:data:`~vdiff.diffusion.common.LOSS_KEYS`):
        ``loss`` (scalar, mean over clips), ``loss_per_clip`` ``(B,)`` (weighted MSE averaged over
        generated elements), ``mse`` (scalar, the unweighted MSE), ``vb`` (0: EDM has no VB term),
        ``noise_level`` (sigma ``(B,)``) and ``denoised`` (D, like x0). The weight is :meth:`weight`.
        """
        if x0.ndim != 5:
            raise ValueError(f"EDMDiffusion.training_losses: x0 must be (B, T, C, H, W), got shape {tuple(x0.shape)}")
        batch = x0.shape[0]
        if sigma is None:
            sigma = self.sigma_sampler(batch, x0.device, generator)
        sigma = _per_clip_sigma(sigma, x0)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"EDMDiffusion.training_losses: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        x_noisy = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise  # (B, T, C, H, W)
        x_noisy = replace_given(x_noisy, x0, given_mask)  # given content enters clean
        denoised = self.denoise(net, x_noisy, sigma, cond, given_mask)  # (B, T, C, H, W)
        weight = self.weight(sigma)  # (B,)
        loss_dtype = torch.promote_types(denoised.dtype, torch.float32)  # at least fp32 under bf16/fp16
        squared_error = (denoised.to(loss_dtype) - x0.to(loss_dtype)) ** 2
        mse_per_clip = masked_mean(squared_error, given_mask)  # (B,)
        loss_per_clip = weight.to(loss_dtype) * mse_per_clip  # (B,)
        return {
            "loss": loss_per_clip.mean(),
            "loss_per_clip": loss_per_clip,
            "mse": mse_per_clip.detach().mean(),
            "vb": loss_per_clip.new_zeros(()),
            "noise_level": sigma,
            "denoised": replace_given(denoised, x0, given_mask),
        }

    def __repr__(self) -> str:
        return (
            f"EDMDiffusion(precond={self.precond!r}, sigma_sampler={self.sigma_sampler!r}, "
            f"loss_weighting={self.loss_weighting!r}, offset_noise={self.offset_noise}, "
            f"offset_noise_scope={self.offset_noise_scope!r})"
        )
