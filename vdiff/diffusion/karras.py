"""Karras et al. (2022) sampling for EDM-style denoisers: the sigma discretization, Euler and Heun.

Both samplers integrate the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` over
:func:`karras_sigmas` (optionally with Karras' "churn": a little noise added before each step, which
makes them stochastic). The denoiser ``D`` comes from an :class:`~vdiff.diffusion.edm.EDMDiffusion`
(anything with a ``denoise(net, x, sigma, cond, given_mask)`` method) or is that function itself.

Given content (``given``, ``given_mask``) is pasted into the current sample before every network
call, so it always enters clean, and into the output, so it is returned exactly. Classifier-free
guidance goes through :func:`~vdiff.diffusion.guidance.guided_call`.

Initial noise: ``x = noise * sigma_0`` (EDM, ``init_noise_scale="sigma"``) or
``noise * sqrt(1 + sigma_0^2)`` (SVD, ``"svd"``: the marginal std of unit-variance data at sigma_0).
SVD samples with sigma_max 700, 25 steps (SVD) / 30 (SVD-XT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vdiff.diffusion.common import DenoiserNetwork, check_sampler_inputs, replace_given
from vdiff.diffusion.guidance import Guidance, guided_call

InitNoiseScale = Literal["sigma", "svd"]
DenoiseFn = Callable[[DenoiserNetwork, Tensor, Tensor, dict[str, Tensor], "Tensor | None"], Tensor]


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras' discretization, ``(num_steps + 1,)`` float32, decreasing, with a trailing 0.

    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0 .. N-1``, then 0. Computed in float64. One step gives ``[sigma_max, 0]``.
    """
    if num_steps < 1:
        raise ValueError(f"karras_sigmas: num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"karras_sigmas: rho must be positive, got {rho}")
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    max_inv_rho = sigma_max ** (1.0 / rho)
    min_inv_rho = sigma_min ** (1.0 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype=torch.float32, device=device)


def _resolve_denoise(diffusion_or_denoise_fn: Any) -> DenoiseFn:
    denoise = getattr(diffusion_or_denoise_fn, "denoise", diffusion_or_denoise_fn)
    if not callable(denoise):
        raise TypeError(
            "sampler: diffusion_or_denoise_fn must have a denoise(net, x, sigma, cond, given_mask) method "
            f"or be that function, got {type(diffusion_or_denoise_fn).__name__}"
        )
    return denoise


@torch.no_grad()
def _karras_sample(
    order: int,
    diffusion_or_denoise_fn: Any,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    guidance: Guidance | None,
    given: Tensor | None,
    given_mask: Tensor | None,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    init_noise_scale: InitNoiseScale,
    sigmas: Tensor | None,
    generator: torch.Generator | None,
    progress: bool,
) -> Tensor:
    """Karras et al. Algorithm 2 (order 2, Euler on the last step) or its Euler-only variant (order 1)."""
    check_sampler_inputs(noise, given, given_mask, "sampler")
    denoise = _resolve_denoise(diffusion_or_denoise_fn)
    if sigmas is None:
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    sigma_list = [float(s) for s in sigmas.detach().cpu().double()]
    if len(sigma_list) < 2 or sigma_list[-1] < 0.0 or any(b >= a for a, b in zip(sigma_list, sigma_list[1:])):
        raise ValueError(f"sampler: sigmas must be >= 0, strictly decreasing, at least two, got {sigma_list}")
    num_steps = len(sigma_list) - 1
    if init_noise_scale == "sigma":
        scale = sigma_list[0]
    elif init_noise_scale == "svd":
        scale = math.sqrt(1.0 + sigma_list[0] ** 2)
    else:
        raise ValueError(f"sampler: init_noise_scale must be 'sigma' or 'svd', got {init_noise_scale!r}")

    batch = noise.shape[0]

    def guided_net(x: Tensor, noise_level: Tensor, cond_: dict[str, Tensor], mask: Tensor | None) -> Tensor:
        return guided_call(net, x, noise_level, cond_, uncond, mask, guidance)

    def denoised_at(x: Tensor, sigma: float) -> Tensor:
        x = replace_given(x, given, given_mask)  # given content enters clean
        sigma_b = torch.full((batch,), sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        return denoise(guided_net, x, sigma_b, cond, given_mask)

    gamma_max = (s_churn / num_steps) if num_steps > 0 else 0.0
    gamma_max = min(gamma_max, math.sqrt(2.0) - 1.0)
    x = noise * scale
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling"):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1.0 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * eps
        d = (x - denoised_at(x, sigma_hat)) / sigma_hat  # (B, T, C, H, W)
        x_next = x + (sigma_next - sigma_hat) * d
        if order == 2 and sigma_next > 0:
            d_next = (x_next - denoised_at(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return replace_given(x, given, given_mask)


def euler_sample(
    diffusion_or_denoise_fn: Any,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    steps: int = 25,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    init_noise_scale: InitNoiseScale = "sigma",
    sigmas: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler sampling of the EDM ODE (stochastic with ``s_churn > 0``); returns x0 ``(B, T, C, H, W)``.

    diffusion_or_denoise_fn: an EDMDiffusion / PreconditionedDenoiser or a ``denoise(net, x, sigma (B,), cond,
    given_mask)`` function. noise: standard normal ``(B, T, C, H, W)``, scaled by ``init_noise_scale``.
    uncond/guidance: classifier-free guidance (both needed). given/given_mask: content kept fixed.
    steps/sigma_min/sigma_max/rho: :func:`karras_sigmas`; or pass ``sigmas`` (decreasing; a grid that
    stops above 0 returns the sample at its last sigma, e.g. to run part of a schedule).
    s_churn/s_tmin/s_tmax/s_noise: Karras' stochasticity (gamma = min(s_churn / steps, sqrt 2 - 1) for
    sigma in [s_tmin, s_tmax]). generator: for the churn noise.
    """
    return _karras_sample(
        1, diffusion_or_denoise_fn, net, noise, cond, uncond, guidance, given, given_mask, steps, sigma_min,
        sigma_max, rho, s_churn, s_tmin, s_tmax, s_noise, init_noise_scale, sigmas, generator, progress,
    )  # fmt: skip


def heun_sample(
    diffusion_or_denoise_fn: Any,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    steps: int = 25,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    init_noise_scale: InitNoiseScale = "sigma",
    sigmas: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun (2nd-order) sampling, Karras et al. Algorithm 2: Euler on the last step (to sigma 0).

    Same arguments as :func:`euler_sample`; ``2 * steps - 1`` network calls.
    """
    return _karras_sample(
        2, diffusion_or_denoise_fn, net, noise, cond, uncond, guidance, given, given_mask, steps, sigma_min,
        sigma_max, rho, s_churn, s_tmin, s_tmax, s_noise, init_noise_scale, sigmas, generator, progress,
    )  # fmt: skip
