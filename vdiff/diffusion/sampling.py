"""One entry point for sampling with any vdiff training process: :class:`SamplerConfig` + :func:`sample`.

A recipe names the sampler as data (``sampler: {name: ddim, steps: 50}``); :func:`sample` checks
that it fits the process (DDIM and ancestral steps belong to :class:`GaussianDiffusion`, Euler and
Heun to :class:`EDMDiffusion`, flow Euler and flow Heun to :class:`FlowMatching`) and calls it with the
given content and guidance. LightningModules sample through this, so they never branch on the process themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from vdiff.diffusion.common import DenoiserNetwork
from vdiff.diffusion.ddpm import GaussianDiffusion
from vdiff.diffusion.ddpm_samplers import ancestral_sample, ddim_sample
from vdiff.diffusion.edm import EDMDiffusion
from vdiff.diffusion.flow import FlowMatching
from vdiff.diffusion.flow_samplers import flow_euler_sample, flow_heun_sample
from vdiff.diffusion.guidance import Guidance
from vdiff.diffusion.karras import euler_sample, heun_sample

SamplerName = Literal["ddim", "ancestral", "euler", "heun", "flow_euler", "flow_heun"]
SAMPLERS_OF: dict[type, tuple[str, ...]] = {
    GaussianDiffusion: ("ddim", "ancestral"), EDMDiffusion: ("euler", "heun"), FlowMatching: ("flow_euler", "flow_heun"),
}


@dataclass
class SamplerConfig:
    """How to sample: the sampler and its settings (each used only by the samplers named beside it).

    name: ``ddim`` / ``ancestral`` (DDPM processes), ``euler`` / ``heun`` (EDM processes), ``flow_euler`` /
    ``flow_heun`` (flow matching).
    steps: sampler steps (DDPM: respaced timesteps; EDM: Karras sigmas; flow: shifted times).
    eta: DDIM stochasticity (0 = deterministic).
    clip_x0: clamp DDPM x0 estimates to ``[-clip_x0, clip_x0]`` (None = no clamp).
    sigma_min, sigma_max, rho: the Karras schedule (SVD: 0.002, 700, 7).
    s_churn: Karras churn (0 = the deterministic ODE).
    init_noise_scale: ``sigma`` (EDM) or ``svd`` (``sqrt(1 + sigma_max^2)``).
    shift: the flow samplers' timestep shift (:func:`~vdiff.diffusion.flow.shift_time`); None = the process's.
    """

    name: SamplerName = "ddim"
    steps: int = 50
    eta: float = 0.0
    clip_x0: float | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0
    init_noise_scale: Literal["sigma", "svd"] = "sigma"
    shift: float | None = None

    def __post_init__(self) -> None:
        if self.name not in get_args(SamplerName):
            raise ValueError(f"SamplerConfig: name must be one of {', '.join(get_args(SamplerName))}, got {self.name!r}")
        if int(self.steps) < 1:
            raise ValueError(f"SamplerConfig: steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"SamplerConfig: eta must be >= 0, got {self.eta}")
        if self.shift is not None and not 0 < self.shift < float("inf"):
            raise ValueError(f"SamplerConfig: shift must be a finite number > 0 (or null: the process's), got {self.shift}")

    def replace(self, **overrides: Any) -> SamplerConfig:
        """A copy with the non-None ``overrides`` applied (``None`` keeps the current value)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        """One line naming the settings that the named sampler uses."""
        if self.name == "ddim":
            extra = f", eta={self.eta}"
        elif self.name == "ancestral":
            extra = ""
        elif self.name in ("flow_euler", "flow_heun"):
            extra = f", timestep shift {self.shift}" if self.shift is not None else ", the process's timestep shift"
        else:
            extra = (
                f", sigma {self.sigma_min}..{self.sigma_max} rho={self.rho}, churn={self.s_churn}, "
                f"initial noise scale {self.init_noise_scale}"
            )
        clip = f", x0 clamped to +-{self.clip_x0}" if self.clip_x0 is not None and self.name in ("ddim", "ancestral") else ""
        return f"{self.name}, {self.steps} steps{extra}{clip}"


def default_sampler(process: Any) -> SamplerConfig:
    """The usual sampler of a process: DDIM 50 steps for DDPM, Euler 25 steps for EDM, flow Euler 50 steps
    (the process's shift) for flow matching."""
    if isinstance(process, EDMDiffusion):
        return SamplerConfig(name="euler", steps=25)
    if isinstance(process, FlowMatching):
        return SamplerConfig(name="flow_euler", steps=50)
    return SamplerConfig(name="ddim", steps=50)


def check_sampler(process: Any, config: SamplerConfig) -> None:
    """Raise a clear error unless ``config.name`` samples ``process``."""
    for kind, names in SAMPLERS_OF.items():
        if isinstance(process, kind):
            if config.name not in names:
                raise ValueError(
                    f"sampler {config.name!r} does not sample a {kind.__name__} process; use one of {list(names)}"
                )
            return
    raise TypeError(f"sample: unknown diffusion process {type(process).__name__}; expected one of "
                    f"{[k.__name__ for k in SAMPLERS_OF]}")


@torch.no_grad()
def sample(
    process: GaussianDiffusion | EDMDiffusion | FlowMatching,
    net: DenoiserNetwork,
    noise: Tensor,
    cond: dict[str, Tensor],
    config: SamplerConfig,
    uncond: dict[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    given: Tensor | None = None,
    given_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample clean clips ``(B, T, C, H, W)`` from standard-normal ``noise`` with ``config``'s sampler.

    cond/uncond/guidance: classifier-free guidance (uncond None = none). given/given_mask: content
    ``(B, T, C, H, W)`` and bool mask (true = given), kept fixed and returned exactly.
    """
    check_sampler(process, config)
    common = dict(uncond=uncond, guidance=guidance, given=given, given_mask=given_mask, generator=generator, progress=progress)
    if config.name == "ddim":
        return ddim_sample(process, net, noise, cond, steps=config.steps, eta=config.eta, clip_x0=config.clip_x0, **common)
    if config.name == "ancestral":
        return ancestral_sample(process, net, noise, cond, steps=config.steps, clip_x0=config.clip_x0, **common)
    if config.name in ("flow_euler", "flow_heun"):  # deterministic: no generator
        flow = flow_euler_sample if config.name == "flow_euler" else flow_heun_sample
        return flow(process, net, noise, cond, uncond=uncond, guidance=guidance, given=given, given_mask=given_mask,
                    steps=config.steps, shift=config.shift, progress=progress)
    karras = euler_sample if config.name == "euler" else heun_sample
    return karras(
        process, net, noise, cond, steps=config.steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
        rho=config.rho, s_churn=config.s_churn, init_noise_scale=config.init_noise_scale, **common,
    )  # fmt: skip
