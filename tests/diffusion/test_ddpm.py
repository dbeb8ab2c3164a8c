"""GaussianDiffusion: conversions, masked hybrid loss, respacing, and given-content handling in samplers."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.diffusion.common import LOSS_KEYS
from vdiff.diffusion.ddpm import GaussianDiffusion, discretized_gaussian_log_likelihood, make_betas, normal_kl
from vdiff.diffusion.ddpm_samplers import ancestral_sample, ddim_sample
from vdiff.diffusion.guidance import VanillaCFG

SHAPE = (2, 4, 3, 4, 4)  # (B, T, C, H, W)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class RecordingNet:
    """A small deterministic network (fixed random 1x1 channel mix) that records its calls."""

    def __init__(self, channels: int = 3, out_channels: int = 3, seed: int = 0) -> None:
        self.weight = _randn(out_channels, channels, seed=seed) * 0.3
        self.calls: list[dict] = []

    def __call__(self, x, noise_level, cond, given_mask):
        self.calls.append({"x": x.clone(), "noise_level": noise_level.clone(), "given_mask": given_mask, "cond": cond})
        scale = 1.0 + noise_level.float().reshape(-1, 1, 1, 1, 1) / 1000.0
        return torch.einsum("oc,btchw->btohw", self.weight, x) * scale


# -- schedules and conversions ------------------------------------------------------------------


def test_make_betas_shapes_and_errors():
    for schedule in ("linear", "cosine", "scaled_linear"):
        betas = make_betas(schedule, 100)
        assert betas.shape == (100,) and betas.dtype == torch.float64
        assert bool((betas > 0).all() and (betas < 1).all())
    assert make_betas("linear", 10)[0] == pytest.approx(1e-4) and make_betas("linear", 10)[-1] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="schedule"):
        make_betas("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="score")  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_round_trip(prediction):
    diffusion = GaussianDiffusion(1000, prediction=prediction)
    x0, noise = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    t = torch.tensor([3, 777])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.target(x0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0(target, x_t, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.predict_eps(target, x_t, t), noise, atol=1e-4, rtol=1e-4)
    ab = diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(diffusion.predict_v(target, x_t, t), v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.output_from_x0(x0, x_t, t), target, atol=1e-3, rtol=1e-3)


def test_q_sample_marginal():
    diffusion = GaussianDiffusion(1000)
    x0 = torch.full((64, 4, 3, 8, 8), 0.7)
    t = torch.full((64,), 500)
    x_t = diffusion.q_sample(x0, t, _randn(64, 4, 3, 8, 8))
    ab = float(diffusion.alphas_cumprod[500])
    assert float(x_t.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert float(x_t.std()) == pytest.approx(math.sqrt(1 - ab), rel=0.01)


def test_normal_kl_and_decoder_likelihood():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 0.5])
    lv1, lv2 = torch.tensor([-1.0, 0.2]), torch.tensor([-0.5, -2.0])
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    # bins of a narrow Gaussian centred on a bin hold all mass; the edge bins extend to infinity
    x = torch.tensor([0.0, -1.0, 1.0])
    ll = discretized_gaussian_log_likelihood(x, x.clone(), torch.full((3,), math.log(1e-4)))
    torch.testing.assert_close(ll, torch.zeros(3), atol=1e-6, rtol=0)
    far = discretized_gaussian_log_likelihood(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([0.0]))
    assert float(far) == pytest.approx(math.log(1 - 0.5 * math.erfc(4 / math.sqrt(2))), abs=1e-4)


# -- losses -------------------------------------------------------------------------------------


def test_loss_ignores_given_elements_and_sees_clean_given_input():
    diffusion = GaussianDiffusion(1000)
    x0, noise = _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4)
    t = torch.tensor([10, 900])
    given_mask = torch.zeros(SHAPE[0], SHAPE[1], 1, 1, 1, dtype=torch.bool)
    given_mask[:, :2] = True

    def net_a(x, noise_level, cond, mask):
        return torch.zeros_like(x)

    def net_b(x, noise_level, cond, mask):  # wildly wrong on given frames only
        return torch.where(mask, torch.full_like(x, 100.0), torch.zeros_like(x))

    loss_a = diffusion.training_losses(net_a, x0, {}, given_mask, noise=noise, t=t)
    loss_b = diffusion.training_losses(net_b, x0, {}, given_mask, noise=noise, t=t)
    torch.testing.assert_close(loss_a["loss"], loss_b["loss"])
    torch.testing.assert_close(loss_a["mse"], (noise[:, 2:] ** 2).mean())
    assert float(loss_a["vb"]) == 0.0  # no learned sigma

    net = RecordingNet()
    diffusion.training_losses(net, x0, {"y": torch.ones(2)}, given_mask, noise=noise, t=t)
    seen = net.calls[0]["x"]
    torch.testing.assert_close(seen[:, :2], x0[:, :2], rtol=0, atol=0)  # given frames enter clean
    torch.testing.assert_close(seen[:, 2:], diffusion.q_sample(x0, t, noise)[:, 2:])
    assert net.calls[0]["noise_level"].dtype == torch.float32
    assert net.calls[0]["noise_level"].tolist() == [10.0, 900.0]
    assert net.calls[0]["given_mask"] is given_mask


def test_loss_averages_over_generated_elements_per_clip():
    """A clip with 3 of 4 frames given averages over its 1 generated frame, weighing like a clip
    that generates all 4 frames."""
    diffusion = GaussianDiffusion(1000)
    x0, noise = _randn(*SHAPE, seed=5), _randn(*SHAPE, seed=6)
    t = torch.tensor([100, 200])
    given_mask = torch.zeros(SHAPE[0], SHAPE[1], 1, SHAPE[3], SHAPE[4], dtype=torch.bool)
    given_mask[0, :3] = True  # clip 0: frames 0-2 given, frame 3 generated; clip 1: all generated
    losses = diffusion.training_losses(lambda x, n, c, m: torch.zeros_like(x), x0, {}, given_mask, noise=noise, t=t)
    expected = 0.5 * ((noise[0, 3] ** 2).mean() + (noise[1] ** 2).mean())
    torch.testing.assert_close(losses["loss"], expected)

    # a clip with nothing to generate does not dilute the batch mean
    all_given = given_mask.clone()
    all_given[1] = True
    losses = diffusion.training_losses(lambda x, n, c, m: torch.zeros_like(x), x0, {}, all_given, noise=noise, t=t)
    torch.testing.assert_close(losses["loss"], (noise[0, 3] ** 2).mean())


def test_hybrid_loss_stops_gradient_to_mean_and_masks_vb():
    diffusion = GaussianDiffusion(1000, learn_sigma=True)
    x0, noise = _randn(*SHAPE, seed=7).clamp(-1, 1), _randn(*SHAPE, seed=8)
    t = torch.tensor([0, 500])  # covers the decoder NLL (t = 0) and a KL term
    given_mask = torch.zeros(SHAPE[0], SHAPE[1], 1, 1, 1, dtype=torch.bool)
    given_mask[:, 0] = True
    output = torch.zeros(SHAPE[0], SHAPE[1], 2 * SHAPE[2], SHAPE[3], SHAPE[4], requires_grad=True)
    losses = diffusion.training_losses(lambda x, n, c, m: output, x0, {}, given_mask, noise=noise, t=t)
    assert set(losses) == set(LOSS_KEYS) and losses["loss"].ndim == 0
    assert losses["loss_per_clip"].shape == (SHAPE[0],) and torch.equal(losses["noise_level"], t)
    assert losses["denoised"].shape == x0.shape and torch.equal(losses["denoised"][:, 0], x0[:, 0])
    assert torch.isfinite(losses["vb"]) and float(losses["vb"].detach()) > 0
    (grad,) = torch.autograd.grad(losses["vb"], output)
    assert float(grad[:, :, :3].abs().max()) == 0.0  # mean channels: stop-gradient
    assert float(grad[:, 1:, 3:].abs().max()) > 0.0  # variance channels of generated frames learn
    assert float(grad[:, 0].abs().max()) == 0.0  # given frames contribute nothing
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_is_zero_for_the_exact_posterior():
    """If the model's mean and variance equal q(x_{t-1} | x_t, x0), the KL term vanishes."""
    diffusion = GaussianDiffusion(1000, learn_sigma=True)
    x0, noise = _randn(*SHAPE, seed=9), _randn(*SHAPE, seed=10)
    t = torch.tensor([1, 600])
    x_t = diffusion.q_sample(x0, t, noise)
    # v = -1 selects the (clipped) posterior log variance; eps = noise gives the exact mean
    output = torch.cat([noise, -torch.ones_like(noise)], dim=2)
    vb = diffusion.vb_terms(output, x0, x_t, t)
    assert float(vb.abs().max()) < 1e-3
    vb_wrong = diffusion.vb_terms(torch.cat([noise, torch.ones_like(noise)], dim=2), x0, x_t, t)
    assert float(vb_wrong.mean()) > 1e-3


