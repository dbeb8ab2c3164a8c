"""Closed-form check of the EDM samplers on Gaussian data.

For data ``x0 ~ N(mu, s^2)`` (elementwise) the optimal denoiser is known exactly:
``D(x; sigma) = mu + s^2 / (s^2 + sigma^2) * (x - mu)``. We hand it to the samplers as a "network"
that inverts the preconditioning (returns ``(D - c_skip x) / c_out`` from ``c_in x`` and ``c_noise``),
so any bug in the discretization, the step rules, churn, preconditioning or initial-noise scaling
shows up as a wrong mean or std of the samples.

Step counts: with s = 0.3 the ODE is stiff around sigma ~ s, and the discretization error alone is
large at few steps. Computed exactly for this data (Karras sigmas, sigma_max 80): Euler gives a
sample std of 0.264 at 25 steps, 0.291 at 100, 0.2969 at 300; Heun 0.309 at 25, 0.3021 at 50,
0.3005 at 100. Churn adds error of its own (Euler, 500 steps, s_churn 10: 0.2966; Heun, 100 steps, s_churn 10:
0.3013). The step counts below keep every case's exact discretization error near 1% or less, so
the 2% bound has room for the sampling error of the churn noise (the initial noise is stratified).
"""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.diffusion.edm import EDMDiffusion, EDMPrecond, VScalingPrecond
from vdiff.diffusion.karras import euler_sample, heun_sample

MU, STD = 0.5, 0.3
SHAPE = (16, 2, 2, 16, 16)  # 16,384 samples


def stratified_normal(shape, seed: int) -> torch.Tensor:
    """Standard-normal noise whose empirical quantiles are exact (inverse CDF at (i + 1/2) / N, in a
    random order): the initial noise then adds no sampling error to the moments, so the 2% bound
    measures the sampler. Churn noise stays plainly random."""
    n = math.prod(shape)
    quantiles = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (quantiles[order] / quantiles.std()).reshape(shape).to(torch.float32)


@pytest.fixture(autouse=True)
def one_thread():
    """Elementwise ops on ~16k elements gain nothing from threads; on a busy 2-core machine
    OpenMP threads waiting on each other made these loops 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OptimalGaussianNet:
    """The network whose preconditioned output is the exact posterior mean of Gaussian data."""

    def __init__(self, precond, mu: float = MU, std: float = STD) -> None:
        self.precond, self.mu, self.std = precond, mu, std
        self.calls = 0

    def __call__(self, x_in, noise_level, cond, given_mask):
        self.calls += 1
        sigma = torch.exp(4.0 * noise_level.double())  # c_noise = ln(sigma) / 4 for both preconditionings
        c_skip, c_out, c_in, _ = (c.view(-1, 1, 1, 1, 1) for c in self.precond(sigma))
        x = x_in.double() / c_in
        denoised = self.mu + self.std**2 / (self.std**2 + sigma.view(-1, 1, 1, 1, 1) ** 2) * (x - self.mu)
        return ((denoised - c_skip * x) / c_out).to(x_in.dtype)


def _check_moments(samples: torch.Tensor) -> None:
    mean, std = samples.mean().item(), samples.std().item()
    assert abs(mean - MU) < 0.02 * MU, f"sample mean {mean:.4f}, expected {MU} within 2%"
    assert abs(std - STD) < 0.02 * STD, f"sample std {std:.4f}, expected {STD} within 2%"


@pytest.mark.parametrize(
    ("sampler", "steps", "precond", "s_churn", "sigma_max", "init_noise_scale"),
    [
        (euler_sample, 300, EDMPrecond(0.5), 0.0, 80.0, "sigma"),
        (euler_sample, 500, EDMPrecond(0.5), 10.0, 80.0, "sigma"),
        (heun_sample, 100, EDMPrecond(0.5), 0.0, 80.0, "sigma"),
        (heun_sample, 100, EDMPrecond(0.5), 10.0, 80.0, "sigma"),
        (euler_sample, 400, VScalingPrecond(), 0.0, 700.0, "svd"),  # 300 steps: std 0.2955
        (heun_sample, 100, VScalingPrecond(), 0.0, 700.0, "svd"),
    ],
    ids=["euler", "euler-churn", "heun", "heun-churn", "euler-svd", "heun-svd"],
)
def test_sampler_recovers_gaussian_moments(sampler, steps, precond, s_churn, sigma_max, init_noise_scale):
    generator = torch.Generator().manual_seed(0)
    noise = stratified_normal(SHAPE, seed=0)
    net = OptimalGaussianNet(precond)
    samples = sampler(
        EDMDiffusion(precond), net, noise, {}, steps=steps, sigma_max=sigma_max, s_churn=s_churn,
        init_noise_scale=init_noise_scale, generator=generator,
    )  # fmt: skip
    assert samples.shape == SHAPE
    _check_moments(samples)
    assert net.calls == (steps if sampler is euler_sample else 2 * steps - 1)


def test_few_step_euler_is_measurably_off():
    """The moment check can fail: 25 Euler steps on this stiff data give std 0.264 (-12%)."""
    noise = stratified_normal(SHAPE, seed=0)
    samples = euler_sample(EDMDiffusion(), OptimalGaussianNet(EDMPrecond()), noise, {}, steps=25)
    with pytest.raises(AssertionError, match="sample std"):
        _check_moments(samples)


def test_deterministic_heun_matches_exact_ode_map():
    """Without churn the ODE maps x_T to mu + s / sqrt(s^2 + sigma_max^2) (x_T - mu) exactly;
    Heun with 100 steps (0.17% discretization error for this data) tracks it per sample."""
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 1, 1, 8, 8, generator=generator, dtype=torch.float64)
    sigma_max = 80.0
    samples = heun_sample(EDMDiffusion(EDMPrecond()), OptimalGaussianNet(EDMPrecond()), noise, {}, steps=100, sigma_max=sigma_max)
    x_T = noise * sigma_max
    # exact flow of dx/dsigma = (x - D)/sigma from sigma_max to 0 for Gaussian data:
    # (x - mu) / sqrt(s^2 + sigma^2) is constant along the path.
    exact = MU + STD / (STD**2 + sigma_max**2) ** 0.5 * (x_T - MU)
    assert torch.allclose(samples - MU, exact - MU, rtol=5e-3, atol=1e-9)
