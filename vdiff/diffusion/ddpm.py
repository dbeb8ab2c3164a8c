"""Discrete-time Gaussian diffusion (DDPM): beta schedules, q/posterior, prediction types,
learned-range variance with the hybrid MSE + VB loss, and timestep respacing.

Facts followed (written here, not copied): Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021
(improved DDPM: cosine schedule, learned-range variance, hybrid loss, respacing), Salimans & Ho
2022 (v-prediction). VDT uses linear betas, 1000 steps, eps-prediction and learned sigma.

Conventions
-----------
* Tensors are video ``(B, T, C, H, W)``; one timestep per clip, ``t`` is ``(B,)`` long, an index
  into THIS diffusion's schedule (``0 .. num_timesteps - 1``; 0 is the least noisy step).
* Schedules are held in float64 on the CPU and converted to the input's device/dtype on use.
* The network is called through the denoiser contract (``vdiff/diffusion/common.py``) with
  ``noise_level = network_timesteps(t)``: a float32 ``(B,)`` tensor holding the ORIGINAL integer
  timestep index (``0 .. 999`` for a 1000-step base process). For a respaced diffusion the index is
  mapped back through ``timestep_map``, so a network trained on the 1000-step process sees the
  timesteps it was trained on.
* With ``learn_sigma`` the network outputs ``2C`` channels (dim 2): the prediction, then a value
  ``v`` in ``[-1, 1]`` interpolating the log variance between the posterior variance (``v = -1``)
  and beta (``v = +1``) — improved DDPM's (and diffusers') "learned_range".
* ``v``-prediction target: ``v = sqrt(ab) * eps - sqrt(1 - ab) * x0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from vdiff.diffusion.common import DenoiserNetwork, masked_mean, replace_given

BetaSchedule = Literal["linear", "cosine", "scaled_linear"]
Prediction = Literal["eps", "v", "x0"]

__all__ = [
    "BetaSchedule",
    "GaussianDiffusion",
    "Prediction",
    "discretized_gaussian_log_likelihood",
    "make_betas",
    "normal_kl",
    "respacing_timesteps",
]

_PREDICTIONS = ("eps", "v", "x0")
_SCHEDULE_NAMES = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)


# ----------------------------------------------------------------------------------------------
# Beta schedules
# ----------------------------------------------------------------------------------------------


def make_betas(
    schedule: BetaSchedule, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Return the betas ``(num_timesteps,)`` float64 of a named schedule.

    linear: ``linspace(beta_start, beta_end)`` (DDPM, VDT). scaled_linear: ``linspace(sqrt(beta_start),
    sqrt(beta_end)) ** 2`` (Stable Diffusion uses 0.00085 / 0.012). cosine: improved DDPM's
    ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2`` discretised, betas capped at 0.999
    (diffusers "squaredcos_cap_v2"; beta_start/beta_end are ignored).
    """
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"make_betas: num_timesteps must be a positive int, got {num_timesteps!r}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"make_betas: schedule must be 'linear', 'cosine' or 'scaled_linear', got {schedule!r}")


