"""Sampler bug catcher: on Gaussian data the optimal denoiser is known in closed form, so DDIM and
ancestral sampling with it must recover the data mean and standard deviation."""

from __future__ import annotations

import pytest
import torch

from vdiff.diffusion.ddpm import GaussianDiffusion
from vdiff.diffusion.ddpm_samplers import ancestral_sample, ddim_sample

MU, STD = 0.5, 0.3
SHAPE = (4, 4, 4, 16, 16)  # 16384 independent elements: the std estimate's standard error is ~0.55 %


class GaussianOptimalDenoiser:
    """The exact denoiser of x0 ~ N(MU, STD^2) per element, speaking the process's prediction type.

    E[x0 | x_t] = mu + s^2 sqrt(ab) / (ab s^2 + 1 - ab) * (x_t - sqrt(ab) mu). With learned sigma it
    also outputs the learned-range value of the exact reverse variance
    Var[x_{t-1} | x_t] = posterior_var + coef1^2 * Var[x0 | x_t], Var[x0 | x_t] = s^2 (1 - ab) / (ab s^2 + 1 - ab).
    ``noise_level`` is the original timestep index, so everything is looked up in the base process.
    """

    def __init__(self, base: GaussianDiffusion, sampled: GaussianDiffusion) -> None:
        self.base = base
        self.sampled = sampled  # the respaced process the sampler steps through (for the variance)
        self.noise_levels: list[float] = []

    def __call__(self, x, noise_level, cond, given_mask):
        self.noise_levels.append(float(noise_level[0]))
        t_orig = noise_level.long()
        ab = self.base.alphas_cumprod[t_orig].reshape(-1, 1, 1, 1, 1)
        x64 = x.double()
        total_var = ab * STD**2 + 1 - ab
        x0 = MU + STD**2 * ab.sqrt() / total_var * (x64 - ab.sqrt() * MU)
        output = self.base.output_from_x0(x0, x64, t_orig)
        if not self.base.learn_sigma:
            return output.to(x.dtype)
        t = (self.sampled.timestep_map == t_orig[0]).nonzero().flatten().expand(x.shape[0])
        x0_var = STD**2 * (1 - ab) / total_var
        coef1 = self.sampled.posterior_mean_coef1[t].reshape(-1, 1, 1, 1, 1)
        true_log_var = torch.log(self.sampled.posterior_variance[t].reshape(-1, 1, 1, 1, 1) + coef1**2 * x0_var)
        min_log = self.sampled.posterior_log_variance_clipped[t].reshape(-1, 1, 1, 1, 1)
        max_log = self.sampled.betas[t].log().reshape(-1, 1, 1, 1, 1)
        var_values = (2 * (true_log_var - min_log) / (max_log - min_log) - 1).expand_as(x64)
        return torch.cat([output, var_values], dim=2).to(x.dtype)


