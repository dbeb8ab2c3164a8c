"""The base LightningModule every vdiff diffusion module shares.

It owns everything that does not depend on the model family, so a family module (VDT, SVD, Vista)
only says how its network is built, what conditions it and how a training clip is masked:

* the frozen autoencoder between pixels and latents (identity in pixel space);
* the diffusion process (``diffusion``: DDPM, EDM or flow matching; their losses return the same keys) and the
  sampler (``sampler``: dispatched to the process by :func:`vdiff.diffusion.sampling.sample`);
* the network hook: :meth:`configure_model` builds the network (:meth:`build_network`) and then
  calls ``configure_network(trainer, pl_module)`` on every callback that has it, before the strategy
  wraps or shards the network and before optimizers are built (LoRA injection works there);
* sampling (:meth:`generate`, :meth:`rollout`), and the evaluation protocol (:class:`EvalProtocol`:
  k samples per clip, mean and best-of-k, copy-last baseline, generated frames only) with one
  cross-rank aggregation and one printed report (:mod:`vdiff.lit.evaluation`);
* AdamW with weight-decay groups, warm-up and optional cosine decay;
* lean checkpoints: a frozen autoencoder loaded from a weights file is recorded by path and sha256
  instead of being stored, and reloaded (and checked) on load.

Subclasses implement :meth:`build_network` and, where they differ, :meth:`conditioning`,
:meth:`training_given_mask` and :meth:`compute_loss`; a loss term of one's own needs no copy of the
loss: :meth:`extra_loss_terms` gets the step's tensors (:class:`TrainingStep`). The protocol callbacks rely on:
``generate(batch, **options) -> Generated``, ``ema_parameters()`` / ``ema_named_parameters()``,
``evaluate_protocol_batch(batch, batch_idx)``, ``evaluation``, ``sampler``, and the checkpoint
entries ``vdiff_module`` (class path), ``vdiff_clip`` (clip length and size trained on) and
``vdiff_autoencoder`` (the autoencoder's architecture and, when it came from a file, the file).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from vdiff.data import batch as B
from vdiff.diffusion.common import add_loss_terms
from vdiff.diffusion.ddpm import GaussianDiffusion
from vdiff.diffusion.edm import EDMDiffusion
from vdiff.diffusion.flow import FlowMatching
from vdiff.diffusion.guidance import Guidance
from vdiff.diffusion.masks import task_mask
from vdiff.diffusion.sampling import SamplerConfig, check_sampler, default_sampler, sample
from vdiff.lit.evaluation import PREDICTION_TASKS, EvalProtocol, ScoreTotals, format_report
from vdiff.lit.frozen import FrozenPartsInEvalMode
from vdiff.lit.optim import OptimizerSettings, settings_in_old_checkpoint
from vdiff.lit.safe_loading import allow_config_objects_in_checkpoints
from vdiff.metrics.frames import copy_last_given_frame, frame_psnr, frame_ssim, masked_frame_mean
from vdiff.models.autoencoder import IdentityAutoencoder, VideoAutoencoder


def _allow_vdiff_configs() -> None:
    """Checkpoints of modules built in Python keep these config objects in their hyperparameters (the CLI's
    hold plain dicts): let ``torch.load(weights_only=True)``, vdiff's and Lightning's, build them."""
    from vdiff.diffusion import edm, flow, guidance, masks
    from vdiff.models.autoencoder import AutoencoderConfig
    from vdiff.models.vdt import VDTConfig

    allow_config_objects_in_checkpoints(
        VDTConfig, AutoencoderConfig, SamplerConfig, EvalProtocol, GaussianDiffusion, EDMDiffusion, edm.EDMPrecond,
        edm.VScalingPrecond, edm.LogNormalSigma, edm.PreconditionedDenoiser, guidance.VanillaCFG, guidance.LinearCFG,
        guidance.TriangleCFG, masks.MaskSpec, OptimizerSettings,
        FlowMatching, flow.LogitNormalTime, flow.UniformTime,
        # an EDMDiffusion holds a PreconditionedDenoiser; checkpoints written before its rename name it so
        (edm.PreconditionedDenoiser, "vdiff.diffusion.edm.Denoiser"),
    )


AUTOENCODER_KEY = "vdiff_autoencoder"  # checkpoint entry: {"config": ..., and for file-backed ones "path", "layout", "sha256"}
AUTOENCODER_PREFIX = "autoencoder."
CLIP_KEYS = (B.VIDEO, B.LATENTS, B.LATENTS_MEAN, B.LATENTS_STD, B.FRAME_INDICES, B.ACTIONS)  # (B, T, ...) entries
NETWORK_HOOK = "configure_network"  # callback method the base module calls after building the network
MODULE_SETTING = "module"  # an argument left to the module's own setting, where None has a meaning of its own
ModuleSetting = Literal["module"]


@dataclass
class Generated:
    """What :meth:`VideoDiffusionModule.generate` returns.

    video:        ``(B, T, C, H, W)`` in [-1, 1], the sampled clip (given content pasted in).
    given_frames: bool ``(B, T)``, frames that were entirely given (shown with a marker).
    target:       ``(B, T, C, H, W)`` ground truth when the batch had it, else None.
    """

    video: Tensor
    given_frames: Tensor
    target: Tensor | None = None


@dataclass
class TrainingStep:
    """One training batch as the loss sees it (:meth:`VideoDiffusionModule.loss_step`), for
    :meth:`VideoDiffusionModule.extra_loss_terms`.

    batch:      the batch as the data module gave it.
    x0:         ``(B, T, c, h, w)`` the clean (scaled) latents, what the process noised.
    cond:       the training conditioning tensors the network saw (after condition dropout).
    given_mask: bool ``(B, T, 1, h, w)`` (true = given: clean, left out of the loss), or None.
    losses:     the process's :data:`~vdiff.diffusion.common.LOSS_KEYS`; ``noise_level`` and ``denoised``
                below are two of them.
    """

    batch: dict[str, Any]
    x0: Tensor
    cond: dict[str, Tensor]
    given_mask: Tensor | None
    losses: dict[str, Tensor]

    @property
    def noise_level(self) -> Tensor:
        """``(B,)``: the DDPM timestep, EDM sigma or flow time of each clip."""
        return self.losses["noise_level"]

    @property
    def denoised(self) -> Tensor:
        """``(B, T, c, h, w)``: the x0 estimate (from the network's output, with its gradient), given content
        pasted in."""
        return self.losses["denoised"]


def given_frames_of(given_mask: Tensor) -> Tensor:
    """Frames that are given entirely: bool ``(B, T)`` from a mask ``(B, T, 1|C, H, W)``."""
    return given_mask.flatten(2).all(dim=2)


class VideoDiffusionModule(FrozenPartsInEvalMode, L.LightningModule):
    """Autoencoder, diffusion process, sampling, evaluation and optimisation shared by every family.

    Args:
        autoencoder: maps video ``(B, T, 3, H, W)`` to latents and back. None means pixel space (the
            identity autoencoder). It is frozen.
        diffusion: the training process, :class:`~vdiff.diffusion.ddpm.GaussianDiffusion`,
            :class:`~vdiff.diffusion.edm.EDMDiffusion` or :class:`~vdiff.diffusion.flow.FlowMatching` (a recipe
            names it by ``class_path``).
        sampler: the sampler used for validation, test and by default in :meth:`generate`; None = the
            process's usual one (DDIM 50 steps for DDPM, Euler 25 for EDM, flow Euler 50 for flow matching).
        evaluation: the validation/test protocol; None = :class:`EvalProtocol` defaults.
        optimizer: AdamW and its learning-rate schedule, one group (:class:`~vdiff.lit.optim.OptimizerSettings`:
            ``lr``, ``betas``, ``eps``, ``weight_decay`` on matrices only, ``warmup_steps``, ``lr_decay``); fields
            left out keep :attr:`DEFAULT_OPTIMIZER` (a family's defaults).
        optimizer_class: any other optimizer class from the recipe (``class_path``/``init_args``); receives the
            parameter groups (with their ``weight_decay``); ``optimizer.warmup_steps`` and ``lr_decay`` still apply.
    """

    DEFAULT_OPTIMIZER: OptimizerSettings = OptimizerSettings.complete()  # a family's defaults (SVD: lr 1e-5)

    def __init__(
        self,
        autoencoder: nn.Module | None = None,
        diffusion: GaussianDiffusion | EDMDiffusion | FlowMatching | None = None,
        sampler: SamplerConfig | None = None,
        evaluation: EvalProtocol | None = None,
        optimizer: OptimizerSettings | None = None,
        optimizer_class: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = (autoencoder if autoencoder is not None else IdentityAutoencoder()).eval().requires_grad_(False)
        self.diffusion = diffusion if diffusion is not None else self.default_diffusion()
        self.sampler = sampler if sampler is not None else default_sampler(self.diffusion)
        check_sampler(self.diffusion, self.sampler)
        self.evaluation = evaluation if evaluation is not None else EvalProtocol()
        self.optimizer_settings = OptimizerSettings.of(optimizer, self.DEFAULT_OPTIMIZER)
        self.optimizer_factory = optimizer_class
        self.net: nn.Module | None = None
        self.guidance: Guidance | None = None  # classifier-free guidance schedule at sampling (families set it)
        self.decode_chunk: int | None = None  # decode latents in temporal chunks of this many frames (None = all)
        self.decode_overlap = 0  # frames shared by consecutive chunks, cross-faded
        self.test_results: dict[str, float] = {}
        self._test_totals = ScoreTotals()

    def default_diffusion(self) -> GaussianDiffusion | EDMDiffusion | FlowMatching:
        """The process used when a recipe names none (override per family)."""
        return GaussianDiffusion()

    # ---------------------------------------------------------------- network and the callback hook

    def build_network(self) -> nn.Module:
        """The denoiser ``net(x, noise_level, cond, given_mask)`` (the diffusion contract)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_network()")

    def configure_model(self) -> None:
        """Build the network once, let callbacks change it (``configure_network``: LoRA injects there),
        then scale it (:func:`vdiff.lit.scaling.configure_scaling`): activation checkpointing and
        ``torch.compile`` of its blocks when a :class:`~vdiff.lit.scaling.Scaling` callback asks, FSDP2
        ``fully_shard`` of each block and then the network when the strategy provides a device mesh
        (``ModelParallelStrategy``), fused AdamW on CUDA; all before optimizers are built."""
        from vdiff.lit.scaling import configure_scaling

        trainer = self._trainer
        if trainer is not None:  # the autoencoder is final here (a checkpoint load has no trainer: it checks later)
            self.check_autoencoder()
        if self.net is None:
            self.net = self.build_network()
            for callback in trainer.callbacks if trainer is not None else []:
                hook = getattr(callback, NETWORK_HOOK, None)
                if callable(hook):
                    hook(trainer, self)
        configure_scaling(self, self.net, trainer)

    def conditioning(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Conditioning tensors for the network when sampling (none by default); override to add some.
        ``generator`` seeds any noise the conditions need (e.g. SVD's noise-augmented frame)."""
        return {}

    def training_conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Conditioning tensors for a training step: :meth:`conditioning` by default; families add
        condition dropout (for classifier-free guidance) or random augmentation here."""
        return self.conditioning(batch)

    # ---------------------------------------------------------------- autoencoder

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.autoencoder, "scale_factor", 1.0))

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.autoencoder, "shift_factor", 0.0))

    @property
    def latent_channels(self) -> int:
        return int(getattr(self.autoencoder, "latent_channels", 3))

    @torch.no_grad()
    def encode_video(self, video: Tensor, sample: bool = True) -> Tensor:
        """Video ``(B, T, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, T, c, h, w)``."""
        posterior = self.autoencoder.encode(video)
        latents = posterior.sample() if sample else posterior.mode()
        return (latents - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode_latents(
        self, latents: Tensor, chunk: int | None | ModuleSetting = MODULE_SETTING, overlap: int | None = None
    ) -> Tensor:
        """Scaled latents ``(B, T, c, h, w)`` -> video ``(B, T, 3, H, W)`` in [-1, 1] (clamped).

        chunk: decode this many frames at a time through the autoencoder's chunked decode, consecutive chunks
            sharing ``overlap`` frames (cross-faded); None decodes every frame at once; ``"module"`` (the default)
            takes the module's ``decode_chunk`` (None unless set; SVD-XT's recipe: 14 with 3 overlapping).
        overlap: None = the module's ``decode_overlap`` with ``chunk="module"``, else 0.

        With ``chunk`` dividing ``T`` and no overlap the chunks are diffusers' ``decode_chunk_size`` chunks; otherwise
        the autoencoder decodes the fewest full-size windows, spread evenly (diffusers decodes a shorter last chunk).
        """
        if isinstance(chunk, str):
            if chunk != MODULE_SETTING:
                raise ValueError(f"decode_latents: chunk must be a frame count, None or 'module', got {chunk!r}")
            chunk, overlap = self.decode_chunk, self.decode_overlap if overlap is None else overlap
        overlap = 0 if overlap is None else int(overlap)
        if chunk is not None and not 0 <= overlap < chunk:
            raise ValueError(f"decode_latents: need chunk >= 1 and 0 <= overlap < chunk, got chunk={chunk}, overlap={overlap}")
        unscaled = latents / self.latent_scale + self.latent_shift
        if chunk is None:  # the autoencoder contract is decode(latents); chunk_size is an extra
            return self.autoencoder.decode(unscaled).clamp(-1.0, 1.0)
        return self.autoencoder.decode(unscaled, chunk_size=int(chunk), overlap=overlap).clamp(-1.0, 1.0)

    def batch_latents(self, batch: dict[str, Any], sample: bool = True) -> Tensor:
        """Scaled latents of a batch from video shards (encoded here) or latent shards (stored)."""
        if B.LATENTS in batch:
            latents = batch[B.LATENTS] if sample else batch.get(B.LATENTS_MEAN, batch[B.LATENTS])
            return (latents - self.latent_shift) * self.latent_scale
        return self.encode_video(batch[B.VIDEO], sample=sample)

    def check_autoencoder(self) -> None:
        """Raise when the autoencoder does not fit the network's configuration (families with fixed input channels
        override it: SVD, VDT with ``net.in_channels`` set). Called at construction when an autoencoder is given,
        when a trainer builds the network, and after :meth:`on_load_checkpoint` restored the recorded autoencoder:
        ``load_from_checkpoint`` constructs the module without one, so only then is the autoencoder known."""

    def autoencoder_replaced(self) -> None:
        """Called after :meth:`on_load_checkpoint` rebuilt the autoencoder: rebuild the network,
        whose input channels follow it (its weights then come from the state dict)."""
        if self.net is not None:
            self.net = self.build_network().to(self.device)

    # ---------------------------------------------------------------- training

    def training_given_mask(self, latents: Tensor) -> Tensor | None:
        """Bool mask ``(B, T, 1, h, w)`` (true = given, clean, left out of the loss) for a training
        batch of latents ``(B, T, c, h, w)``, or None (everything generated). Families override."""
        return None

    def loss_step(self, batch: dict[str, Any]) -> TrainingStep:
        """The process's losses of a batch with what they were computed from: the latents, the given mask
        (:meth:`training_given_mask`, drawn first) and the conditioning (:meth:`training_conditioning`)."""
        x0 = self.batch_latents(batch)  # (B, T, c, h, w)
        given_mask = self.training_given_mask(x0)
        cond = self.training_conditioning(batch)
        losses = self.diffusion.training_losses(self.net, x0, cond, given_mask)
        return TrainingStep(batch=batch, x0=x0, cond=cond, given_mask=given_mask, losses=losses)

    def extra_loss_terms(self, step: TrainingStep) -> dict[str, Tensor]:
        """Loss terms to add to the process's loss: ``{name: per-clip (B,) tensor or scalar}``, each logged as
        ``train/loss_<name>``, their sum as ``train/loss_extra`` (:func:`~vdiff.diffusion.common.add_loss_terms`).
        None by default; override to add a term from ``step.x0``, ``step.denoised``, ``step.given_mask``,
        ``step.noise_level`` ... (Vista adds its dynamics and structure losses here)."""
        return {}

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The loss of a batch: the process's :data:`~vdiff.diffusion.common.LOSS_KEYS` (:meth:`loss_step`) with
        :meth:`extra_loss_terms` added."""
        step = self.loss_step(batch)
        return add_loss_terms(step.losses, self.extra_loss_terms(step))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_loss(batch)
        batch_size = len(batch[B.KEY]) if B.KEY in batch else None
        scalars = {f"train/{k}": v.detach() for k, v in losses.items() if isinstance(v, Tensor) and v.ndim == 0}
        self.log_dict(scalars, prog_bar=False, batch_size=batch_size)
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return losses["loss"]

    # ---------------------------------------------------------------- sampling

    def task_given_mask(
        self, task: str, num_frames: int, height: int, width: int, batch: int, given_frames: int | None = None
    ) -> Tensor:
        """Deterministic mask ``(B, T, 1, h, w)`` (true = given) for an evaluation task."""
        params: dict[str, Any] = {}
        if task in PREDICTION_TASKS:
            params["given_frames"] = int(given_frames if given_frames is not None else self.evaluation.given_frames)
        return task_mask(task, num_frames, height, width, batch=batch, device=self.device, **params)

    @torch.no_grad()
    def sample_latents(
        self,
        given: Tensor,
        given_mask: Tensor | None,
        cond: dict[str, Tensor] | None = None,
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        *,
        guidance: Guidance | None | ModuleSetting = MODULE_SETTING,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Sample scaled latents ``(B, T, c, h, w)`` where ``given_mask`` is false; given is pasted in (a
        ``given_mask`` of None generates everything: ``given`` then gives only the shape).

        sampler: None = the module's. guidance: the CFG schedule (None = no guidance; ``"module"``, the default: the
        module's ``guidance``). noise: the standard-normal start ``(B, T, c, h, w)``, before the sampler's
        initial-noise scale (default: drawn from ``generator``)."""
        guidance = self.guidance_for(guidance)
        noise = self.initial_noise(given, generator, noise)
        cond = cond or {}
        uncond = self.unconditional(cond) if guidance is not None else None
        return sample(
            self.diffusion, self.net, noise, cond, sampler or self.sampler, uncond=uncond, guidance=guidance,
            given=given if given_mask is not None else None, given_mask=given_mask, generator=generator,
            progress=progress,
        )  # fmt: skip

    def guidance_for(self, guidance: Guidance | None | ModuleSetting) -> Guidance | None:
        """The guidance a sampling call uses: ``guidance``, or the module's for ``"module"``."""
        if isinstance(guidance, str):
            if guidance != MODULE_SETTING:
                raise ValueError(f"guidance must be a schedule, None or 'module', got {guidance!r}")
            return self.guidance
        return guidance

    @staticmethod
    def initial_noise(like: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Standard-normal noise of ``like``'s shape, dtype and device: ``noise`` when given, else drawn from
        ``generator``."""
        if noise is None:
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        if tuple(noise.shape) != tuple(like.shape):
            raise ValueError(f"sampling: noise must have shape {tuple(like.shape)}, got {tuple(noise.shape)}")
        return noise.to(like)

    def unconditional(self, cond: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The unconditional branch of classifier-free guidance for ``cond`` (keys left out are shared by
        both branches); None = no guidance. Families with conditions override it."""
        return None

    def sampler_with(self, sampler: str | None = None, steps: int | None = None, eta: float | None = None) -> SamplerConfig:
        """This module's sampler with the given settings replaced (None keeps a setting)."""
        return self.sampler.replace(name=sampler, steps=steps, eta=eta)

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        task: str | None = None,
        given_frames: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Generated:
        """Sample the task's generated part of every clip of ``batch`` (video or latent batches)."""
        task = task or self.evaluation.task
        x0 = self.batch_latents(batch, sample=False)  # (B, T, c, h, w)
        b, t, _, h, w = x0.shape
        given_mask = self.task_given_mask(task, t, h, w, b, given_frames)
        return self.sample_video(batch, x0, given_mask, self.sampler_with(sampler, steps, eta), generator, progress)

    def sample_video(
        self,
        batch: dict[str, Any],
        x0: Tensor,
        given_mask: Tensor,
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Generated:
        """One sample of the clips whose clean latents are ``x0 (B, T, c, h, w)``, decoded to video."""
        b, t = x0.shape[:2]
        latents = self.sample_latents(x0, given_mask, self.conditioning(batch, generator), sampler, generator, progress)
        video = self.decode_latents(latents)
        target = batch.get(B.VIDEO)
        if target is not None:
            # Given frames show the input exactly (latent round trips would blur them otherwise).
            frames = given_frames_of(given_mask).view(b, t, 1, 1, 1)
            video = torch.where(frames, target.to(video.dtype), video)
        return Generated(video=video, given_frames=given_frames_of(given_mask), target=target)

    @torch.no_grad()
    def rollout(
        self,
        context: Tensor,
        num_frames: int,
        window: int,
        given_frames: int = 2,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Autoregressive prediction beyond the training clip length.

        context: video ``(B, Tc, 3, H, W)`` in [-1, 1] with ``Tc >= given_frames``. Each round
        conditions a ``window``-frame clip on the last ``given_frames`` frames of the video so far and
        appends the ``window - given_frames`` new ones, until the video has ``num_frames`` frames
        (context included). Returns ``(B, num_frames, 3, H, W)``.
        """
        if not 1 <= given_frames < window:
            raise ValueError(f"rollout: need 1 <= given_frames < window, got {given_frames} and {window}")
        if context.shape[1] < given_frames:
            raise ValueError(f"rollout: context has {context.shape[1]} frames, given_frames={given_frames}")
        config = self.sampler_with(sampler, steps)
        video = context
        while video.shape[1] < num_frames:
            past = self.encode_video(video[:, -given_frames:], sample=False)  # (B, k, c, h, w)
            b, _, c, h, w = past.shape
            given = torch.cat([past, past.new_zeros(b, window - given_frames, c, h, w)], dim=1)  # (B, W, c, h, w)
            mask = self.task_given_mask("prediction", window, h, w, b, given_frames)
            latents = self.sample_latents(given, mask, {}, config, generator, progress)
            new = self.decode_latents(latents[:, given_frames:])  # (B, W-k, 3, H, W)
            video = torch.cat([video, new], dim=1)
        return video[:, :num_frames]

    # ---------------------------------------------------------------- evaluation

    def protocol_clips(self, batch: dict[str, Any], num_frames: int | None = None) -> dict[str, Any]:
        """The batch cut to its first ``num_frames`` frames (default: the protocol's; None = unchanged)."""
        num_frames = self.evaluation.num_frames if num_frames is None else num_frames
        if num_frames is None:
            return batch
        source = B.VIDEO if B.VIDEO in batch else B.LATENTS
        have = int(batch[source].shape[1])
        if have < num_frames:
            raise ValueError(
                f"{type(self).__name__}: evaluation.num_frames={num_frames} but the clips have {have} frames; "
                "give the data module longer evaluation clips or lower evaluation.num_frames"
            )
        if have == num_frames:
            return batch

        def first_frames(value: Any) -> Any:
            if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[1] == have:
                return value[:, :num_frames]
            if isinstance(value, dict):  # e.g. actions {name: (B, T, ...)}
                return {k: first_frames(v) for k, v in value.items()}
            return value

        return {key: first_frames(value) if key in CLIP_KEYS else value for key, value in batch.items()}

    @torch.no_grad()
    def evaluate_samples(self, batch: dict[str, Any], seeds: list[int]) -> dict[str, Tensor]:
        """Score one sample per seed of every clip on the protocol task's generated frames.

        Returns ``psnr``/``ssim`` of shape ``(B, k)`` (k = len(seeds), column j from ``seeds[j]``)
        and the copy-last-given-frame baseline ``psnr_copy_last``/``ssim_copy_last`` of shape ``(B,)``.
        The clips are encoded once; each sample draws its noise from its own generator. Batches of
        latent shards (no ``video``) are scored against their decoded posterior mean.
        """
        if not seeds:
            raise ValueError("evaluate_samples: need at least one seed")
        x0 = self.batch_latents(batch, sample=False)  # (B, T, c, h, w)
        target = batch.get(B.VIDEO)
        if target is None:  # latent shards: score against the decoded posterior mean
            target = self.decode_latents(x0)
            batch = {**batch, B.VIDEO: target}
        b, t, _, h, w = x0.shape
        given_mask = self.task_given_mask(self.evaluation.task, t, h, w, b)
        given = given_frames_of(given_mask)  # (B, T)
        frames = ~given  # generated frames only
        psnr, ssim = [], []
        for seed in seeds:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
            video = self.sample_video(batch, x0, given_mask, generator=generator).video
            psnr.append(masked_frame_mean(frame_psnr(video, target), frames))
            ssim.append(masked_frame_mean(frame_ssim(video, target), frames))
        baseline = copy_last_given_frame(target, given)
        return {
            "psnr": torch.stack(psnr, dim=1),  # (B, k)
            "ssim": torch.stack(ssim, dim=1),  # (B, k)
            "psnr_copy_last": masked_frame_mean(frame_psnr(baseline, target), frames),
            "ssim_copy_last": masked_frame_mean(frame_ssim(baseline, target), frames),
        }

    def evaluate_protocol_batch(
        self, batch: dict[str, Any], batch_idx: int, samples_per_video: int | None = None
    ) -> dict[str, Tensor]:
        """The protocol on one batch: per-clip ``(B,)`` tensors ``psnr``, ``ssim`` (mean over the k
        samples), ``psnr_best_of_k``, ``ssim_best_of_k`` and the copy-last baselines.
        ``samples_per_video`` overrides k (validation draws 1)."""
        protocol = self.evaluation
        k = protocol.samples_per_video if samples_per_video is None else samples_per_video
        seeds = [protocol.sample_seed(batch_idx, j) for j in range(k)]
        scores = self.evaluate_samples(self.protocol_clips(batch), seeds)
        psnr, ssim = scores.pop("psnr"), scores.pop("ssim")
        return {
            "psnr": psnr.mean(dim=1),
            "psnr_best_of_k": psnr.max(dim=1).values,
            "ssim": ssim.mean(dim=1),
            "ssim_best_of_k": ssim.max(dim=1).values,
            **scores,
        }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One deterministic sample per clip (sample 0 of the protocol) scored beside copy-last, and the loss."""
        scores = self.evaluate_protocol_batch(batch, batch_idx, samples_per_video=1)
        batch_size = int(scores["psnr"].numel())
        for name in ("psnr", "ssim", "psnr_copy_last", "ssim_copy_last"):
            self.log(f"val/{name}", scores[name].mean(), batch_size=batch_size, sync_dist=True, prog_bar=name == "psnr")
        with torch.no_grad():
            loss = self.compute_loss(self.protocol_clips(batch))["loss"]
        self.log("val/loss", loss, batch_size=batch_size, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._test_totals, self.test_results = ScoreTotals(), {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self.evaluate_protocol_batch(batch, batch_idx)
        batch_size = int(scores["psnr"].numel())
        for name, values in scores.items():
            self.log(f"test/{name}", values.mean(), batch_size=batch_size, sync_dist=True)
        self._test_totals.add(scores)
        with torch.no_grad():
            loss = self.compute_loss(self.protocol_clips(batch))["loss"]
        self.log("test/loss", loss, batch_size=batch_size, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        """Average the per-clip scores over all ranks and print them with the protocol (rank 0)."""
        reduce = partial(self.trainer.strategy.reduce, reduce_op="sum") if self.trainer.world_size > 1 else None
        self.test_results = self._test_totals.means(reduce, self.device)
        if self.trainer.is_global_zero:
            print(self.report(self.test_results, checkpoint=getattr(self.trainer, "ckpt_path", None)))

    def report(self, results: dict[str, float], checkpoint: str | None = None, title: str | None = None,
               notes: str | None = None) -> str:
        """``results`` (as :attr:`test_results`) under this module's protocol and sampler."""
        title = title or f"{type(self).__name__} test results"
        return format_report(title, results, self.evaluation, self.sampler, checkpoint, notes)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Generated:
        generator = torch.Generator(device=self.device).manual_seed(self.evaluation.sample_seed(batch_idx, 0))
        return self.generate(batch, generator=generator)

    # ---------------------------------------------------------------- callback protocol

    def ema_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` an EMA callback tracks: every trainable parameter outside the autoencoder."""
        for name, param in self.named_parameters():
            if param.requires_grad and not name.startswith(AUTOENCODER_PREFIX):
                yield name, param

    def ema_parameters(self) -> list[nn.Parameter]:
        """The parameters of :meth:`ema_named_parameters`."""
        return [p for _, p in self.ema_named_parameters()]

    def frozen_parts(self) -> list[nn.Module | None]:
        """The parts kept frozen in eval mode while the rest trains: the autoencoder (subclasses add theirs)."""
        return [self.autoencoder]

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["vdiff_module"] = f"{cls.__module__}.{cls.__qualname__}"
        # The clip shape trained on, so `vdiff sample` can cut inputs the same way.
        spec = getattr(getattr(self._trainer, "datamodule", None), "spec", None) if self._trainer else None
        if spec is not None:
            checkpoint["vdiff_clip"] = {"num_frames": int(spec.num_frames), "size": [int(v) for v in spec.out_hw]}
        if isinstance(self.autoencoder, VideoAutoencoder):
            from vdiff.lit.autoencoder_source import describe_autoencoder

            entry = describe_autoencoder(self.autoencoder)
            checkpoint[AUTOENCODER_KEY] = entry
            if "sha256" in entry:  # file-backed: reloaded from the file, not stored (SD-VAE: 335 MB)
                self.drop_file_backed_state(checkpoint, AUTOENCODER_PREFIX)

    def sharded_checkpoints(self) -> bool:
        """Whether the strategy saves sharded checkpoints (ModelParallelStrategy's device mesh, FSDP)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        return getattr(strategy, "_device_mesh", None) is not None or isinstance(strategy, FSDPStrategy)

    def drop_file_backed_state(self, checkpoint: dict[str, Any], prefix: str) -> None:
        """Leave the state of a frozen, file-backed part (keys starting with ``prefix``) out of a lean checkpoint:
        it is recorded by path and sha256 and reloaded from the file. Sharded checkpoints
        (torch.distributed.checkpoint) load against the module's full state, so they keep it."""
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and not self.sharded_checkpoints():
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]

    @staticmethod
    def refill_file_backed_state(checkpoint: dict[str, Any], prefix: str, part: nn.Module) -> None:
        """Put the weights of a file-backed ``part`` back under ``prefix`` into a checkpoint's state dict (where a
        lean checkpoint left them out), so a strict load finds every key."""
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key, value in part.state_dict().items():
                state.setdefault(prefix + key, value)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the autoencoder recorded in the checkpoint: rebuild it when this module was
        constructed without one (``load_from_checkpoint``), check that a file-backed one is the same
        file with the same config, put its weights back into the state dict (lean checkpoints do not store
        them), then check that the network fits it (:meth:`check_autoencoder`). A checkpoint written before the
        ``optimizer`` group (flat ``lr``, ``betas``...) has them read into it (:meth:`restore_flat_optimizer_arguments`)."""
        from vdiff.lit.autoencoder_source import restore_autoencoder

        self.restore_flat_optimizer_arguments(checkpoint)
        entry = checkpoint.get(AUTOENCODER_KEY)
        if entry is not None:
            rebuilt = restore_autoencoder(entry, current=self.autoencoder)
            if rebuilt is not None:
                self.autoencoder = rebuilt.to(self.device).eval().requires_grad_(False)
                self.autoencoder_replaced()
            if "sha256" in entry:
                self.refill_file_backed_state(checkpoint, AUTOENCODER_PREFIX, self.autoencoder)
        self.check_autoencoder()

    # ---------------------------------------------------------------- optimisation

    def restore_flat_optimizer_arguments(self, checkpoint: dict[str, Any]) -> None:
        """Hyperparameters written before the ``optimizer`` group hold flat ``lr``, ``betas``, ``weight_decay``,
        ``warmup_steps`` and ``lr_decay``, which ``load_from_checkpoint`` leaves out (they are no arguments now): move
        them into the group (a warning names the new form) and, for a module loaded without a trainer, use them. A
        fit resumed from the checkpoint keeps the settings the module was built with (the recipe's)."""
        settings = settings_in_old_checkpoint(checkpoint, self.DEFAULT_OPTIMIZER, type(self).__name__)
        if settings is not None and self._trainer is None:
            self.optimizer_settings = self.hparams["optimizer"] = settings

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on norms, biases and 1-D embeddings."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "embed" in name else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.optimizer_settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over :meth:`parameter_groups` (or ``optimizer_class``), with ``optimizer``'s warm-up and decay
        stepped per optimizer step."""
        settings = self.optimizer_settings
        groups = self.parameter_groups()
        optimizer = self.optimizer_factory(groups) if self.optimizer_factory is not None else settings.adamw(groups)
        total = self.trainer.estimated_stepping_batches if settings.lr_decay == "cosine" and self._trainer else None
        scheduler = settings.scheduler(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


_allow_vdiff_configs()
