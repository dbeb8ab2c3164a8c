"""Flow matching: the shift, the training times, the loss against a float64 re-derivation, given content,
guidance, the sampler dispatch and checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.diffusion.common import LOSS_KEYS
from vdiff.diffusion.flow import FlowMatching, LogitNormalTime, UniformTime, flow_times, shift_time
from vdiff.diffusion.flow_samplers import flow_euler_sample, flow_heun_sample
from vdiff.diffusion.guidance import LinearCFG, VanillaCFG
from vdiff.diffusion.masks import task_mask
from vdiff.diffusion.sampling import SamplerConfig, check_sampler, default_sampler, sample


class LinearNet:
    """A fixed velocity network ``a x + b * noise_level / 1000 + c * cond["c"]`` that records its inputs."""

    def __init__(self, a: float = 0.7, b: float = -0.4, c: float = 1.0) -> None:
        self.a, self.b, self.c = a, b, c
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x, noise_level, cond, given_mask):
        self.calls.append((x.clone(), noise_level.clone(), given_mask))
        level = noise_level.to(x.dtype).view(-1, 1, 1, 1, 1) / 1000
        out = self.a * x + self.b * level
        if "c" in cond:
            out = out + self.c * cond["c"].to(x.dtype).view(-1, 1, 1, 1, 1)
        return out


# ------------------------------------------------------------------------------------------- shift and time grid


def test_shift_formula():
    t = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.25, 3.0) == pytest.approx(3 * 0.25 / (1 + 2 * 0.25))
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())  # toward noise
    assert bool((shift_time(t, 0.5)[1:-1] < t[1:-1]).all())  # toward data
    # the signal-to-noise ratio ((1 - t) / t)^2 is divided by shift^2
    snr = ((1 - t[1:-1]) / t[1:-1]) ** 2
    assert torch.allclose(((1 - shifted[1:-1]) / shifted[1:-1]) ** 2, snr / 9.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="shift must be"):
            shift_time(t, bad)


def test_flow_times_grid():
    assert torch.allclose(flow_times(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = flow_times(4, shift=3.0)
    assert torch.allclose(shifted[:-1], shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), 3.0))
    assert shifted[-1] == 0
    assert torch.equal(flow_times(1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(flow_times(3, t_min=0.1), torch.tensor([1.0, 0.55, 0.1, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        flow_times(0)
    with pytest.raises(ValueError, match=r"t_min must be in \(0, 1\]"):
        flow_times(4, t_min=0.0)


# ------------------------------------------------------------------------------------------- training times


def test_logit_normal_and_uniform_times():
    n = 200_000
    t = LogitNormalTime(0.5, 0.8)(n, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)
    u = UniformTime()(n, generator=torch.Generator().manual_seed(0))
    assert bool(((u >= 0) & (u < 1)).all())
    assert u.mean().item() == pytest.approx(0.5, abs=0.005) and u.var().item() == pytest.approx(1 / 12, abs=0.002)
    with pytest.raises(ValueError, match="LogitNormalTime"):
        LogitNormalTime(0.0, -1.0)


def test_training_times_are_shifted():
    """The process draws its time sampler's times and shifts them: same generator, ``shift_time`` of the draw."""
    sampler = LogitNormalTime(0.0, 1.0)
    plain = sampler(64, generator=torch.Generator().manual_seed(3))
    shifted = FlowMatching(sampler, shift=3.0).sample_times(64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(shifted, shift_time(plain, 3.0))
    assert bool((shifted > plain).all())
    assert torch.equal(FlowMatching(sampler).sample_times(64, generator=torch.Generator().manual_seed(3)), plain)


# ------------------------------------------------------------------------------------------- the loss


def test_loss_equals_float64_rederivation():
    """Every LOSS_KEYS entry against the formulas in float64, with a given mask over part of the clip."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 5, 6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.1, 0.5, 0.93])
    given_mask = task_mask("prediction", 4, 5, 6, batch=3, given_frames=1)
    given_mask[2] = True  # a clip with nothing to generate: contributes 0
    net = LinearNet()
    process = FlowMatching()
    losses = process.training_losses(net, x0, {}, given_mask, noise=noise, t=t)
    assert set(LOSS_KEYS) <= set(losses)

    x0d, nd, td = x0.double(), noise.double(), t.double().view(-1, 1, 1, 1, 1)
    x_t = torch.where(given_mask, x0d, (1 - td) * x0d + td * nd)
    seen_x, seen_level, seen_mask = net.calls[0]
    assert torch.allclose(seen_x.double(), x_t, atol=1e-5) and seen_mask is given_mask
    assert torch.allclose(seen_level.double(), t.double() * 1000, rtol=1e-7)  # network time: 1000 t
    v_hat = 0.7 * x_t - 0.4 * td
    squared = (v_hat - (nd - x0d)) ** 2
    generated = (~given_mask).expand_as(squared).double()
    per_clip = (squared * generated).flatten(1).sum(1) / generated.flatten(1).sum(1).clamp_min(1)
    assert per_clip[2] == 0
    assert torch.allclose(losses["loss_per_clip"].double(), per_clip, rtol=1e-5)
    assert losses["loss"].item() == pytest.approx(per_clip.mean().item(), rel=1e-5)
    assert losses["mse"].item() == pytest.approx(per_clip.mean().item(), rel=1e-5)
    assert losses["vb"].item() == 0 and torch.equal(losses["noise_level"], t)
    denoised = torch.where(given_mask, x0d, x_t - td * v_hat)
    assert torch.allclose(losses["denoised"].double(), denoised, atol=1e-5)
    assert torch.equal(losses["denoised"][given_mask.expand_as(x0)], x0[given_mask.expand_as(x0)])
    assert torch.allclose(process.denoise(net, x_t.float(), t, {}, given_mask).double(), x_t - td * v_hat, atol=1e-5)


def test_perfect_velocity_has_zero_loss_and_exact_x0():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 2, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def oracle(x, noise_level, cond, given_mask):
        return noise - x0

    losses = FlowMatching().training_losses(oracle, x0, {}, noise=noise, generator=g)
    assert losses["loss"].item() < 1e-12
    assert torch.allclose(losses["denoised"], x0, atol=1e-5)
    assert bool(((losses["noise_level"] > 0) & (losses["noise_level"] < 1)).all())


def test_loss_trains_a_velocity_in_bf16_with_float32_error():
    net = torch.nn.Conv3d(2, 2, 1)

    def wrapped(x, noise_level, cond, given_mask):
        return net(x.transpose(1, 2)).transpose(1, 2)

    x0 = torch.randn(2, 3, 2, 4, 4).bfloat16()
    net.bfloat16()
    losses = FlowMatching().training_losses(wrapped, x0, {}, generator=torch.Generator().manual_seed(0))
    assert losses["loss"].dtype == torch.float32
    losses["loss"].backward()
    assert net.weight.grad is not None and bool(net.weight.grad.abs().sum() > 0)


def test_weight_gives_x0_errors_the_velocity_loss_scale():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 2, 1, 3, 3, generator=g), torch.randn(2, 2, 1, 3, 3, generator=g)
    t = torch.tensor([0.2, 0.7])
    process = FlowMatching()
    losses = process.training_losses(LinearNet(), x0, {}, noise=noise, t=t)
    x0_error = ((losses["denoised"] - x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(process.weight(t) * x0_error, losses["loss_per_clip"], rtol=1e-4)


def test_bad_inputs_fail_with_one_clear_line():
    process, x0 = FlowMatching(), torch.zeros(2, 3, 1, 4, 4)
    with pytest.raises(ValueError, match=r"flow times must lie in \[0, 1\]"):
        process.training_losses(LinearNet(), x0, {}, t=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"one time per clip"):
        process.training_losses(LinearNet(), x0, {}, t=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="expected the velocity"):
        process.training_losses(lambda x, *a: x[:, :, :0], x0, {})
    with pytest.raises(ValueError, match="time_scale"):
        FlowMatching(time_scale=0)
    with pytest.raises(ValueError, match="FlowMatching: shift"):
        FlowMatching(shift=-2)


# ------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", [flow_euler_sample, flow_heun_sample])
def test_given_content_enters_clean_and_is_returned_exactly(sampler):
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 5, 3, 4, 4, generator=g)
    given = torch.randn(noise.shape, generator=g)
    given_mask = task_mask("interpolation", 5, 4, 4, batch=2, step=2)
    net = LinearNet()
    out = sampler(FlowMatching(), net, noise, {}, given=given, given_mask=given_mask, steps=4)
    where = given_mask.expand_as(noise)
    assert torch.equal(out[where], given[where])
    assert len(net.calls) == (4 if sampler is flow_euler_sample else 7)
    for x, _, mask in net.calls:
        assert mask is given_mask and torch.equal(x[where], given[where])


    def frame_mixing(x, noise_level, cond, mask):  # each frame's velocity reads the clip's mean frame
        return 0.5 * x + x.mean(dim=1, keepdim=True)

    conditioned = sampler(FlowMatching(), frame_mixing, noise, {}, given=given, given_mask=given_mask, steps=4)
    free = sampler(FlowMatching(), frame_mixing, noise, {}, steps=4)
    assert not torch.allclose(free[~where], conditioned[~where])  # the given content conditioned the rest


def test_euler_steps_follow_the_shifted_grid():
    net = LinearNet()
    noise = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    out = flow_euler_sample(FlowMatching(shift=3.0), net, noise, {}, steps=3)
    grid = flow_times(3, shift=3.0)
    assert [float(level) for _, level, _ in net.calls] == pytest.approx([float(t) * 1000 for t in grid[:-1]])
    x = noise.double()
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        x = x + (t_next - t) * (0.7 * x - 0.4 * t)
    assert torch.allclose(out.double(), x, atol=1e-5)
    # the sampler's own shift overrides the process's
    net_override = LinearNet()
    flow_euler_sample(FlowMatching(shift=3.0), net_override, noise, {}, steps=3, shift=1.0)
    assert [float(level) for _, level, _ in net_override.calls] == pytest.approx([1000.0, 2000 / 3, 1000 / 3])


@pytest.mark.parametrize("guidance", [VanillaCFG(2.5), LinearCFG(1.0, 3.0)])
def test_guidance_mixes_the_velocities_per_frame(guidance):
    """One Euler step from t = 1: ``x0 = noise - (u + s[f] (c - u))``, the velocities of both branches mixed with
    the schedule's per-frame scale, in one batched network call."""
    noise = torch.randn(2, 4, 1, 3, 3, generator=torch.Generator().manual_seed(6))
    cond, uncond = {"c": torch.tensor([1.0, -2.0])}, {"c": torch.zeros(2)}
    net = LinearNet()
    out = flow_euler_sample(FlowMatching(), net, noise, cond, uncond=uncond, guidance=guidance, steps=1)
    assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 4  # uncond and cond stacked
    v_uncond = 0.7 * noise - 0.4
    v_cond = v_uncond + cond["c"].view(-1, 1, 1, 1, 1)
    scale = guidance.scale(4).view(1, 4, 1, 1, 1)
    assert torch.allclose(out, noise - (v_uncond + scale * (v_cond - v_uncond)), atol=1e-6)


def test_sampler_dispatch_and_config():
    process = FlowMatching(shift=2.0)
    assert default_sampler(process) == SamplerConfig(name="flow_euler", steps=50)
    for name in ("ddim", "euler"):
        with pytest.raises(ValueError, match=r"does not sample a FlowMatching process; use one of \['flow_euler', 'flow_heun'\]"):
            check_sampler(process, SamplerConfig(name=name))
    from vdiff.diffusion.edm import EDMDiffusion

    with pytest.raises(ValueError, match="does not sample a EDMDiffusion"):
        check_sampler(EDMDiffusion(), SamplerConfig(name="flow_heun"))
    with pytest.raises(ValueError, match="shift must be"):
        SamplerConfig(name="flow_euler", shift=0.0)
    assert SamplerConfig(name="flow_heun", steps=8, shift=3.0).describe() == "flow_heun, 8 steps, timestep shift 3.0"
    assert SamplerConfig(name="flow_euler", steps=8).describe() == "flow_euler, 8 steps, the process's timestep shift"
    noise = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(7))
    for name, low_level in (("flow_euler", flow_euler_sample), ("flow_heun", flow_heun_sample)):
        config = SamplerConfig(name=name, steps=3, shift=4.0)
        expected = low_level(process, LinearNet(), noise, {}, steps=3, shift=4.0)
        assert torch.equal(sample(process, LinearNet(), noise, {}, config), expected)


