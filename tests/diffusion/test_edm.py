"""EDM training process: preconditioning identities, sigma sampling, loss weights, offset noise, masked loss."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.diffusion.edm import (
    EDMDiffusion,
    EDMPrecond,
    LogNormalSigma,
    PreconditionedDenoiser,
    VScalingPrecond,
    loss_weight,
    offset_noise,
)

SIGMAS = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0, 700.0], dtype=torch.float64)


def zero_net(x, noise_level, cond, given_mask):
    return torch.zeros_like(x)


class RecordingNet:
    """Returns a fixed function of its input and remembers what it was called with."""

    def __init__(self) -> None:
        self.inputs: list[tuple] = []

    def __call__(self, x, noise_level, cond, given_mask):
        self.inputs.append((x.clone(), noise_level.clone(), cond, given_mask))
        return torch.tanh(x) + 0.1 * noise_level.view(-1, 1, 1, 1, 1)


# --- preconditioning --------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_precond_matches_karras_table_1(sigma_data):
    c_skip, c_out, c_in, c_noise = EDMPrecond(sigma_data)(SIGMAS)
    for i, s in enumerate(SIGMAS.tolist()):
        sd = sigma_data
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)


def test_vscaling_precond_matches_svd_formulas():
    c_skip, c_out, c_in, c_noise = VScalingPrecond()(SIGMAS)
    for i, s in enumerate(SIGMAS.tolist()):
        assert c_skip[i].item() == pytest.approx(1 / (s**2 + 1), rel=1e-12)
        assert c_out[i].item() == pytest.approx(-s / math.sqrt(s**2 + 1), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + 1), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(0.25 * math.log(s), rel=1e-12)


def test_preconditionings_agree_at_unit_sigma_data_up_to_the_sign_of_c_out():
    a, b = EDMPrecond(1.0)(SIGMAS), VScalingPrecond()(SIGMAS)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], -b[1])
    torch.testing.assert_close(a[2], b[2])
    torch.testing.assert_close(a[3], b[3])


@pytest.mark.parametrize("precond", [EDMPrecond(0.5), VScalingPrecond()], ids=["edm", "vscaling"])
def test_zero_network_gives_c_skip_times_x(precond):
    x = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 40.0], dtype=torch.float64)
    out = PreconditionedDenoiser(precond).denoise(zero_net, x, sigma, {})
    c_skip = precond(sigma)[0].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(out, c_skip * x)


@pytest.mark.parametrize("precond", [EDMPrecond(0.5), VScalingPrecond()], ids=["edm", "vscaling"])
def test_denoiser_feeds_c_in_x_and_c_noise_and_combines_with_c_out(precond):
    x = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    net = RecordingNet()
    mask = torch.zeros(2, 3, 1, 1, 1, dtype=torch.bool)
    cond = {"y": torch.ones(2, 5)}
    out = EDMDiffusion(precond).denoise(net, x, sigma, cond, mask)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1, 1) for c in precond(sigma))
    seen_x, seen_level, seen_cond, seen_mask = net.inputs[0]
    torch.testing.assert_close(seen_x, c_in * x)
    torch.testing.assert_close(seen_level, c_noise.flatten())
    assert seen_cond is cond and seen_mask is mask
    torch.testing.assert_close(out, c_skip * x + c_out * (torch.tanh(c_in * x) + 0.1 * c_noise))


def test_denoiser_rejects_a_sigma_per_frame():
    with pytest.raises(ValueError, match="one per clip"):
        PreconditionedDenoiser(EDMPrecond()).denoise(zero_net, torch.zeros(2, 3, 1, 2, 2), torch.ones(2, 3), {})


# --- sigma sampling ---------------------------------------------------------------------------------


def test_log_normal_sigma_statistics():
    sigma = LogNormalSigma(0.7, 1.6)(20000, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (20000,)
    assert sigma.log().mean().item() == pytest.approx(0.7, abs=0.05)
    assert sigma.log().std().item() == pytest.approx(1.6, abs=0.05)


def test_training_uses_one_sigma_per_clip():
    """Every element of a clip is noised with the clip's sigma, and the network gets one level per clip."""
    diffusion = EDMDiffusion(EDMPrecond(0.5), LogNormalSigma(0.0, 1.0))
    x0 = torch.zeros(4, 6, 3, 5, 5, dtype=torch.float64)
    noise = torch.ones_like(x0)
    net = RecordingNet()
    out = diffusion.training_losses(net, x0, {}, noise=noise, generator=torch.Generator().manual_seed(0))
    sigma = out["noise_level"]
    assert sigma.shape == (4,)
    assert len(set(sigma.tolist())) == 4
    seen_x, seen_level, _, _ = net.inputs[0]
    assert seen_level.shape == (4,)
    # x_noisy = sigma * 1 everywhere, so c_in * x_noisy is one value per clip
    per_clip = seen_x.flatten(1)
    assert torch.all(per_clip == per_clip[:, :1])
    expected = (EDMPrecond(0.5)(sigma)[2] * sigma).to(per_clip.dtype)
    torch.testing.assert_close(per_clip[:, 0], expected)


