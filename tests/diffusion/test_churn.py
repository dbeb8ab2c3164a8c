"""Karras churn with a large gamma, against an independent float64 transcription of Algorithm 2.

The other churn tests use ``s_churn / steps`` well below ``sqrt(2) - 1``, where evaluating the network
at ``sigma`` instead of the raised ``sigma_hat`` is within their tolerances; diffusers' Euler does
exactly that, so it cannot serve as the reference here. With ``s_churn`` large, gamma is
``sqrt(2) - 1`` at every step in ``[s_tmin, s_tmax]``: ``sigma_hat = sqrt(2) * sigma``, and every
step's noise level is checked, as is the result.

Karras et al. 2022, Algorithm 2 (with ``D`` the denoiser, ``t`` = sigma)::

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= t_i <= S_tmax else 0
    eps ~ N(0, S_noise^2 I);  t_hat = t_i + gamma_i t_i;  x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps
    d = (x_hat - D(x_hat; t_hat)) / t_hat;  x_{i+1} = x_hat + (t_{i+1} - t_hat) d
    if t_{i+1} != 0:  d' = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}
                      x_{i+1} = x_hat + (t_{i+1} - t_hat) (d + d') / 2
"""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.diffusion.edm import EDMDiffusion, EDMPrecond
from vdiff.diffusion.karras import euler_sample, heun_sample

SAMPLERS = {"euler": (euler_sample, 1), "heun": (heun_sample, 2)}
GRID = [80.0, 17.0, 4.0, 1.3, 0.4, 0.09, 0.0]  # decreasing, trailing 0: six steps
MU, S = 0.3, 0.7  # data ~ N(MU, S^2) per element


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The optimal denoiser for N(MU, S^2) data: strongly sigma-dependent, so a wrong sigma shows."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def reference(
    noise: torch.Tensor,
    grid: list[float],
    order: int,
    s_churn: float,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Algorithm 2 in float64, written from the paper; returns x_N and the sigmas D was called at.

    The churn noise is one standard normal draw of x's shape per churned step from a generator seeded
    ``seed`` (the samplers' contract for ``generator``)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    n = len(grid) - 1
    calls: list[float] = []

    def D(x: torch.Tensor, t: float) -> torch.Tensor:
        calls.append(t)
        return gaussian_denoiser(x, t)

    x = noise.double() * grid[0]
    for i in range(n):
        t, t_next = grid[i], grid[i + 1]
        gamma = min(s_churn / n, math.sqrt(2.0) - 1.0) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=noise.dtype).double()
            x = x + math.sqrt(t_hat**2 - t**2) * s_noise * eps
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if order == 2 and t_next != 0:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * 0.5 * (d + d_prime)
        x = x_next
    return x, calls


def run_vdiff(name: str, noise: torch.Tensor, seed: int | None = None, **kwargs) -> tuple[torch.Tensor, list[float]]:
    sampler, _ = SAMPLERS[name]
    calls: list[float] = []

    def denoise(net, x, sigma, cond, given_mask):
        assert sigma.shape == (x.shape[0],) and torch.all(sigma == sigma[0])
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma.view(-1, 1, 1, 1, 1).to(x.dtype))

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = sampler(
        denoise, None, noise, {}, sigmas=torch.tensor(GRID, dtype=torch.float64), generator=generator, **kwargs
    )
    return out, calls


def noise_clip(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_large_churn_without_noise_evaluates_at_sigma_hat(name):
    """s_noise = 0: churn raises sigma to sqrt(2) sigma without adding noise, so the result is
    deterministic and any step taken from (or evaluated at) sigma instead of sigma_hat changes it."""
    noise = noise_clip()
    out, calls = run_vdiff(name, noise, s_churn=1000.0, s_noise=0.0)
    expected, expected_calls = reference(noise, GRID, SAMPLERS[name][1], s_churn=1000.0, s_noise=0.0)
    assert calls == pytest.approx(expected_calls, rel=1e-12)
    assert calls[0] == pytest.approx(math.sqrt(2.0) * GRID[0])  # gamma = sqrt(2) - 1 for every step
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # The comparison can tell: the same grid without churn lands elsewhere.
    plain, _ = reference(noise, GRID, SAMPLERS[name][1], s_churn=0.0)
    assert (plain - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_large_churn_with_noise_matches_algorithm_2(name):
    noise = noise_clip(1)
    out, calls = run_vdiff(name, noise, seed=7, s_churn=1000.0)
    expected, expected_calls = reference(noise, GRID, SAMPLERS[name][1], s_churn=1000.0, seed=7)
    assert calls == pytest.approx(expected_calls, rel=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_only_inside_the_s_tmin_s_tmax_window(name):
    noise = noise_clip(2)
    window = dict(s_churn=1000.0, s_tmin=0.3, s_tmax=5.0)
    out, calls = run_vdiff(name, noise, seed=3, **window)
    expected, expected_calls = reference(noise, GRID, SAMPLERS[name][1], seed=3, **window)
    assert calls == pytest.approx(expected_calls, rel=1e-12)
    churned = {round(c / math.sqrt(2.0), 9) for c in calls} & {round(s, 9) for s in GRID}
    assert churned == {4.0, 1.3, 0.4}  # exactly the steps whose sigma lies in [0.3, 5]
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_churn_through_edm_preconditioning_feeds_the_network_sigma_hat():
    """End to end through EDMDiffusion: the network's c_noise is ln(sigma_hat) / 4 at every first
    evaluation of a step, and a float32 run agrees with the float64 reference."""
    precond = EDMPrecond(sigma_data=0.5)
    seen: list[float] = []

    def net(x_in, c_noise, cond, given_mask):
        seen.append(float(c_noise[0]))
        sigma = (4.0 * c_noise).exp().view(-1, 1, 1, 1, 1).to(x_in.dtype)
        c_skip, c_out, c_in, _ = precond(sigma)
        x = x_in / c_in
        return (gaussian_denoiser(x, sigma) - c_skip * x) / c_out  # F such that D is the Gaussian's

    noise = noise_clip(3, torch.float32)
    out = heun_sample(EDMDiffusion(precond), net, noise, {}, sigmas=torch.tensor(GRID), s_churn=1000.0, s_noise=0.0)
    expected, expected_calls = reference(noise, GRID, 2, s_churn=1000.0, s_noise=0.0)
    assert [math.exp(4.0 * c) for c in seen] == pytest.approx(expected_calls, rel=1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
