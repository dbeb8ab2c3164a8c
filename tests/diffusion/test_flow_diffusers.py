"""Flow matching against diffusers' ``FlowMatchEulerDiscreteScheduler`` (test-only dependency).

With SD3's/diffusers' grid (``t_min = shift_time(1/1000, shift)``), vdiff's time grid equals the scheduler's
sigmas, the network sees the scheduler's timesteps, and every Euler step lands where the scheduler's does.
"""

from __future__ import annotations

import pytest
import torch

from vdiff.diffusion.flow import FlowMatching, flow_times, shift_time
from vdiff.diffusion.flow_samplers import flow_euler_sample

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

SETTINGS = [(1.0, 1), (1.0, 10), (3.0, 28), (3.0, 7), (0.5, 12)]  # (shift, steps)


def _scheduler(shift: float, steps: int) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def _diffusers_grid(shift: float, steps: int) -> torch.Tensor:
    return flow_times(steps, shift, t_min=shift_time(1.0 / 1000, shift))


@pytest.mark.parametrize(("shift", "steps"), SETTINGS)
def test_time_grid_equals_the_scheduler_sigmas(shift, steps):
    scheduler = _scheduler(shift, steps)
    ours = _diffusers_grid(shift, steps)
    assert ours.shape == scheduler.sigmas.shape == (steps + 1,)
    assert torch.allclose(ours.float(), scheduler.sigmas, rtol=0, atol=1e-6), (ours, scheduler.sigmas)
    assert torch.allclose((ours[:-1] * 1000).float(), scheduler.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shift_equals_the_scheduler_training_sigmas(shift):
    """The scheduler's 1000 training sigmas are ``shift_time`` of ``1 .. 1/1000``."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = torch.linspace(1000, 1, 1000, dtype=torch.float64) / 1000
    assert torch.allclose(shift_time(unshifted, shift).float(), scheduler.sigmas, rtol=0, atol=1e-6)


class RecordingNet:
    """A deterministic, nonlinear velocity that depends on the time: ``tanh(x) * (1 + noise_level / 1000) - 0.3 x``."""

    def __init__(self) -> None:
        self.levels: list[float] = []

    def __call__(self, x, noise_level, cond=None, given_mask=None):
        self.levels.append(float(noise_level.flatten()[0]))
        return torch.tanh(x) * (1 + noise_level.float().view(-1, *([1] * (x.ndim - 1))) / 1000) - 0.3 * x


@pytest.mark.parametrize(("shift", "steps"), SETTINGS)
def test_euler_steps_equal_the_scheduler_steps(shift, steps):
    noise = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = _scheduler(shift, steps)
    theirs_net, x = RecordingNet(), noise.clone()
    for timestep in scheduler.timesteps:
        x = scheduler.step(theirs_net(x, timestep.expand(x.shape[0])), timestep, x).prev_sample
    ours_net = RecordingNet()
    ours = flow_euler_sample(FlowMatching(shift=shift), ours_net, noise, {}, steps=steps, t_min=shift_time(1e-3, shift))
    assert ours_net.levels == pytest.approx(theirs_net.levels, rel=1e-6, abs=1e-4)
    assert torch.allclose(ours, x, rtol=1e-5, atol=1e-5), float((ours - x).abs().max())


def test_training_path_equals_the_scheduler_scale_noise():
    """``x_t = (1 - t) x0 + t eps``: the scheduler's ``scale_noise`` at its timesteps."""
    scheduler = _scheduler(3.0, 10)
    x0 = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 4, 9])
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[index], eps)
    ours = FlowMatching().add_noise(x0, eps, scheduler.sigmas[index])
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