def test_vb_weight_follows_num_timesteps():
    assert GaussianDiffusion(1000, learn_sigma=True).vb_weight == 1.0
    assert GaussianDiffusion(4000, learn_sigma=True).vb_weight == 4.0
    assert GaussianDiffusion(1000, learn_sigma=True, vb_weight=0.001).vb_weight == 0.001


def test_output_channel_errors_are_clear():
    diffusion = GaussianDiffusion(1000, learn_sigma=True)
    with pytest.raises(ValueError, match="6 channels on dim 2"):
        diffusion.training_losses(lambda x, n, c, m: x, _randn(*SHAPE), {})
    with pytest.raises(ValueError, match="one timestep per clip"):
        diffusion.training_losses(lambda x, n, c, m: x, _randn(*SHAPE), {}, t=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="bool"):
        GaussianDiffusion(10).training_losses(lambda x, n, c, m: x, _randn(*SHAPE), {}, given_mask=torch.ones(2, 4, 1, 1, 1))


# -- respacing ----------------------------------------------------------------------------------


def test_respacing_keeps_alphas_cumprod_and_composes_maps():
    base = GaussianDiffusion(1000, beta_schedule="cosine", prediction="v", learn_sigma=True)
    respaced = base.respaced("ddim50")
    assert respaced.num_timesteps == 50 and respaced.timestep_map.tolist() == list(range(0, 1000, 20))
    torch.testing.assert_close(respaced.alphas_cumprod, base.alphas_cumprod[respaced.timestep_map], rtol=1e-12, atol=0)
    assert respaced.prediction == "v" and respaced.learn_sigma
    nested = respaced.respaced(5)  # 5 of the 50 kept steps, mapped to the original indices
    assert nested.timestep_map.tolist() == [0, 240, 480, 740, 980]  # round(24.5) = 24: round half to even, as improved DDPM
    torch.testing.assert_close(nested.alphas_cumprod, base.alphas_cumprod[nested.timestep_map], rtol=1e-12, atol=0)
    assert base.respaced("10,5").timestep_map.tolist() == [0, 55, 111, 166, 222, 277, 333, 388, 444, 499, 500, 625, 750, 874, 999]
    assert base.respaced([999, 0, 500]).timestep_map.tolist() == [0, 500, 999]
    assert base.respaced(1).timestep_map.tolist() == [999]
    for bad in ("ddim0", "fast", "2000", 0, 1001, [1000]):
        with pytest.raises(ValueError):
            base.respaced(bad)
    with pytest.raises(ValueError, match="no integer stride"):
        base.respaced("ddim600")