# --- offset noise ----------------------------------------------------------------------------------


def test_offset_noise_shapes():
    shape = (2, 5, 3, 8, 8)
    assert offset_noise(shape, "clip").shape == (2, 1, 3, 1, 1)
    assert offset_noise(shape, "frame").shape == (2, 5, 3, 1, 1)
    with pytest.raises(ValueError, match="scope"):
        offset_noise(shape, "pixel")


@pytest.mark.parametrize("scope", ["clip", "frame"])
def test_offset_noise_in_training_noise(scope):
    """With a huge level, the noise is dominated by the offset: constant over H, W (per channel),
    the same for every frame only in the "clip" scope."""
    level = 1000.0
    diffusion = EDMDiffusion(offset_noise=level, offset_noise_scope=scope)
    x0 = torch.zeros(3, 6, 4, 16, 16)
    noise = diffusion.sample_noise(x0, torch.Generator().manual_seed(0)) / level
    spatial_spread = noise.std(dim=(3, 4))  # (B, T, C): the unit base noise / level
    assert spatial_spread.max().item() < 2e-3
    channel_spread = noise.mean(dim=(3, 4)).std(dim=2)  # per channel offsets differ
    assert channel_spread.min().item() > 0.05
    frame_spread = noise.mean(dim=(3, 4)).std(dim=1)  # (B, C) spread over frames
    if scope == "clip":
        assert frame_spread.max().item() < 2e-3
    else:
        assert frame_spread.min().item() > 0.05


def test_no_offset_noise_is_standard_normal():
    noise = EDMDiffusion().sample_noise(torch.zeros(8, 4, 4, 16, 16), torch.Generator().manual_seed(0))
    assert noise.mean().abs().item() < 0.02 and abs(noise.std().item() - 1) < 0.02


# --- loss weighting and the loss -------------------------------------------------------------------


def test_loss_weighting_formulas():
    s = SIGMAS
    torch.testing.assert_close(loss_weight("unit", s), torch.ones_like(s))
    torch.testing.assert_close(loss_weight("edm", s, 0.5), (s**2 + 0.25) / (s * 0.5) ** 2)
    torch.testing.assert_close(loss_weight("v", s), (s**2 + 1) / s**2)
    torch.testing.assert_close(loss_weight("eps", s), 1 / s**2)
    # EDM's weight is 1 / c_out^2: the loss on F has unit weight
    torch.testing.assert_close(loss_weight("edm", s, 0.5), EDMPrecond(0.5)(s)[1] ** -2)
    torch.testing.assert_close(loss_weight("v", s), VScalingPrecond()(s)[1] ** -2)
    with pytest.raises(ValueError, match="loss weighting"):
        EDMDiffusion(loss_weighting="snr")