def test_times_grid_is_checked():
    with pytest.raises(ValueError, match="strictly decreasing"):
        flow_euler_sample(FlowMatching(), LinearNet(), torch.zeros(1, 1, 1, 2, 2), {}, times=torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        flow_heun_sample(FlowMatching(), LinearNet(), torch.zeros(1, 1, 1, 2, 2), {}, times=torch.tensor([2.0, 0.0]))


# ------------------------------------------------------------------------------------------- checkpoints


def test_flow_process_loads_from_a_checkpoint_without_running_code(tmp_path):
    """A module built in Python keeps its process in its hyperparameters: the safe loader must build it."""
    from vdiff.lit.safe_loading import load_checkpoint

    process = FlowMatching(UniformTime(), shift=3.0, time_scale=1.0)
    torch.save({"hyper_parameters": {"diffusion": process, "other": FlowMatching(LogitNormalTime(0.5, 1.5))}},
               tmp_path / "flow.ckpt")
    loaded = load_checkpoint(tmp_path / "flow.ckpt")["hyper_parameters"]
    assert repr(loaded["diffusion"]) == repr(process)
    assert repr(loaded["other"]) == "FlowMatching(time_sampler=LogitNormalTime(mean=0.5, std=1.5), shift=1.0, time_scale=1000.0)"
