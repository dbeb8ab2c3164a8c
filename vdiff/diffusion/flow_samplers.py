"""Samplers for :class:`~vdiff.diffusion.flow.FlowMatching`: Euler and Heun on the flow ODE ``dx/dt = v(x, t)``.

Both integrate from ``t = 1`` (the standard-normal ``noise``) to ``t = 0`` over the shifted time grid
:func:`~vdiff.diffusion.flow.flow_times` (``steps`` times evenly spaced before the shift, then 0), or over
explicit ``times``. Euler: ``x' = x + (t' - t) v(x, t)``, one network call a step (diffusers'
``FlowMatchEulerDiscreteScheduler`` step). Heun: the Euler step corrected by the velocity at its end point,
``x' = x + (t' - t) (v(x, t) + v(x_euler, t')) / 2``, Euler on the last step to ``t = 0`` (Karras et al.
Algorithm 2), ``2 steps - 1`` calls. Both are deterministic.

The network sees ``noise_level = time_scale * t`` (1000 t by default), as in training. It is called only through
:func:`~vdiff.diffusion.guidance.guided_call`, so classifier-free guidance mixes the velocities with any
schedule of :mod:`vdiff.diffusion.guidance`. Given content is pasted into the sample before every network call,
so it always enters clean, and into the result, so it is returned exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vdiff.diffusion.common import DenoiserNetwork, check_sampler_inputs, replace_given
from vdiff.diffusion.flow import FlowMatching, flow_times
from vdiff.diffusion.guidance import Guidance, guided_call

__all__ = ["flow_euler_sample", "flow_heun_sample"]


@torch.no_grad()
def _flow_sample(
    order: int,
    process: FlowMatching,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    guidance: Guidance | None,
    given: Tensor | None,
    given_mask: Tensor | None,
    steps: int,
    shift: float | None,
    t_min: float | None,
    times: Tensor | None,
    progress: bool,
) -> Tensor:
    name = "flow_euler_sample" if order == 1 else "flow_heun_sample"
    check_sampler_inputs(noise, given, given_mask, name)
    if not isinstance(process, FlowMatching):
        raise TypeError(f"{name}: the process must be a FlowMatching, got {type(process).__name__}")
    if times is None:
        times = flow_times(steps, process.shift if shift is None else shift, t_min)
    grid = [float(t) for t in times.detach().cpu().double()]
    if len(grid) < 2 or grid[0] > 1.0 or grid[-1] < 0.0 or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{name}: times must lie in [0, 1], strictly decreasing, at least two, got {grid}")
    batch = noise.shape[0]
    time_dtype = torch.float32 if noise.device.type == "mps" else torch.float64

    def guided_net(x: Tensor, noise_level: Tensor, cond_: dict[str, Tensor], mask: Tensor | None) -> Tensor:
        return guided_call(net, x, noise_level, cond_, uncond, mask, guidance)

    def velocity_at(x: Tensor, t: float) -> Tensor:
        x = replace_given(x, given, given_mask)  # given content enters clean
        t_clip = torch.full((batch,), t, device=x.device, dtype=time_dtype)
        return process.velocity(guided_net, x, t_clip, cond, given_mask).to(x.dtype)

    x = noise
    for i in tqdm(range(len(grid) - 1), disable=not progress, desc=name):
        t, t_next = grid[i], grid[i + 1]
        v = velocity_at(x, t)  # (B, T, C, H, W)
        x_next = x + (t_next - t) * v
        if order == 2 and t_next > 0:
            v_next = velocity_at(x_next, t_next)
            x_next = x + (t_next - t) * 0.5 * (v + v_next)
        x = x_next
    return replace_given(x, given, given_mask)


def flow_euler_sample(
    process: FlowMatching,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    steps: int = 50,
    shift: float | None = None,
    t_min: float | None = None,
    times: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample clean clips ``(B, T, C, H, W)`` with Euler steps of the flow ODE (see the module docstring).

    process: the training process (its ``shift`` and ``time_scale``). net: the velocity network
    ``net(x, noise_level, cond, given_mask)``. noise: ``(B, T, C, H, W)`` standard normal, the sample at the
    grid's first time (1 unless ``times`` says otherwise). cond/uncond/guidance: classifier-free guidance
    (uncond None = none). given/given_mask: ``(B, T, C, H, W)`` content and bool mask (true = given), pasted
    in before every call and into the result. steps, shift (None = the process's), t_min:
    :func:`~vdiff.diffusion.flow.flow_times`; or ``times``, a decreasing grid in [0, 1] (one that stops above
    0 returns the sample at its last time).
    """
    return _flow_sample(1, process, net, noise, cond, uncond, guidance, given, given_mask, steps, shift, t_min, times, progress)


def flow_heun_sample(
    process: FlowMatching,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    steps: int = 25,
    shift: float | None = None,
    t_min: float | None = None,
    times: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample clean clips with Heun (2nd-order) steps of the flow ODE, Euler on the last step to t = 0.

    Arguments as :func:`flow_euler_sample`; ``2 * steps - 1`` network calls.
    """
    return _flow_sample(2, process, net, noise, cond, uncond, guidance, given, given_mask, steps, shift, t_min, times, progress)