def test_training_on_respaced_process_passes_original_timesteps():
    respaced = GaussianDiffusion(1000).respaced("ddim10")
    net = RecordingNet()
    respaced.training_losses(net, _randn(*SHAPE), {}, t=torch.tensor([0, 9]))
    assert net.calls[0]["noise_level"].tolist() == [0.0, 900.0]


# -- samplers: given content and guidance -------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddim_eta", "ancestral"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_given_content_is_exact_in_samples_and_enters_clean(sampler, learn_sigma):
    diffusion = GaussianDiffusion(1000, learn_sigma=learn_sigma)
    net = RecordingNet(out_channels=6 if learn_sigma else 3)
    given = _randn(*SHAPE, seed=11) * 3  # values far outside what the sampler would produce
    given_mask = torch.zeros(SHAPE[0], SHAPE[1], 1, SHAPE[3], SHAPE[4], dtype=torch.bool)
    given_mask[:, :2] = True
    given_mask[1, 3, :, :2, :2] = True  # a spatial patch too
    noise = _randn(*SHAPE, seed=12)
    kwargs = dict(given=given, given_mask=given_mask, steps=8, generator=torch.Generator().manual_seed(0))
    if sampler == "ancestral":
        sample = ancestral_sample(diffusion, net, noise, {}, **kwargs)
    else:
        sample = ddim_sample(diffusion, net, noise, {}, eta=0.5 if sampler == "ddim_eta" else 0.0, **kwargs)
    mask = given_mask.expand(SHAPE)
    assert torch.equal(sample[mask], given[mask])  # bit for bit
    assert not torch.equal(sample[~mask], given[~mask])
    assert len(net.calls) == 8
    for call in net.calls:
        assert torch.equal(call["x"][mask], given[mask])  # pasted in before every step
        assert call["given_mask"] is given_mask
    levels = [c["noise_level"][0].item() for c in net.calls]
    assert levels == diffusion.respaced(8).timestep_map.flip(0).float().tolist()
    assert levels[0] == 999.0 and levels[-1] == 0.0


