"""Parity of the Karras discretization and the Euler/Heun samplers with diffusers (test-only dependency).

How diffusers is configured, and why the comparison is fair:

- ``EulerDiscreteScheduler`` takes ``sigma_min``/``sigma_max`` in its config; with
  ``use_karras_sigmas=True`` its ``_convert_to_karras`` uses them (rho 7), so ``set_timesteps(N)``
  gives exactly the grid of :func:`karras_sigmas` plus a trailing 0. We use the configuration of
  diffusers' Stable Video Diffusion pipeline (scaled-linear betas, ``v_prediction``,
  ``timestep_type="continuous"`` so its timesteps are EDM's ``c_noise = 0.25 ln sigma``,
  ``timestep_spacing="leading"`` so ``init_noise_sigma = sqrt(sigma_max^2 + 1)``, sigma range
  0.002..700). Its v-prediction step is SVD's V-scaling denoiser, i.e. our ``VScalingPrecond``.
- ``EDMEulerScheduler`` is EDM's preconditioning with ``sigma_data`` 0.5 (our ``EDMPrecond``); it
  scales the initial noise by ``sqrt(sigma_max^2 + 1)``, our ``init_noise_scale="svd"``.
- ``HeunDiscreteScheduler`` has no sigma_min/sigma_max option: its Karras grid spans the range of
  its beta schedule. We read that range from the scheduler's grid, check that ``karras_sigmas`` with
  it reproduces the grid, and run our Heun sampler on it. Its timesteps are discrete DDPM indices,
  so the test network ignores its noise-level argument there.

Churn is left out of the loop comparisons: diffusers' Euler adds churn noise but still evaluates the
model at sigma, not at the raised sigma_hat (Karras' algorithm evaluates at sigma_hat, as ours does).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vdiff.diffusion.edm import EDMDiffusion, EDMPrecond, VScalingPrecond  # noqa: E402
from vdiff.diffusion.karras import euler_sample, heun_sample, karras_sigmas  # noqa: E402

SVD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    interpolation_type="linear",
    use_karras_sigmas=True,
    sigma_min=0.002,
    sigma_max=700.0,
    timestep_spacing="leading",
    timestep_type="continuous",
    steps_offset=1,
)


def svd_scheduler():
    return diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER)


class SmoothNet:
    """A fixed nonlinear 'network' of the preconditioned input and (optionally) the noise level."""

    def __init__(self, use_noise_level: bool = True) -> None:
        self.use_noise_level = use_noise_level
        self.levels: list[torch.Tensor] = []

    def __call__(self, x, noise_level, cond, given_mask):
        self.levels.append(noise_level.clone())
        out = 0.8 * torch.tanh(x) - 0.3 * x
        if self.use_noise_level:
            out = out + 0.05 * noise_level.view(-1, 1, 1, 1, 1) * x
        return out


@pytest.mark.parametrize("steps", [1, 2, 25, 30])
def test_karras_sigmas_match_euler_discrete_scheduler(steps):
    scheduler = svd_scheduler()
    scheduler.set_timesteps(steps)
    ours = karras_sigmas(steps, sigma_min=0.002, sigma_max=700.0, rho=7.0)
    assert ours.shape == scheduler.sigmas.shape == (steps + 1,)
    assert ours[-1].item() == 0.0
    torch.testing.assert_close(ours, scheduler.sigmas.to(torch.float32), rtol=1e-6, atol=0)
    # and against the conversion function itself
    converted = scheduler._convert_to_karras(in_sigmas=torch.tensor([700.0, 0.002]), num_inference_steps=steps)
    torch.testing.assert_close(ours[:-1], torch.as_tensor(converted, dtype=torch.float32), rtol=1e-6, atol=0)


def test_karras_sigmas_match_edm_euler_scheduler():
    scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    scheduler.set_timesteps(18)
    torch.testing.assert_close(karras_sigmas(18, 0.002, 80.0, 7.0), scheduler.sigmas.to(torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("step_index", [0, 12, 24])
def test_one_euler_step_matches_euler_discrete_scheduler(step_index):
    """From the same sample and the same model output, one step of ours equals diffusers' step.
    The last index is the step down to sigma 0."""
    steps = 25
    scheduler = svd_scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(step_index)
    sigma, sigma_next = scheduler.sigmas[step_index].item(), scheduler.sigmas[step_index + 1].item()
    sample = sigma * torch.randn(2, 3, 4, 6, 6, generator=generator, dtype=torch.float64)
    model_output = torch.randn(sample.shape, generator=generator, dtype=torch.float64)

    scheduler._step_index = step_index
    scheduler.is_scale_input_called = True
    expected = scheduler.step(model_output, scheduler.timesteps[step_index], sample).prev_sample

    ours = euler_sample(
        EDMDiffusion(VScalingPrecond()), lambda x, level, cond, mask: model_output, sample / sigma, {},
        sigmas=torch.tensor([sigma, sigma_next]), init_noise_scale="sigma",
    )  # fmt: skip
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-5, atol=1e-5)


def test_euler_sampling_loop_matches_svd_scheduler():
    """The whole 25-step SVD sampling loop: same noise levels fed to the network, same result."""
    steps = 25
    noise = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(0))

    scheduler = svd_scheduler()
    scheduler.set_timesteps(steps)
    reference_net = SmoothNet()
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        level = torch.full((noise.shape[0],), float(t))
        sample = scheduler.step(reference_net(model_input, level, {}, None), t, sample).prev_sample

    net = SmoothNet()
    ours = euler_sample(
        EDMDiffusion(VScalingPrecond()), net, noise, {}, steps=steps, sigma_max=700.0, init_noise_scale="svd"
    )
    for ours_level, ref_level in zip(net.levels, reference_net.levels, strict=True):
        torch.testing.assert_close(ours_level, ref_level, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


def test_euler_sampling_loop_matches_edm_euler_scheduler():
    steps = 18
    noise = torch.randn(2, 2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    scheduler.set_timesteps(steps)
    reference_net = SmoothNet()
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        level = torch.full((noise.shape[0],), float(t))
        sample = scheduler.step(reference_net(model_input, level, {}, None), t, sample).prev_sample

    ours = euler_sample(EDMDiffusion(EDMPrecond(0.5)), SmoothNet(), noise, {}, steps=steps, init_noise_scale="svd")
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


def test_heun_sampling_loop_matches_heun_discrete_scheduler():
    steps = 12
    scheduler = diffusers.HeunDiscreteScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", use_karras_sigmas=True
    )
    scheduler.set_timesteps(steps)
    # diffusers interleaves the grid for its two evaluations per step: s0, s1, s1, s2, s2, ..., 0
    grid = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]]).to(torch.float32)
    sigma_min, sigma_max = grid[-2].item(), grid[0].item()
    torch.testing.assert_close(karras_sigmas(steps, sigma_min, sigma_max), grid, rtol=1e-5, atol=0)

    noise = torch.randn(2, 2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    reference_net = SmoothNet(use_noise_level=False)
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        level = torch.full((noise.shape[0],), float(t))  # a DDPM index here; SmoothNet ignores it
        sample = scheduler.step(reference_net(model_input, level, {}, None), t, sample).prev_sample

    net = SmoothNet(use_noise_level=False)
    ours = heun_sample(
        EDMDiffusion(VScalingPrecond()), net, noise, {},
        steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, init_noise_scale="sigma",
    )  # fmt: skip
    assert len(net.levels) == len(reference_net.levels) == 2 * steps - 1
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)