@pytest.mark.parametrize("weighting", ["unit", "edm", "v", "eps"])
def test_loss_value_is_weighted_mse(weighting):
    diffusion = EDMDiffusion(EDMPrecond(0.5), loss_weighting=weighting)
    x0 = torch.randn(3, 2, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    net = RecordingNet()
    out = diffusion.training_losses(net, x0, {}, noise=noise, sigma=sigma)
    denoised = diffusion.denoise(RecordingNet(), x0 + sigma.view(-1, 1, 1, 1, 1) * noise, sigma, {})
    expected = loss_weight(weighting, sigma, 0.5) * ((denoised - x0) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out["loss_per_clip"], expected)
    torch.testing.assert_close(out["loss"], expected.mean())


def test_given_content_enters_clean_and_is_left_out_of_the_loss():
    diffusion = EDMDiffusion(EDMPrecond(0.5), loss_weighting="unit")
    x0 = torch.randn(2, 4, 1, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([2.0, 5.0], dtype=torch.float64)
    given_mask = torch.zeros(2, 4, 1, 1, 1, dtype=torch.bool)
    given_mask[0, :2] = True  # clip 0: frames 0-1 given; clip 1: nothing given
    net = RecordingNet()
    out = diffusion.training_losses(net, x0, {}, given_mask=given_mask, noise=noise, sigma=sigma)
    seen_x, _, _, seen_mask = net.inputs[0]
    c_in = EDMPrecond(0.5)(sigma)[2].view(-1, 1, 1, 1, 1)
    x_noisy = x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    expected_input = c_in * torch.where(given_mask, x0, x_noisy)  # clean where given, same c_in everywhere
    torch.testing.assert_close(seen_x, expected_input)
    assert seen_mask is given_mask
    error = (out["denoised"] - x0) ** 2
    torch.testing.assert_close(out["loss_per_clip"][0], error[0, 2:].mean())
    torch.testing.assert_close(out["loss_per_clip"][1], error[1].mean())


def test_masked_loss_ignores_given_elements_even_when_they_are_wrong():
    """A network that is perfect on generated elements and wrong on given ones has zero loss."""
    x0 = torch.randn(2, 4, 1, 3, 3, dtype=torch.float64)
    given_mask = torch.zeros(2, 4, 1, 3, 3, dtype=torch.bool)
    given_mask[:, 0] = True
    given_mask[:, 1, :, :2] = True  # a spatial block of frame 1 too
    precond = EDMPrecond(0.5)

    def oracle(x_in, noise_level, cond, mask):
        sigma = (4 * noise_level).exp().view(-1, 1, 1, 1, 1)
        c_skip, c_out, c_in, _ = precond(sigma)
        target = torch.where(given_mask, x0 + 100.0, x0)  # wrong wherever content is given
        return (target - c_skip * x_in / c_in) / c_out

    out = EDMDiffusion(precond).training_losses(oracle, x0, {}, given_mask=given_mask)
    assert out["loss"].item() < 1e-10
    out_all = EDMDiffusion(precond).training_losses(oracle, x0, {}, given_mask=None)
    assert out_all["loss"].item() > 1.0


def test_training_losses_backpropagates():
    net = torch.nn.Conv3d(2, 2, 1)

    def conv_net(x, noise_level, cond, given_mask):
        return net(x.transpose(1, 2)).transpose(1, 2)

    out = EDMDiffusion().training_losses(conv_net, torch.randn(2, 3, 2, 4, 4), {})
    out["loss"].backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# --- samplers: discretization and given content ------------------------------------------------------


def test_karras_sigmas_endpoints_and_order():
    from vdiff.diffusion.karras import karras_sigmas

    sigmas = karras_sigmas(25, 0.002, 700.0, 7.0)
    assert sigmas.shape == (26,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == pytest.approx(700.0) and sigmas[-2].item() == pytest.approx(0.002) and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    # rho = 1 is a linear ramp
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, 1.0, 0.5)


@pytest.mark.parametrize("sampler_name", ["euler_sample", "heun_sample"])
@pytest.mark.parametrize("s_churn", [0.0, 5.0])
def test_given_content_is_clean_at_every_call_and_exact_in_the_output(sampler_name, s_churn):
    from vdiff.diffusion import karras

    sampler = getattr(karras, sampler_name)
    precond = EDMPrecond(0.5)
    given = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    given_mask = torch.zeros(2, 5, 1, 4, 4, dtype=torch.bool)
    given_mask[:, :2] = True  # first two frames
    given_mask[1, 3, :, :2, :2] = True  # and a spatial block of frame 3 in clip 1
    seen: list[torch.Tensor] = []

    def net(x_in, noise_level, cond, mask):
        assert mask is given_mask
        sigma = (4 * noise_level).exp().view(-1, 1, 1, 1, 1)
        x = x_in / precond(sigma)[2]  # undo c_in
        seen.append(torch.where(given_mask.expand_as(x), x - given, torch.zeros_like(x)))
        return 0.5 * torch.tanh(x_in)

    noise = torch.randn_like(given)
    out = sampler(EDMDiffusion(precond), net, noise, {}, given=given, given_mask=given_mask, steps=6,
                  s_churn=s_churn, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(seen) == (6 if sampler_name == "euler_sample" else 11)
    for diff in seen:
        # the network saw the clean given content (float32 sigma rounding only; noise would show
        # as at least sigma_min * |noise| ~ 1e-3)
        assert diff.abs().max().item() < 1e-5
    mask = given_mask.expand_as(out)
    assert torch.equal(out[mask], given[mask])  # exactly, not approximately
    assert not torch.allclose(out[~mask], noise[~mask])


def test_sampler_accepts_a_plain_denoise_function_and_custom_sigmas():
    from vdiff.diffusion.karras import euler_sample

    diffusion = EDMDiffusion(EDMPrecond())
    calls: list[torch.Tensor] = []

    def denoise(net, x, sigma, cond, given_mask):
        calls.append(sigma.clone())
        return diffusion.denoise(net, x, sigma, cond, given_mask)

    noise = torch.randn(3, 2, 1, 2, 2)
    out = euler_sample(denoise, zero_net, noise, {}, sigmas=torch.tensor([10.0, 1.0, 0.0]))
    assert [c.tolist() for c in calls] == [[10.0] * 3, [1.0] * 3]  # one sigma per clip, (B,)
    # zero network: D = c_skip x, so each Euler step multiplies x by 1 + (s' - s)(1 - c_skip)/s
    factor = 1.0
    for s, s_next in [(10.0, 1.0), (1.0, 0.0)]:
        c_skip = 0.25 / (s**2 + 0.25)
        factor *= 1 + (s_next - s) * (1 - c_skip) / s
    torch.testing.assert_close(out, noise * 10.0 * factor)
    with pytest.raises(ValueError, match="decreasing"):
        euler_sample(diffusion, zero_net, noise, {}, sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="given"):
        euler_sample(diffusion, zero_net, noise, {}, given=noise)
    # the same input checks as the DDPM samplers (vdiff.diffusion.common.check_sampler_inputs)
    with pytest.raises(ValueError, match=r"sampler: noise must be \(B, T, C, H, W\)"):
        euler_sample(diffusion, zero_net, noise[0], {})
    with pytest.raises(ValueError, match="sampler: given has shape"):
        euler_sample(diffusion, zero_net, noise, {}, given=noise[:1], given_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(TypeError, match="sampler: given_mask must be bool"):
        euler_sample(diffusion, zero_net, noise, {}, given=noise, given_mask=torch.ones(noise.shape))


def test_edm_diffusion_builds_from_a_recipe_config():
    """Recipes name these classes through LightningCLI (jsonargparse class_path/init_args)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--diffusion", type=EDMDiffusion)
    config = {
        "class_path": "vdiff.diffusion.edm.EDMDiffusion",
        "init_args": {
            "precond": {"class_path": "vdiff.diffusion.edm.VScalingPrecond"},
            "sigma_sampler": {"class_path": "vdiff.diffusion.edm.LogNormalSigma", "init_args": {"p_mean": 1.0, "p_std": 1.6}},
            "loss_weighting": "v",
            "offset_noise": 0.02,
            "offset_noise_scope": "frame",
        },
    }
    import json

    diffusion = parser.instantiate(parser.parse_args(["--diffusion", json.dumps(config)])).diffusion
    assert isinstance(diffusion.precond, VScalingPrecond)
    assert (diffusion.sigma_sampler.p_mean, diffusion.sigma_sampler.p_std) == (1.0, 1.6)
    assert (diffusion.loss_weighting, diffusion.offset_noise, diffusion.offset_noise_scope) == ("v", 0.02, "frame")


def test_ddpm_and_edm_return_the_same_loss_keys():
    """A recipe can switch the process: both return exactly LOSS_KEYS, with the same shapes."""
    from vdiff.diffusion.common import LOSS_KEYS
    from vdiff.diffusion.ddpm import GaussianDiffusion

    x0 = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 3, 1, 1, 1, dtype=torch.bool)
    mask[:, 0] = True
    net = lambda x, n, c, m: 0.5 * x  # noqa: E731
    for process in (GaussianDiffusion(100), EDMDiffusion()):
        out = process.training_losses(net, x0, {}, mask)
        assert tuple(sorted(out)) == tuple(sorted(LOSS_KEYS)), type(process).__name__
        assert out["loss"].ndim == out["mse"].ndim == out["vb"].ndim == 0
        assert out["loss_per_clip"].shape == out["noise_level"].shape == (2,)
        assert out["denoised"].shape == x0.shape
        assert torch.equal(out["denoised"][:, 0], x0[:, 0])  # given content is the given content