def test_sampling_is_reproducible_with_a_generator():
    diffusion = GaussianDiffusion(1000, learn_sigma=True)
    net = RecordingNet(out_channels=6)
    noise = _randn(*SHAPE, seed=13)
    a = ancestral_sample(diffusion, net, noise, {}, steps=5, generator=torch.Generator().manual_seed(3))
    b = ancestral_sample(diffusion, net, noise, {}, steps=5, generator=torch.Generator().manual_seed(3))
    c = ancestral_sample(diffusion, net, noise, {}, steps=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d1 = ddim_sample(diffusion, net, noise, {}, steps=5)
    d2 = ddim_sample(diffusion, net, noise, {}, steps=5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(d1, d2)  # eta = 0 is deterministic


def test_guidance_runs_one_batched_call_and_combines_per_frame():
    diffusion = GaussianDiffusion(1000)
    noise = _randn(*SHAPE, seed=14)

    def net(x, noise_level, cond, given_mask):
        return x * 0.1 + cond["y"].reshape(-1, 1, 1, 1, 1)

    calls = []

    def counting(x, noise_level, cond, given_mask):
        calls.append(x.shape[0])
        return net(x, noise_level, cond, given_mask)

    cond, uncond = {"y": torch.ones(2)}, {"y": torch.zeros(2)}
    guided = ddim_sample(diffusion, counting, noise, cond, uncond=uncond, guidance=VanillaCFG(3.0), steps=4)
    assert calls == [4, 4, 4, 4]  # uncond and cond halves stacked once per step

    def manual(x, noise_level, c, given_mask):  # u + 3 (c - u) by hand
        u = net(x, noise_level, uncond, given_mask)
        return u + 3.0 * (net(x, noise_level, cond, given_mask) - u)

    torch.testing.assert_close(guided, ddim_sample(diffusion, manual, noise, cond, steps=4))
    plain = ddim_sample(diffusion, net, noise, cond, uncond=uncond, guidance=VanillaCFG(1.0), steps=4)
    torch.testing.assert_close(plain, ddim_sample(diffusion, net, noise, cond, steps=4), rtol=1e-5, atol=1e-5)


def test_sampler_input_errors():
    diffusion = GaussianDiffusion(100)
    net = RecordingNet()
    noise = _randn(*SHAPE)
    with pytest.raises(ValueError, match="together"):
        ddim_sample(diffusion, net, noise, {}, given=noise)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(diffusion, net, noise, {}, eta=-1.0)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        ancestral_sample(diffusion, net, noise[0], {})
    with pytest.raises(TypeError, match="bool"):
        ddim_sample(diffusion, net, noise, {}, given=noise, given_mask=torch.ones(SHAPE))