# ----------------------------------------------------------------------------------------------
# Gaussian likelihood helpers (elementwise, natural log)
# ----------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-likelihood (nats) of data ``x`` in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2).

    The edge bins extend to -inf / +inf (improved DDPM's decoder term). Uses the exact normal CDF
    (improved DDPM uses a tanh approximation) with ``log_ndtr`` in the tails for stability.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_delta = torch.log(cdf_delta.clamp_min(1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ----------------------------------------------------------------------------------------------
# Respacing specs
# ----------------------------------------------------------------------------------------------


def _even_sections(num_timesteps: int, counts: Sequence[int]) -> list[int]:
    """Improved DDPM's section respacing: split [0, N) into len(counts) equal parts, take counts[i]
    evenly spaced steps (first and last of the part included) from part i."""
    size, extra = divmod(num_timesteps, len(counts))
    taken: list[int] = []
    start = 0
    for index, count in enumerate(counts):
        part = size + (1 if index < extra else 0)
        if count < 1 or count > part:
            raise ValueError(f"respaced: cannot take {count} steps from a section of {part} timesteps (num_timesteps={num_timesteps}, sections={list(counts)})")
        if count == 1:
            taken.append(start + part - 1 if len(counts) == 1 else start)
        else:
            stride = (part - 1) / (count - 1)
            taken.extend(start + round(j * stride) for j in range(count))
        start += part
    return taken


def respacing_timesteps(num_timesteps: int, steps: int | str | Sequence[int]) -> list[int]:
    """The sorted subset of timesteps ``[0, num_timesteps)`` a respacing spec keeps.

    ``steps``:
      * ``int n`` or ``"n"``: n evenly spaced steps including 0 and ``num_timesteps - 1``
        (improved DDPM's integer spec, = diffusers "linspace"); ``"a,b,c"``: improved DDPM sections.
        A single step keeps only the noisiest timestep.
      * ``"ddimN"``: ``range(0, num_timesteps, stride)`` with the stride giving exactly N steps
        (improved DDPM; equals diffusers "leading" with ``steps_offset=0`` when N divides num_timesteps).
      * ``"trailingN"``: ``round(arange(num_timesteps, 0, -num_timesteps / N)) - 1`` (diffusers
        "trailing"; starts at the noisiest timestep, Lin et al. 2024).
      * a sequence of ints: those timesteps.
    """
    n = num_timesteps
    if isinstance(steps, bool):
        raise TypeError(f"respaced: steps must be an int, str or sequence of ints, got {steps!r}")
    if isinstance(steps, int):
        if steps < 1 or steps > n:
            raise ValueError(f"respaced: steps must be in [1, {n}], got {steps}")
        return sorted(set(_even_sections(n, [steps])))
    if isinstance(steps, str):
        spec = steps.strip().lower()
        match = re.fullmatch(r"(ddim|trailing)(\d+)", spec)
        if match:
            kind, count = match.group(1), int(match.group(2))
            if count < 1 or count > n:
                raise ValueError(f"respaced: {steps!r} asks for {count} steps, must be in [1, {n}]")
            if kind == "ddim":
                for stride in range(1, n + 1):
                    if len(range(0, n, stride)) == count:
                        return list(range(0, n, stride))
                raise ValueError(f"respaced: no integer stride gives exactly {count} steps out of {n} ({steps!r}); use 'trailing{count}' or {count}")
            step_ratio = n / count
            picked = torch.round(torch.arange(n, 0, -step_ratio, dtype=torch.float64)).long() - 1
            return sorted(set(picked.tolist()))
        if re.fullmatch(r"\d+(,\d+)*", spec):
            return sorted(set(_even_sections(n, [int(c) for c in spec.split(",")])))
        raise ValueError(f"respaced: cannot parse steps {steps!r}; expected e.g. 50, '250', '10,15,20', 'ddim50' or 'trailing50'")
    picked = sorted({int(s) for s in steps})
    if not picked or picked[0] < 0 or picked[-1] >= n:
        raise ValueError(f"respaced: explicit timesteps must be non-empty and within [0, {n}), got {list(steps)}")
    return picked


# ----------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A DDPM forward process with its posterior, the model's prediction type and its loss.

    num_timesteps / beta_schedule / beta_start / beta_end: see :func:`make_betas`; ``betas`` (float
    ``(N,)``) overrides them. prediction: what the network outputs, "eps", "v" or "x0".
    learn_sigma: the network also outputs the learned-range variance value (``2C`` channels) and the
    loss adds the VB term. vb_weight: factor on the VB term; None = ``num_timesteps / 1000``
    (improved DDPM's rescaling, 1 for the 1000-step process VDT trains). timestep_map: for respaced
    processes, the original timestep of every index (set by :meth:`respaced`).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        prediction: Prediction = "eps",
        learn_sigma: bool = False,
        vb_weight: float | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        betas: Tensor | Sequence[float] | None = None,
        timestep_map: Tensor | Sequence[int] | None = None,
    ) -> None:
        if prediction not in _PREDICTIONS:
            raise ValueError(f"GaussianDiffusion: prediction must be one of {_PREDICTIONS}, got {prediction!r}")
        if betas is None:
            betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("GaussianDiffusion: betas must be a non-empty vector with every value in (0, 1]")
        self.num_timesteps = int(betas.numel())
        self.beta_schedule = beta_schedule
        self.prediction: Prediction = prediction
        self.learn_sigma = bool(learn_sigma)
        self._vb_weight_arg = vb_weight
        self.vb_weight = float(vb_weight) if vb_weight is not None else self.num_timesteps / 1000.0
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).flatten().cpu()
        if self.timestep_map.numel() != self.num_timesteps:
            raise ValueError(f"GaussianDiffusion: timestep_map has {self.timestep_map.numel()} entries for {self.num_timesteps} timesteps")

        # All float64, (N,).
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance with the 0 at t=0 replaced by the t=1 value (improved DDPM).
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else self.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._device_cache: dict[tuple[str, torch.device], Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"prediction={self.prediction!r}, learn_sigma={self.learn_sigma}, vb_weight={self.vb_weight})"
        )

    # -- schedule access ---------------------------------------------------------------------

    def schedule_at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule ``name`` (e.g. "alphas_cumprod", "alphas_cumprod_prev", "betas", "posterior_variance")
        at ``t`` (B,), as ``like``'s dtype/device, shaped to broadcast over it. Values are taken from
        the float64 table, so coefficients keep full precision until the final cast."""
        if name not in _SCHEDULE_NAMES:
            raise KeyError(f"GaussianDiffusion: no schedule {name!r}; known: {sorted(_SCHEDULE_NAMES)}")
        key = (name, t.device)
        table = self._device_cache.get(key)
        if table is None:
            table = getattr(self, name)
            # MPS has no float64; everything else keeps the float64 table and casts after indexing.
            table = table.to(t.device, torch.float32 if t.device.type == "mps" else torch.float64)
            self._device_cache[key] = table
        values = table[t.long()].to(like.dtype)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def _check_t(self, t: Tensor, batch: int) -> Tensor:
        if t.shape != (batch,):
            raise ValueError(f"GaussianDiffusion: t must be one timestep per clip, shape ({batch},), got {tuple(t.shape)}")
        return t.long()

    def network_timesteps(self, t: Tensor) -> Tensor:
        """The ``noise_level`` passed to the network: original timestep indices, float32 ``(B,)``."""
        return self.timestep_map.to(t.device)[t.long()].to(torch.float32)

    def sample_timesteps(self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Uniform training timesteps, one per clip: ``(batch,)`` long."""
        draw_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_device).to(device)

    # -- forward process and posterior --------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``; x0, noise ``(B, T, C, H, W)``, t ``(B,)``."""
        ab = self.schedule_at("alphas_cumprod", t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x0)``."""
        mean = self.schedule_at("posterior_mean_coef1", t, x_t) * x0 + self.schedule_at("posterior_mean_coef2", t, x_t) * x_t
        variance = self.schedule_at("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.schedule_at("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- prediction-type conversions ---------------------------------------------------------

    def split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into (prediction ``(B,T,C,H,W)``, variance value or None)."""
        channels = x_t.shape[2]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.ndim != x_t.ndim or model_output.shape[2] != expected:
            raise ValueError(
                f"GaussianDiffusion: network output has shape {tuple(model_output.shape)}, expected "
                f"{expected} channels on dim 2 for input {tuple(x_t.shape)} (learn_sigma={self.learn_sigma})"
            )
        if self.learn_sigma:
            prediction, var_values = model_output.split(channels, dim=2)
            return prediction, var_values
        return model_output, None

    def predict_x0(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 estimate from the network's prediction (its ``prediction`` type, C channels)."""
        if self.prediction == "x0":
            return prediction
        ab = self.schedule_at("alphas_cumprod", t, x_t)
        if self.prediction == "eps":
            return (x_t - (1.0 - ab).sqrt() * prediction) / ab.sqrt()
        return ab.sqrt() * x_t - (1.0 - ab).sqrt() * prediction

    def predict_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """eps estimate from the network's prediction."""
        if self.prediction == "eps":
            return prediction
        ab = self.schedule_at("alphas_cumprod", t, x_t)
        if self.prediction == "v":
            return ab.sqrt() * prediction + (1.0 - ab).sqrt() * x_t
        return self.eps_from_x0(prediction, x_t, t)

    def predict_v(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """v estimate from the network's prediction."""
        if self.prediction == "v":
            return prediction
        ab = self.schedule_at("alphas_cumprod", t, x_t)
        x0 = self.predict_x0(prediction, x_t, t)
        eps = self.predict_eps(prediction, x_t, t)
        return ab.sqrt() * eps - (1.0 - ab).sqrt() * x0

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The eps consistent with ``x_t`` and an x0 estimate."""
        ab = self.schedule_at("alphas_cumprod", t, x_t)
        return (x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt()

    def output_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Express an x0 estimate as this process's prediction type (no variance channels).

        Useful to wrap an x0 denoiser (e.g. a closed-form one) as a network of this process."""
        if self.prediction == "x0":
            return x0
        eps = self.eps_from_x0(x0, x_t, t)
        if self.prediction == "eps":
            return eps
        ab = self.schedule_at("alphas_cumprod", t, x_t)
        return ab.sqrt() * eps - (1.0 - ab).sqrt() * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output for ``x_t = q_sample(x0, t, noise)``."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        ab = self.schedule_at("alphas_cumprod", t, x0)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0

    # -- reverse process ---------------------------------------------------------------------

    def model_log_variance(self, var_values: Tensor | None, x_t: Tensor, t: Tensor) -> Tensor:
        """Log variance of ``p(x_{t-1} | x_t)``: learned range from ``var_values`` in [-1, 1]
        (log posterior variance at -1, log beta at +1) or, without learned sigma, the (clipped)
        log posterior variance ("fixed_small")."""
        min_log = self.schedule_at("posterior_log_variance_clipped", t, x_t)
        if var_values is None:
            return min_log.expand_as(x_t)
        max_log = self.schedule_at("betas", t, x_t).log()
        frac = (var_values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_x0: float | None = None, clamp_var_values: bool = False
    ) -> dict[str, Tensor]:
        """The reverse step distribution ``p(x_{t-1} | x_t)`` from a network output.

        model_output: ``(B, T, C or 2C, H, W)``; x_t ``(B, T, C, H, W)``; t ``(B,)`` index into this
        process. clip_x0: clamp the x0 estimate to ``[-clip_x0, clip_x0]`` (eps is then recomputed
        from the clipped x0). clamp_var_values: clamp the learned-range value to [-1, 1] (samplers
        use it: CFG may extrapolate it out of range).
        Returns dict with "mean", "variance", "log_variance" (all ``(B,T,C,H,W)``), "x0", "eps".
        """
        t = self._check_t(t, x_t.shape[0])
        prediction, var_values = self.split_output(model_output, x_t)
        prediction = prediction.to(x_t.dtype)
        if var_values is not None:
            var_values = var_values.to(x_t.dtype)
            if clamp_var_values:
                var_values = var_values.clamp(-1.0, 1.0)
        log_variance = self.model_log_variance(var_values, x_t, t)
        x0 = self.predict_x0(prediction, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = self.eps_from_x0(x0, x_t, t)
        else:
            eps = self.predict_eps(prediction, x_t, t)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "x0": x0, "eps": eps}

    # -- training ----------------------------------------------------------------------------

    def vb_terms(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Elementwise VB term in bits ``(B, T, C, H, W)``: KL(q posterior || p) for t > 0, the
        discretised decoder NLL at t = 0 (improved DDPM's L_vlb terms, before averaging)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        first = (t == 0).reshape((-1,) + (1,) * (x0.ndim - 1))
        return torch.where(first, nll, kl) / math.log(2.0)

    def training_losses(
        self,
        net: DenoiserNetwork,
        x0: Tensor,
        cond: dict[str, Tensor],
        given_mask: Tensor | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The DDPM loss for a batch of clean clips ``x0 (B, T, C, H, W)``.

        One timestep per clip (``t`` ``(B,)``, drawn uniformly when None). Given content
        (``given_mask`` true, broadcastable to x0) replaces the noisy input, and every term averages
        over generated elements only (per clip, then over the clips that generate anything).
        Returns the keys every vdiff process returns (:data:`~vdiff.diffusion.common.LOSS_KEYS`):
        scalars "loss" = "mse" + "vb": "mse" against the prediction type's target; "vb" is improved
        DDPM's variational bound term with the mean stop-gradiented (it trains the variance only),
        times ``vb_weight``; 0 without ``learn_sigma``. "loss_per_clip" ``(B,)``, "noise_level" the
        timesteps ``(B,)`` and "denoised" the x0 estimate ``(B, T, C, H, W)`` from the prediction, with its
        gradient (for loss terms a module adds on it; the variance output does not enter it).
        """
        if x0.ndim != 5:
            raise ValueError(f"training_losses: x0 must be (B, T, C, H, W), got {tuple(x0.shape)}")
        batch = x0.shape[0]
        if given_mask is not None:
            if given_mask.dtype != torch.bool:
                raise TypeError(f"training_losses: given_mask must be bool (true = given), got {given_mask.dtype}")
            torch.broadcast_shapes(given_mask.shape, x0.shape)
        if t is None:
            t = self.sample_timesteps(batch, x0.device, generator)
        t = self._check_t(t, batch).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator is not None else x0.device, dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        net_input = replace_given(x_t, x0, given_mask)
        model_output = net(net_input, self.network_timesteps(t), cond, given_mask)
        prediction, var_values = self.split_output(model_output, x0)

        target = self.target(x0, noise, t)
        mse = masked_mean((target.float() - prediction.float()) ** 2, given_mask)  # (B,)
        if var_values is not None:
            frozen = torch.cat([prediction.detach(), var_values], dim=2).float()
            vb = masked_mean(self.vb_terms(frozen, x0.float(), x_t.float(), t), given_mask) * self.vb_weight
        else:
            vb = torch.zeros_like(mse)

        if given_mask is None:
            weights = torch.ones_like(mse)
        else:
            generated = ~given_mask.expand(torch.broadcast_shapes(given_mask.shape, x0.shape))
            weights = generated.flatten(1).any(dim=1).to(mse.dtype)
        denom = weights.sum().clamp_min(1.0)
        mse_mean = (mse * weights).sum() / denom
        vb_mean = (vb * weights).sum() / denom
        denoised = replace_given(self.predict_x0(prediction, x_t, t), x0, given_mask)
        return {
            "loss": mse_mean + vb_mean,
            "loss_per_clip": mse + vb,
            "mse": mse_mean,
            "vb": vb_mean,
            "noise_level": t,
            "denoised": denoised,
        }

    # -- respacing ---------------------------------------------------------------------------

    def respaced(self, steps: int | str | Sequence[int]) -> GaussianDiffusion:
        """A process over a subset of this one's timesteps (see :func:`respacing_timesteps`).

        Betas are recomputed so the kept timesteps have the same ``alphas_cumprod``; the network
        still sees the original timestep indices (``timestep_map`` composes with this one's).
        """
        kept = respacing_timesteps(self.num_timesteps, steps)
        kept_t = torch.tensor(kept, dtype=torch.long)
        alphas_cumprod = self.alphas_cumprod[kept_t]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / previous
        return GaussianDiffusion(
            beta_schedule=self.beta_schedule,
            prediction=self.prediction,
            learn_sigma=self.learn_sigma,
            vb_weight=self._vb_weight_arg,
            betas=betas,
            timestep_map=self.timestep_map[kept_t],
        )
