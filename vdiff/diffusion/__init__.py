"""Model-agnostic diffusion: EDM, DDPM/DDIM, flow matching, samplers, guidance and conditioning masks.

Networks are called through the denoiser contract of :mod:`vdiff.diffusion.common`:
``net(x, noise_level, cond, given_mask)`` with one noise level per clip.
"""

from vdiff.diffusion.common import DenoiserNetwork, masked_mean, replace_given
from vdiff.diffusion.ddpm import GaussianDiffusion, make_betas, respacing_timesteps
from vdiff.diffusion.ddpm_samplers import ancestral_sample, ddim_sample
from vdiff.diffusion.edm import EDMDiffusion, EDMPrecond, LogNormalSigma, VScalingPrecond
from vdiff.diffusion.flow import FlowMatching, LogitNormalTime, UniformTime, flow_times, shift_time
from vdiff.diffusion.flow_samplers import flow_euler_sample, flow_heun_sample
from vdiff.diffusion.guidance import LinearCFG, TriangleCFG, VanillaCFG, drop_conditions, guided_call
from vdiff.diffusion.karras import euler_sample, heun_sample, karras_sigmas
from vdiff.diffusion.masks import MASK_MODES, MaskMixture, MaskSpec, sample_given_mask, task_mask

__all__ = [
    "DenoiserNetwork", "masked_mean", "replace_given",
    "GaussianDiffusion", "make_betas", "respacing_timesteps", "ancestral_sample", "ddim_sample",
    "EDMDiffusion", "EDMPrecond", "LogNormalSigma", "VScalingPrecond",
    "FlowMatching", "LogitNormalTime", "UniformTime", "flow_times", "shift_time", "flow_euler_sample", "flow_heun_sample",
    "LinearCFG", "TriangleCFG", "VanillaCFG", "drop_conditions", "guided_call",
    "euler_sample", "heun_sample", "karras_sigmas",
    "MASK_MODES", "MaskMixture", "MaskSpec", "sample_given_mask", "task_mask",
]
