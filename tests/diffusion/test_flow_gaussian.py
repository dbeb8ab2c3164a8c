"""Closed-form check of the flow-matching samplers on Gaussian data.

For data ``x0 ~ N(mu, s^2)`` (elementwise) on the path ``x_t = (1 - t) x0 + t eps``, ``x_t`` is Gaussian with mean
``m_t = (1 - t) mu`` and variance ``V_t = (1 - t)^2 s^2 + t^2``, and the optimal velocity is exact:

    v*(x, t) = E[eps - x0 | x_t = x] = (t - (1 - t) s^2) / V_t * (x - m_t) - mu.

The ODE ``dx/dt = v*`` keeps ``(x_t - m_t) / sqrt(V_t)`` constant, so it maps the noise ``z`` at t = 1 to
``mu + s z`` at t = 0. Any bug in the time grid, the shift, the step rules or the network-time convention shows
up as a wrong mean or std of the samples, as samples off that exact map, or as the wrong order of convergence.

Step counts, computed for this data (sample std; the target is 0.3): Euler 100 steps 0.2943, 200 0.2971, 400 0.2986
without shift; with shift 3 (fewer steps near t = 0, where this narrow data bends the paths most) 200 steps 0.2934,
400 0.2967. Heun 20 steps 0.2966 without shift; with shift 3, 20 steps 0.2690 and 100 steps 0.2986. The step counts
below keep the exact discretization error near 1% or less under the 2% bound.
"""

from __future__ import annotations

import pytest
import torch

from tests.diffusion.test_gaussian_edm import one_thread, stratified_normal  # noqa: F401  one_thread: autouse fixture
from vdiff.diffusion.flow import FlowMatching
from vdiff.diffusion.flow_samplers import flow_euler_sample, flow_heun_sample

MU, STD = 0.5, 0.3
SHAPE = (16, 2, 2, 16, 16)  # 16,384 samples


class OptimalGaussianVelocity:
    """The exact velocity of Gaussian data, reading its time from ``noise_level / time_scale``."""

    def __init__(self, time_scale: float = 1000.0, mu: float = MU, std: float = STD) -> None:
        self.time_scale, self.mu, self.std = time_scale, mu, std
        self.times: list[float] = []

    def __call__(self, x, noise_level, cond, given_mask):
        t = (noise_level.double() / self.time_scale).view(-1, 1, 1, 1, 1)
        self.times.append(float(t.flatten()[0]))
        var = (1 - t) ** 2 * self.std**2 + t**2
        gain = (t - (1 - t) * self.std**2) / var
        return (gain * (x.double() - (1 - t) * self.mu) - self.mu).to(x.dtype)


def _check_moments(samples: torch.Tensor, tol: float = 0.02) -> None:
    mean, std = samples.mean().item(), samples.std().item()
    assert abs(mean - MU) < tol * MU, f"sample mean {mean:.4f}, expected {MU} within {tol:.0%}"
    assert abs(std - STD) < tol * STD, f"sample std {std:.4f}, expected {STD} within {tol:.0%}"


@pytest.mark.parametrize(
    ("sampler", "steps", "shift"),
    [(flow_euler_sample, 200, 1.0), (flow_euler_sample, 400, 3.0), (flow_heun_sample, 20, 1.0), (flow_heun_sample, 100, 3.0)],
    ids=["euler", "euler-shift3", "heun", "heun-shift3"],
)
def test_sampler_recovers_gaussian_moments(sampler, steps, shift):
    noise = stratified_normal(SHAPE, seed=0)
    net = OptimalGaussianVelocity()
    samples = sampler(FlowMatching(shift=shift), net, noise, {}, steps=steps)
    assert samples.shape == SHAPE
    _check_moments(samples)
    assert len(net.times) == (steps if sampler is flow_euler_sample else 2 * steps - 1)


def test_few_step_euler_is_measurably_off():
    """The moment check can fail: 3 Euler steps on this data miss the std by more than 2%."""
    samples = flow_euler_sample(FlowMatching(), OptimalGaussianVelocity(), stratified_normal(SHAPE, seed=0), {}, steps=3)
    with pytest.raises(AssertionError, match="sample std"):
        _check_moments(samples)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_deterministic_heun_matches_exact_ode_map(shift):
    """Per sample, Heun with 200 steps lands on the exact ODE map ``mu + s z``."""
    noise = torch.randn(4, 1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples = flow_heun_sample(FlowMatching(shift=shift), OptimalGaussianVelocity(), noise, {}, steps=200)
    exact = MU + STD * noise
    assert torch.allclose(samples, exact, rtol=0, atol=2e-3), float((samples - exact).abs().max())


def test_the_network_sees_the_process_time_scale():
    """A process with another ``time_scale`` hands the network ``time_scale * t``; the exact velocity reading it
    with that scale still samples the target (a network reading it with the default 1000 would not)."""
    noise = stratified_normal(SHAPE, seed=0)
    _check_moments(flow_heun_sample(FlowMatching(time_scale=1.0), OptimalGaussianVelocity(time_scale=1.0), noise, {}, steps=20))
    wrong = flow_heun_sample(FlowMatching(time_scale=1.0), OptimalGaussianVelocity(time_scale=1000.0), noise, {}, steps=20)
    with pytest.raises(AssertionError):
        _check_moments(wrong)


@pytest.mark.parametrize(("sampler", "order"), [(flow_euler_sample, 1), (flow_heun_sample, 2)])
def test_order_of_convergence(sampler, order):
    """Doubling the steps divides the distance to the exact map by 2 (Euler) or 4 (Heun): the step rules are the
    first- and second-order methods they claim to be."""
    noise = torch.randn(4, 1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = MU + STD * noise
    errors = [
        float((sampler(FlowMatching(), OptimalGaussianVelocity(), noise, {}, steps=steps) - exact).abs().max())
        for steps in (50, 100, 200)
    ]
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.85 < coarse / fine < 2**order * 1.15, errors