def _standard_noise(seed: int) -> torch.Tensor:
    """Start noise standardised to mean 0 / std 1 exactly, so deterministic samplers carry no sampling error."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return (noise - noise.mean()) / noise.std()


def _predicted_std(base: GaussianDiffusion, steps: int, eta: float) -> float:
    """Std of the data a DDIM(eta) sampler with the exact denoiser produces from N(0, 1) noise,
    propagated in float64 through the linear maps of its steps (derived here from the original
    alphas_cumprod of the kept timesteps, independently of the sampler code). Ancestral sampling with
    the posterior variance is the eta = 1 case."""
    kept = base.respaced(steps).timestep_map.tolist()
    var = 1.0
    for index in range(len(kept) - 1, -1, -1):
        ab = float(base.alphas_cumprod[kept[index]])
        ab_prev = float(base.alphas_cumprod[kept[index - 1]]) if index > 0 else 1.0
        gain_x0 = STD**2 * ab**0.5 / (ab * STD**2 + 1 - ab)  # d x0_hat / d x_t
        gain_eps = (1 - ab**0.5 * gain_x0) / (1 - ab) ** 0.5  # d eps_hat / d x_t
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        gain = ab_prev**0.5 * gain_x0 + max(1 - ab_prev - sigma2, 0.0) ** 0.5 * gain_eps
        var = gain**2 * var + sigma2
    return var**0.5


def _assert_recovers(sample: torch.Tensor, label: str, std: float = STD, tol: float = 0.02) -> None:
    mean, got = float(sample.mean()), float(sample.std())
    assert abs(mean - MU) <= tol * MU, f"{label}: mean {mean:.4f} vs {MU}"
    assert abs(got - std) <= tol * std, f"{label}: std {got:.4f} vs {std:.4f}"


def _run(sampler: str, prediction: str, steps: int, eta: float, schedule: str = "linear") -> torch.Tensor:
    base = GaussianDiffusion(1000, beta_schedule=schedule, prediction=prediction)
    net = GaussianOptimalDenoiser(base, base.respaced(steps))
    noise = _standard_noise(0)
    generator = torch.Generator().manual_seed(1)
    if sampler == "ddim":
        sample = ddim_sample(base, net, noise, {}, steps=steps, eta=eta, generator=generator)
    else:
        sample = ancestral_sample(base, net, noise, {}, steps=steps, generator=generator)
    # the network saw the original timesteps of the respaced schedule, noisiest first
    assert net.noise_levels == base.respaced(steps).timestep_map.flip(0).float().tolist()
    return sample


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddim_matches_its_discretisation_exactly(prediction):
    """50 deterministic DDIM steps: the sample's std equals the float64 prediction of the
    discretised sampler (0.2745 for linear betas: few-step DDIM shrinks narrow data), mean exact."""
    sample = _run("ddim", prediction, 50, 0.0)
    _assert_recovers(sample, f"ddim50 {prediction}", std=_predicted_std(GaussianDiffusion(1000), 50, 0.0), tol=0.002)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler, eta", [("ddim", 1.0), ("ancestral", 0.0)])
def test_stochastic_samplers_match_their_discretisation(prediction, sampler, eta):
    sample = _run(sampler, prediction, 50, eta)
    _assert_recovers(sample, f"{sampler} eta={eta} {prediction}", std=_predicted_std(GaussianDiffusion(1000), 50, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize(
    "sampler, eta, steps, schedule",
    [("ddim", 0.0, 500, "linear"), ("ddim", 1.0, 1000, "cosine"), ("ancestral", 0.0, 1000, "cosine")],
)
def test_samplers_recover_gaussian_data(prediction, sampler, eta, steps, schedule):
    """With enough steps every sampler recovers the data mean and std within 2%. The discretisation
    bias (see _predicted_std) is -0.9% for 500 DDIM steps on linear betas; stochastic samplers with
    the posterior variance keep -1.2% even at 1000 linear steps (-0.6% on cosine betas, used here so
    the ~0.6% sampling noise of 16k elements cannot push a correct sampler past 2%)."""
    base = GaussianDiffusion(1000, beta_schedule=schedule)
    assert abs(_predicted_std(base, steps, 0.0 if eta == 0.0 and sampler == "ddim" else 1.0) / STD - 1) < 0.01
    _assert_recovers(_run(sampler, prediction, steps, eta, schedule), f"{sampler} eta={eta} steps={steps} {schedule} {prediction}")


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_with_learned_variance_is_exact_in_few_steps(prediction, schedule):
    """With the exact learned variance each Gaussian reverse step is exact, so even 10 steps recover
    the data; fixed-small variance in 10 steps does not (a check that the learned variance is used)."""
    base = GaussianDiffusion(1000, beta_schedule=schedule, prediction=prediction, learn_sigma=True)
    steps = 10
    net = GaussianOptimalDenoiser(base, base.respaced(steps))
    noise = _standard_noise(0)
    sample = ancestral_sample(base, net, noise, {}, steps=steps, generator=torch.Generator().manual_seed(1))
    _assert_recovers(sample, f"learned-sigma ancestral {schedule} {prediction}")

    fixed = GaussianDiffusion(1000, beta_schedule=schedule, prediction=prediction)
    fixed_net = GaussianOptimalDenoiser(fixed, fixed.respaced(steps))
    fixed_sample = ancestral_sample(fixed, fixed_net, noise, {}, steps=steps, generator=torch.Generator().manual_seed(1))
    assert abs(float(fixed_sample.std()) - STD) > 0.02 * STD, "fixed-small variance should be visibly off in 10 steps"
