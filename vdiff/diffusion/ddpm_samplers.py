"""Samplers for :class:`~vdiff.diffusion.ddpm.GaussianDiffusion`: DDIM (with eta) and ancestral.

Both respace the process to ``steps`` (:meth:`GaussianDiffusion.respaced`), call the network only
through :func:`vdiff.diffusion.guidance.guided_call` (classifier-free guidance per frame), paste
the given content in before every network call and into the returned sample, so given elements of
the result equal ``given`` bit for bit.

The network sees ``noise_level`` = the ORIGINAL timestep index of the current step (mapped through
the respacing), a float32 ``(B,)`` tensor with integer values (``0 .. 999`` for the usual process),
exactly as in training (:meth:`GaussianDiffusion.network_timesteps`).

Learned sigma: ancestral sampling uses the learned-range variance (values clamped to [-1, 1], as
guidance may extrapolate them); DDIM ignores it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from vdiff.diffusion.common import DenoiserNetwork, check_sampler_inputs, replace_given
from vdiff.diffusion.ddpm import GaussianDiffusion
from vdiff.diffusion.guidance import Guidance, guided_call

__all__ = ["ancestral_sample", "ancestral_step", "ddim_sample", "ddim_step"]


def _randn(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device/dtype, drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _full_t(index: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)


def ddim_step(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x: Tensor,
    t: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip_x0: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update from index ``t`` to ``t - 1`` of ``diffusion`` (to the clean sample at t=0).

    x: ``(B, T, C, H, W)`` at step t; model_output: the network's output there; t: ``(B,)`` index
    into ``diffusion``. ``sigma = eta * sqrt((1 - ab') / (1 - ab)) * sqrt(1 - ab / ab')``;
    ``x' = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma * noise`` (noise required when eta > 0).
    Returns (x at t - 1, x0 estimate).
    """
    out = diffusion.p_mean_variance(model_output, x, t, clip_x0=clip_x0)
    ab = diffusion.schedule_at("alphas_cumprod", t, x)
    ab_prev = diffusion.schedule_at("alphas_cumprod_prev", t, x)
    x_prev = ab_prev.sqrt() * out["x0"]
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        sigma = eta * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)).sqrt()
        x_prev = x_prev + (1.0 - ab_prev - sigma**2).clamp_min(0.0).sqrt() * out["eps"] + sigma * noise
    else:
        x_prev = x_prev + (1.0 - ab_prev).sqrt() * out["eps"]
    return x_prev, out["x0"]


def ancestral_step(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    clip_x0: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral (DDPM) update: ``x' = mean + exp(log_var / 2) * noise``, no noise at t = 0.

    The variance is the learned range with ``learn_sigma``, else the posterior variance
    ("fixed_small"). Returns (x at t - 1, x0 estimate).
    """
    out = diffusion.p_mean_variance(model_output, x, t, clip_x0=clip_x0, clamp_var_values=True)
    if noise is None:
        if bool((t > 0).any()):
            raise ValueError("ancestral_step: steps with t > 0 need noise")
        return out["mean"], out["x0"]
    nonzero = (t > 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * noise, out["x0"]


def _progress(indices: Sequence[int], enabled: bool, desc: str) -> Iterator[int]:
    if not enabled:
        return iter(indices)
    from tqdm.auto import tqdm  # a Lightning dependency; only needed for the progress bar

    return iter(tqdm(indices, desc=desc))


def _sample(
    kind: str,
    diffusion: GaussianDiffusion,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    guidance: Guidance | None,
    given: Tensor | None,
    given_mask: Tensor | None,
    steps: int | str | Sequence[int] | None,
    eta: float,
    generator: torch.Generator | None,
    progress: bool,
    clip_x0: float | None,
) -> Tensor:
    name = f"{kind}_sample"
    check_sampler_inputs(noise, given, given_mask, name)
    process = diffusion if steps is None else diffusion.respaced(steps)
    x = noise
    for index in _progress(range(process.num_timesteps - 1, -1, -1), progress, kind):
        t = _full_t(index, x)
        x = replace_given(x, given, given_mask)
        output = guided_call(net, x, process.network_timesteps(t), cond, uncond, given_mask, guidance)
        if kind == "ddim":
            step_noise = _randn(x.shape, x, generator) if eta > 0 and index > 0 else None
            x, _ = ddim_step(process, output, x, t, eta=eta if index > 0 else 0.0, noise=step_noise, clip_x0=clip_x0)
        else:
            step_noise = _randn(x.shape, x, generator) if index > 0 else None
            x, _ = ancestral_step(process, output, x, t, noise=step_noise, clip_x0=clip_x0)
    return replace_given(x, given, given_mask)


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    steps: int | str | Sequence[int] | None = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: float | None = None,
) -> Tensor:
    """Sample clean clips with DDIM (Song et al. 2021); ``eta = 0`` is deterministic, 1 is DDPM-like.

    diffusion: the training process, respaced here to ``steps`` (an int n: n evenly spaced steps
    from the noisiest timestep to 0; or any spec of :func:`~vdiff.diffusion.ddpm.respacing_timesteps`
    such as "ddim50" or "trailing50"; None = every step of ``diffusion``). net: the
    denoiser (called as ``net(x, noise_level, cond, given_mask)``). noise: ``(B, T, C, H, W)``
    standard normal start. cond/uncond/guidance: see :func:`guided_call` (uncond None = no CFG).
    given/given_mask: ``(B, T, C, H, W)`` content and bool mask (true = given), pasted in before
    every step and into the result. generator: for the eta > 0 noise. clip_x0: clamp x0 estimates
    (pixel-space models in [-1, 1]). Returns the sample ``(B, T, C, H, W)``.
    """
    if eta < 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
    return _sample("ddim", diffusion, net, noise, cond, uncond, guidance, given, given_mask, steps, eta, generator, progress, clip_x0)


@torch.no_grad()
def ancestral_sample(
    diffusion: GaussianDiffusion,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    steps: int | str | Sequence[int] | None = 250,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: float | None = None,
) -> Tensor:
    """Sample clean clips with ancestral DDPM steps (learned variance when the process learns sigma).

    Arguments as :func:`ddim_sample` (no eta). VDT samples with 200 respaced steps (``steps=200``).
    """
    return _sample("ancestral", diffusion, net, noise, cond, uncond, guidance, given, given_mask, steps, 0.0, generator, progress, clip_x0)
