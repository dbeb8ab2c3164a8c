"""VDTModule: the VDT masked video transformer (Lu et al. 2023) trained with unified mask modeling.

One network learns every task of the paper at once - prediction, backward prediction,
interpolation, unconditional generation, image-to-video, random frames and spatial-temporal
completion - because each training clip draws a conditioning mask from a weighted mixture
(:class:`vdiff.diffusion.masks.MaskMixture`). Given content (mask true) enters the network clean,
replaces the sample at every step, and is left out of the loss.

Everything else - the autoencoder (pixel space or any latent one), the diffusion process (DDPM as
the paper, EDM or flow matching), sampling, the evaluation protocol and its report - is the shared
:class:`~vdiff.lit.base.VideoDiffusionModule`. A recipe reads::

    model:
      class_path: vdiff.lit.vdt.VDTModule
      init_args:
        net: VDT-L/2                      # or {name: VDT-L/2, qk_norm: rms}, or VDTConfig fields (defaults: VDT-S/2's)
        diffusion:
          class_path: vdiff.diffusion.ddpm.GaussianDiffusion
          init_args: {prediction: eps, learn_sigma: true}
        sampler: {name: ddim, steps: 50}
        evaluation: {task: prediction, given_frames: 2, samples_per_video: 1}
        mask_weights: {prediction: 1.0, interpolation: 1.0}
        optimizer: {lr: 1.0e-04, warmup_steps: 1000}

Subclassing: override :meth:`compute_loss` (a different loss), :meth:`build_network` (a different
backbone), :meth:`conditioning` (class labels, actions...) or :meth:`training_given_mask`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from vdiff.diffusion.ddpm import GaussianDiffusion
from vdiff.diffusion.edm import EDMDiffusion
from vdiff.diffusion.flow import FlowMatching
from vdiff.diffusion.masks import MASK_MODES, MaskMixture, MaskSpec
from vdiff.diffusion.sampling import SamplerConfig
from vdiff.lit.base import VideoDiffusionModule
from vdiff.lit.evaluation import EvalProtocol
from vdiff.lit.optim import OptimizerSettings
from vdiff.models.presets import config_from_spec
from vdiff.models.vdt import VDT, VDTConfig

DEFAULT_MASK_WEIGHTS: dict[str, float] = {mode: 1.0 for mode in MASK_MODES}
VDT_OPTIMIZER = OptimizerSettings.complete(lr=1e-4)  # VDTModule's defaults (a recipe's optimizer: fields replace them)


class VDTModule(VideoDiffusionModule):
    """Trains and samples a VDT with unified mask modeling.

    Args:
        net: the network: a size name of :data:`vdiff.models.vdt.VDT_CONFIGS` (``VDT-S/2``,
            ``VDT-B/2`` (ours), ``VDT-L/2``), a size with fields overridden (``{name: VDT-L/2, qk_norm: rms}``) or a
            :class:`VDTConfig` (a recipe mapping of its fields): :func:`vdiff.models.presets.config_from_spec`.
            ``in_channels`` and ``learn_sigma`` left null follow the autoencoder and the process.
        diffusion: the training process; None = the paper's (1000 linear-beta steps, eps
            prediction, learned variance with the hybrid MSE + VB loss).
        sampler: validation/test sampler; None = DDIM 50 steps (DDPM), Euler 25 (EDM) or flow Euler 50 (flow).
        evaluation: the validation/test protocol (task, given frames, clip length, k samples, seed).
        mask_weights: ``{name: weight}`` of the training mask mixture; names are mask modes or keys
            of ``mask_specs``.
        mask_specs: ``{name: MaskSpec}`` parameters per mode (given frames, step, spatial ratio...).
        optimizer: :class:`~vdiff.lit.optim.OptimizerSettings` (lr 1e-4, no weight decay, no warm-up by default).
        autoencoder, optimizer_class: see :class:`~vdiff.lit.base.VideoDiffusionModule`.
    """

    DEFAULT_OPTIMIZER = VDT_OPTIMIZER

    def __init__(
        self,
        net: str | dict[str, Any] | VDTConfig = "VDT-S/2",
        diffusion: GaussianDiffusion | EDMDiffusion | FlowMatching | None = None,
        sampler: SamplerConfig | None = None,
        evaluation: EvalProtocol | None = None,
        mask_weights: dict[str, float] | None = None,
        mask_specs: dict[str, MaskSpec] | None = None,
        autoencoder: nn.Module | None = None,
        optimizer: OptimizerSettings | None = None,
        optimizer_class: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(autoencoder, diffusion, sampler, evaluation, optimizer, optimizer_class)
        self.save_hyperparameters(ignore=["autoencoder", "optimizer_class"])
        self.net_config = config_from_spec(VDTConfig, net)
        self.network_config()  # fails now, not at fit, when the config contradicts the process
        if autoencoder is not None:  # else pixel space, or load_from_checkpoint restoring the recorded one: checked then
            self.check_autoencoder()
        self.masks = MaskMixture(mask_weights or DEFAULT_MASK_WEIGHTS, mask_specs)

    def default_diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion(num_timesteps=1000, beta_schedule="linear", prediction="eps", learn_sigma=True)

    def network_config(self) -> VDTConfig:
        """The recipe's config with ``in_channels`` (when null: the autoencoder's latent channels) and
        ``learn_sigma`` (the process's) filled in; a contradiction with the process is an error naming both
        (one with the autoencoder: :meth:`check_autoencoder`)."""
        config = self.net_config
        learned = bool(getattr(self.diffusion, "learn_sigma", False))
        if config.learn_sigma is not None and bool(config.learn_sigma) != learned:
            raise ValueError(
                f"VDTModule: net.learn_sigma={config.learn_sigma} but the diffusion process has learn_sigma={learned}; "
                "leave net.learn_sigma null to follow the process"
            )
        channels = config.in_channels if config.in_channels is not None else self.latent_channels
        return config.replace(in_channels=channels, learn_sigma=learned)

    def check_autoencoder(self) -> None:
        """A recipe's ``net.in_channels`` must be the autoencoder's latent channels."""
        channels = self.latent_channels
        if self.net_config.in_channels is not None and self.net_config.in_channels != channels:
            raise ValueError(
                f"VDTModule: net.in_channels={self.net_config.in_channels} but the autoencoder gives {channels} latent "
                "channels; leave net.in_channels null to follow the autoencoder"
            )

    def build_network(self) -> nn.Module:
        """The denoiser ``net(x, noise_level, cond, given_mask)``; override to swap the backbone."""
        return VDT(self.network_config())

    def training_given_mask(self, latents: Tensor) -> Tensor:
        """A mask drawn per clip from the mixture: ``(B, T, 1, h, w)``, true = given."""
        b, t, _, h, w = latents.shape
        given_mask, _ = self.masks.sample(b, t, h, w, device=latents.device)
        return given_mask
