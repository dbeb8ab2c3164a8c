"""Numerical parity of the DDPM/DDIM core with diffusers' schedulers (diffusers is test-only)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from vdiff.diffusion.ddpm import GaussianDiffusion, make_betas, respacing_timesteps  # noqa: E402
from vdiff.diffusion.ddpm_samplers import ancestral_step, ddim_step  # noqa: E402

PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SHAPE = (2, 3, 4, 5, 6)  # (B, T, C, H, W)


def _float64(scheduler):
    """diffusers keeps alphas_cumprod in float32, where ``1 - ab`` near t = 0 keeps only ~3 digits
    (steps differ from the exact float64 value by ~1e-4 there); recompute it in float64 from the
    scheduler's own betas so a comparison tests the formulas, not float32 rounding."""
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), dim=0)
    return scheduler


def _index_of(diffusion: GaussianDiffusion, timestep: int) -> torch.Tensor:
    """The index in ``diffusion`` whose original timestep is ``timestep``, as a (B,) tensor."""
    index = int((diffusion.timestep_map == timestep).nonzero().item())
    return torch.full((SHAPE[0],), index, dtype=torch.long)


@pytest.mark.parametrize(
    "ours, theirs, start, end",
    [
        ("linear", "linear", 1e-4, 0.02),
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
    ],
)
def test_same_betas_same_alphas_cumprod(ours, theirs, start, end):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=start, beta_end=end)
    diffusion = GaussianDiffusion(1000, beta_schedule=ours, beta_start=start, beta_end=end)
    torch.testing.assert_close(make_betas(ours, 1000, start, end).float(), scheduler.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(diffusion.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("spacing, ours", [("leading", "ddim50"), ("trailing", "trailing50")])
def test_respacing_matches_ddim_set_timesteps(spacing, ours):
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    scheduler.set_timesteps(50)
    respaced = GaussianDiffusion(1000).respaced(ours)
    assert respaced.num_timesteps == 50
    assert respaced.timestep_map.flip(0).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [7, 50, 200, 999])
def test_integer_respacing_matches_linspace(steps):
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    assert respacing_timesteps(1000, steps)[::-1] == scheduler.timesteps.tolist()
    assert respacing_timesteps(1000, str(steps))[::-1] == scheduler.timesteps.tolist()


@pytest.mark.parametrize("spacing, ours", [("trailing", "trailing30"), ("trailing", "trailing7")])
def test_trailing_respacing_uneven(spacing, ours):
    steps = int(ours.removeprefix("trailing"))
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert respacing_timesteps(1000, ours)[::-1] == scheduler.timesteps.tolist()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("spacing, spec", [("leading", "ddim50"), ("trailing", "trailing50")])
def test_ddim_step_matches_diffusers(prediction, eta, spacing, spec):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing=spacing,
        prediction_type=PREDICTION_NAMES[prediction],
    )
    scheduler.set_timesteps(50)
    _float64(scheduler)
    diffusion = GaussianDiffusion(1000, prediction=prediction).respaced(spec)
    gen = torch.Generator().manual_seed(0)
    for timestep in scheduler.timesteps[[0, 1, 25, -2, -1]].tolist():
        x = torch.randn(SHAPE, generator=gen)
        output = torch.randn(SHAPE, generator=gen)
        noise = torch.randn(SHAPE, generator=gen)
        theirs = scheduler.step(output, timestep, x, eta=eta, variance_noise=noise).prev_sample
        ours, _ = ddim_step(diffusion, output, x, _index_of(diffusion, timestep), eta=eta, noise=noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4, msg=f"t={timestep}")


def test_ddim_step_with_clipping_matches_clipped_model_output():
    scheduler = DDIMScheduler(clip_sample=True, clip_sample_range=1.0, steps_offset=0, set_alpha_to_one=True)
    scheduler.set_timesteps(50)
    diffusion = GaussianDiffusion(1000).respaced("ddim50")
    gen = torch.Generator().manual_seed(1)
    for timestep in (980, 500, 20):
        x = torch.randn(SHAPE, generator=gen) * 2
        output = torch.randn(SHAPE, generator=gen)
        theirs = scheduler.step(output, timestep, x, eta=0.0, use_clipped_model_output=True).prev_sample
        ours, x0 = ddim_step(diffusion, output, x, _index_of(diffusion, timestep), clip_x0=1.0)
        assert x0.abs().max() <= 1.0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_step_matches_diffusers(prediction):
    scheduler = _float64(DDPMScheduler(
        num_train_timesteps=1000, variance_type="fixed_small", clip_sample=False, prediction_type=PREDICTION_NAMES[prediction]
    ))
    diffusion = GaussianDiffusion(1000, prediction=prediction)
    gen = torch.Generator().manual_seed(2)
    for timestep in (999, 500, 1, 0):
        x = torch.randn(SHAPE, generator=gen)
        output = torch.randn(SHAPE, generator=gen)
        theirs = scheduler.step(output, timestep, x, generator=torch.Generator().manual_seed(timestep)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(timestep))
        ours, _ = ancestral_step(diffusion, output, x, torch.full((SHAPE[0],), timestep), noise=noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4, msg=f"t={timestep}")


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("respaced", [False, True])
def test_learned_range_variance_matches_diffusers(prediction, respaced):
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        variance_type="learned_range",
        clip_sample=False,
        prediction_type=PREDICTION_NAMES[prediction],
        timestep_spacing="leading",
        steps_offset=0,
    )
    _float64(scheduler)
    diffusion = GaussianDiffusion(1000, prediction=prediction, learn_sigma=True)
    timesteps = [999, 500, 1, 0]
    if respaced:
        scheduler.set_timesteps(50)  # DDPMScheduler then steps t -> t - 20
        diffusion = diffusion.respaced("ddim50")
        timesteps = [980, 500, 20, 0]
    batch, frames, channels, height, width = SHAPE
    gen = torch.Generator().manual_seed(3)
    for timestep in timesteps:
        x = torch.randn(SHAPE, generator=gen)
        prediction_part = torch.randn(SHAPE, generator=gen)
        var_values = torch.rand(SHAPE, generator=gen) * 2 - 1
        output = torch.cat([prediction_part, var_values], dim=2)  # (B, T, 2C, H, W)
        # diffusers splits channels on dim 1 of (N, 2C, H, W): fold time into the batch.
        theirs = scheduler.step(
            output.flatten(0, 1), timestep, x.flatten(0, 1), generator=torch.Generator().manual_seed(timestep)
        ).prev_sample.reshape(SHAPE)
        noise = torch.randn((batch * frames, channels, height, width), generator=torch.Generator().manual_seed(timestep))
        ours, _ = ancestral_step(diffusion, output, x, _index_of(diffusion, timestep), noise=noise.reshape(SHAPE))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4, msg=f"t={timestep}")
        if timestep > 0:
            t = _index_of(diffusion, timestep)
            log_var = diffusion.p_mean_variance(output, x, t)["log_variance"]
            theirs_log_var = scheduler._get_variance(timestep, predicted_variance=var_values)
            torch.testing.assert_close(log_var, theirs_log_var, rtol=1e-5, atol=1e-4)
