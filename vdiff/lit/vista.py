"""VistaModule: Vista's action-conditioned driving world model on SVD (Gao et al., 2024).

Vista specialises SVD for driving; this module adds to :class:`~vdiff.lit.svd.SVDModule`:

* **Latent replacement (dynamic prior).** Each training clip keeps its first k frames clean, with k
  drawn from ``prior_weights`` (Vista: k in {0, 1, 2, 3} with weights 1:2:4:8). Those latents enter
  the UNet clean, are left out of the loss, and select the UNet's separate timestep-embedding MLP
  (``cond_frame_time_embed``, initialised as a copy of the main one); the whole clip is preconditioned
  with the clip's sigma, and the sampler pastes them back before every step.
* **Actions** (the one action schema of vdiff's data): command, trajectory, speed, steering and goal
  through an :class:`~vdiff.models.actions.ActionEncoder` (each scalar a 128-d Fourier embedding),
  added as keys/values in every cross-attention by zero-initialised projections (a converted SVD is
  unchanged at init). One action type per training clip, per-type CFG dropout; a missing or invalid
  action is zeros, i.e. unconditional; the unconditional CFG branch zeroes the actions too.
* **Losses.** Dynamics enhancement and structure preservation
  (:mod:`vdiff.diffusion.vista_losses`), each switchable and weighted from the recipe.
* **Long rollouts** (:meth:`rollout_rounds`): the last ``overlap`` latents of a window start the next
  one, the image condition moves to the first of them, actions per round (:meth:`rollout_actions`,
  :meth:`recorded_rollout_actions`), triangle guidance across rounds; ``25 + 22 (N - 1)`` frames for N
  rounds of 25 with overlap 3 (:func:`rollout_length`).
* **Uncertainty** (:meth:`uncertainty`): the variance over an ensemble of samples, and Vista's reward
  (:meth:`reward`).

Sampling settings (given frames, sampler, guidance, decode chunks) are arguments of these methods; none of them
changes the module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from vdiff.data import batch as B
from vdiff.diffusion.edm import EDMDiffusion, LogNormalSigma, VScalingPrecond
from vdiff.diffusion.flow import FlowMatching
from vdiff.diffusion.guidance import Guidance, LinearCFG, TriangleCFG, VanillaCFG
from vdiff.diffusion.masks import MaskMixture, MaskSpec
from vdiff.diffusion.sampling import SamplerConfig
from vdiff.diffusion.vista_losses import vista_loss_terms, vista_losses
from vdiff.lit.base import MODULE_SETTING, ModuleSetting, TrainingStep
from vdiff.lit.evaluation import EvalProtocol
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.svd import SVDConditioning, SVDModule
from vdiff.models.actions import VISTA_CFG_DROP, ActionEncoder
from vdiff.models.presets import config_from_spec
from vdiff.models.unet_svd import ACTIONS_KEY, UNetSVDConfig  # ACTIONS_KEY: cond key of the (B, action_dim) actions

VISTA_PRIOR_WEIGHTS: dict[int, float] = {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}


def rollout_length(window: int, rounds: int, overlap: int) -> int:
    """Frames of a rollout of ``rounds`` windows of ``window`` frames sharing ``overlap``: ``T + (T - o)(N - 1)``."""
    return window + (window - overlap) * (rounds - 1)


def recorded_round_actions(actions: Mapping[str, Sequence[Any]], start: int, window: int) -> dict[str, np.ndarray]:
    """The recorded per-frame actions (a shard json's ``actions``) of frames ``start .. start + window - 1`` as
    per-frame arrays (:func:`vdiff.data.transforms.clip_actions`); frames past the recording are invalid."""
    from vdiff.data.transforms import clip_actions

    padded = {key: list(values) + [None] * max(0, start + window - len(values)) for key, values in actions.items()}
    return clip_actions(padded, range(start, start + window))


def dynamic_prior(weights: dict[int, float]) -> MaskMixture:
    """A mask mixture giving the first k frames clean, k drawn with ``weights`` (``{k: weight}``)."""
    if not weights or any(int(k) < 0 for k in weights):
        raise ValueError(f"dynamic prior: weights must map frame counts >= 0 to weights, got {weights}")
    specs = {
        f"first_{int(k)}": MaskSpec("unconditional") if int(k) == 0 else MaskSpec("prediction", given_frames=int(k))
        for k in weights
    }
    return MaskMixture({f"first_{int(k)}": float(w) for k, w in weights.items()}, specs)


class VistaModule(SVDModule):
    """SVD + dynamic prior + actions + Vista's losses (see the module docstring).

    Args:
        net: as :class:`SVDModule` (``svd-xt`` for Vista); ``cond_frame_time_embed`` and ``action_dim`` are set
            here (the UNet gets the conditioning-frame MLP and the action projections).
        action_encoder: the :class:`ActionEncoder` (its normalisation and future times), or its arguments as a dict
            (how checkpoints store it: ``load_from_checkpoint`` rebuilds the same encoder); None = Vista's.
        prior_weights: ``{k: weight}``: the first k frames given in training (Vista: 1:2:4:8 for 0..3).
        action_drop: per-action-type CFG dropout in training (Vista: 0.15).
        one_action_type: keep one valid action type per training clip (Vista).
        sample_actions: condition samples (validation, test, rollouts, ``generate``) on the batch's actions; False
            samples action-free (zero action features, as Vista's "free" mode: its FID/FVD protocol) while training
            still reads them. :meth:`actions_sampled` overrides it for a block (the steering test does).
        dynamics_loss, dynamics_weight, structure_loss, structure_weight: Vista's extra losses.
        Other arguments: as :class:`SVDModule`; the defaults are Vista's (EDM with ``ln sigma ~ N(1.0, 1.6)``,
        offset noise 0.02 per frame, the evaluation task predicts from 3 given frames).
    """

    UNSAVED_ARGUMENTS = (*SVDModule.UNSAVED_ARGUMENTS, "action_encoder")  # stored as its arguments, see below

    def __init__(
        self,
        net: str | dict[str, Any] | UNetSVDConfig = "svd-xt",
        action_encoder: ActionEncoder | dict[str, Any] | None = None,
        prior_weights: dict[int, float] | None = None,
        action_drop: float = VISTA_CFG_DROP,
        one_action_type: bool = True,
        sample_actions: bool = True,
        dynamics_loss: bool = True,
        dynamics_weight: float = 1.0,
        structure_loss: bool = True,
        structure_weight: float = 0.1,
        image_encoder: nn.Module | None = None,
        conditioning: SVDConditioning | None = None,
        guidance: LinearCFG | VanillaCFG | TriangleCFG | None = None,
        train: Literal["all", "temporal"] = "all",
        spatial_lr_scale: float = 1.0,
        net_weights: str | None = None,
        net_weights_layout: Literal["auto", "diffusers", "sgm", "vdiff", "sd21-image", "vista"] = "auto",
        diffusion: EDMDiffusion | FlowMatching | None = None,
        sampler: SamplerConfig | None = None,
        evaluation: EvalProtocol | None = None,
        autoencoder: nn.Module | None = None,
        optimizer: OptimizerSettings | None = None,
        optimizer_class: OptimizerCallable | None = None,
    ) -> None:
        if isinstance(action_encoder, Mapping):  # a checkpoint's hyperparameters (on_save_checkpoint)
            action_encoder = ActionEncoder(**action_encoder)
        encoder = action_encoder if action_encoder is not None else ActionEncoder()
        config = config_from_spec(UNetSVDConfig, net).replace(cond_frame_time_embed=True, action_dim=encoder.action_dim)
        super().__init__(
            net=config, image_encoder=image_encoder, conditioning=conditioning, guidance=guidance, train=train,
            spatial_lr_scale=spatial_lr_scale, net_weights=net_weights, net_weights_layout=net_weights_layout,
            paste_cond_frame=True, diffusion=diffusion, sampler=sampler,
            evaluation=evaluation if evaluation is not None else EvalProtocol(task="prediction", given_frames=3),
            autoencoder=autoencoder, optimizer=optimizer, optimizer_class=optimizer_class,
        )  # fmt: skip
        self.save_hyperparameters(ignore=list(self.UNSAVED_ARGUMENTS))
        self.action_encoder = encoder
        self.prior = dynamic_prior(prior_weights or VISTA_PRIOR_WEIGHTS)
        if not 0.0 <= action_drop <= 1.0:
            raise ValueError(f"VistaModule: action_drop must be in [0, 1], got {action_drop}")
        self.action_drop = float(action_drop)
        self.one_action_type = one_action_type
        self.sample_actions = sample_actions
        self.extra_losses = dict(dynamics=dynamics_loss, dynamics_weight=float(dynamics_weight),
                                 structure=structure_loss, structure_weight=float(structure_weight))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """As SVD's, and the action encoder's arguments into the hyperparameters (the network's action width follows
        them, so a checkpoint must rebuild the same encoder)."""
        super().on_save_checkpoint(checkpoint)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"]["action_encoder"] = self.action_encoder.to_dict()

    def default_diffusion(self) -> EDMDiffusion:
        return EDMDiffusion(VScalingPrecond(), LogNormalSigma(1.0, 1.6), loss_weighting="v", offset_noise=0.02,
                            offset_noise_scope="frame")

    # ---------------------------------------------------------------- conditioning

    @contextmanager
    def actions_sampled(self, enabled: bool = True) -> Iterator[None]:
        """Inside the block, samples are conditioned on the batch's actions (``enabled``) or action-free (not), whatever
        ``sample_actions`` says; restored on exit. :class:`~vdiff.callbacks.steering.SteeringTest` samples its forced
        steering this way, so it means something in a recipe whose own samples are action-free (FID/FVD protocol)."""
        saved = self.sample_actions
        self.sample_actions = bool(enabled)
        try:
            yield
        finally:
            self.sample_actions = saved

    def _action_features(self, batch: dict[str, Any], training: bool) -> Tensor:
        batch_size = self._frame(batch).shape[0]
        actions = batch.get(B.ACTIONS)
        if not actions or not (training or self.sample_actions):  # action-free data or sampling: unconditional
            return torch.zeros(batch_size, self.action_encoder.action_dim, device=self.device)
        fps = batch.get(B.FPS)
        if training:
            return self.action_encoder.training_features(actions, fps, one_type=self.one_action_type,
                                                         drop=self.action_drop).to(self.device)
        return self.action_encoder(actions, fps).to(self.device)

    def conditioning(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, fps_id: float | None = None,
        motion_bucket_id: float | None = None, cond_aug: float | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """SVD's sampling conditions (see there) and the batch's actions (zeros where it has none)."""
        cond = super().conditioning(batch, generator, fps_id, motion_bucket_id, cond_aug)
        return {**cond, ACTIONS_KEY: self._action_features(batch, training=False)}

    def image_batch(self, image: Tensor, num_frames: int) -> dict[str, Any]:
        """As SVD's, with the action encoder's default frame rate as the clips' ``fps`` (Vista's rollouts from one
        image: the image at every frame of the first window)."""
        batch = super().image_batch(image, num_frames)
        batch[B.FPS] = torch.full((image.shape[0],), float(self.action_encoder.default_fps), dtype=torch.float32)
        return batch

    def training_conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {**super().training_conditioning(batch), ACTIONS_KEY: self._action_features(batch, training=True)}

    def unconditional(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """Zero image embedding, concat latent and actions (Vista drops all of them)."""
        uncond = super().unconditional(cond)
        if ACTIONS_KEY in cond:
            uncond[ACTIONS_KEY] = torch.zeros_like(cond[ACTIONS_KEY])
        return uncond

    # ---------------------------------------------------------------- training

    def training_given_mask(self, latents: Tensor) -> Tensor:
        """The dynamic prior: the first k frames given, k drawn per clip."""
        b, t, _, h, w = latents.shape
        given_mask, _ = self.prior.sample(b, t, h, w, device=latents.device)
        return given_mask

    def extra_loss_terms(self, step: TrainingStep) -> dict[str, Tensor]:
        """Vista's dynamics and structure losses on the x0 estimate, per clip, weighted like the denoising loss."""
        weight = self.diffusion.weight(step.noise_level)  # (B,)
        return vista_loss_terms(vista_losses(step.denoised, step.x0, step.given_mask, weight, **self.extra_losses))

    # ---------------------------------------------------------------- long rollouts

    @torch.no_grad()
    def rollout_rounds(
        self,
        batch: dict[str, Any],
        rounds: int,
        overlap: int = 3,
        actions: list[dict[str, Tensor]] | None = None,
        guidance: Guidance | None = None,
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        return_latents: bool = False,
        given_frames: int | None = None,
        decode_chunk: int | None | ModuleSetting = MODULE_SETTING,
        decode_overlap: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Long rollout: ``rounds`` windows of the batch's clip length T, each starting from the last
        ``overlap`` latents of the previous one (given, pasted every step) with the image condition moved to
        the first of them (the ``overlap``-th frame from the end); ``actions[r]`` conditions round r (default:
        the batch's; :meth:`rollout_actions`, :meth:`recorded_rollout_actions`). Returns video
        ``(B, T + (T - overlap) (rounds - 1), 3, H, W)`` in [-1, 1], and with ``return_latents`` also the scaled
        latents of those frames ``(B, T + (T - overlap) (rounds - 1), c, h, w)`` (e.g. to decode the whole rollout at
        once in overlapping chunks, as Vista does: :meth:`decode_latents` with ``chunk``/``overlap``).

        guidance: every window's CFG (e.g. Vista's ``TriangleCFG(1.0, 2.5)``); None = the module's. sampler: None =
        the module's. given_frames: frames of the batch given in the first window (None = ``evaluation.given_frames``).
        decode_chunk, decode_overlap: how each window is decoded (the next window's image condition comes from
        it): as :meth:`decode_latents`'s ``chunk``/``overlap`` (default: the module's).
        """
        if rounds < 1 or not overlap >= 0:
            raise ValueError(f"rollout_rounds: need rounds >= 1 and overlap >= 0, got {rounds}, {overlap}")
        source = batch[B.VIDEO]
        t = source.shape[1]
        if overlap >= t:
            raise ValueError(f"rollout_rounds: overlap {overlap} must be below the window length {t}")
        if actions is not None and len(actions) != rounds:
            raise ValueError(f"rollout_rounds: {len(actions)} action sets for {rounds} rounds")
        guidance = self.guidance if guidance is None else guidance
        first = self.evaluation.given_frames if given_frames is None else int(given_frames)
        window = dict(batch)
        latents_so_far: list[Tensor] = []
        frames: list[Tensor] = []
        for r in range(rounds):
            if actions is not None:
                window[B.ACTIONS] = actions[r]
            x0 = self.batch_latents(window, sample=False)  # (B, T, c, h, w); only given frames are used
            b, _, _, h, w = x0.shape
            k = first if r == 0 else overlap
            if r > 0:
                x0 = torch.cat([latents_so_far[-1][:, -overlap:], x0[:, overlap:]], dim=1) if overlap else x0
            mask = self.task_given_mask("prediction", t, h, w, b, k) if k > 0 else None
            cond = self.conditioning(window, generator)
            latents = self.sample_latents(x0, mask, cond, sampler, generator, progress, guidance=guidance)
            latents_so_far.append(latents)
            video = self.decode_latents(latents, decode_chunk, decode_overlap)  # (B, T, 3, H, W)
            frames.append(video if r == 0 else video[:, overlap:])
            # The next window: its first `overlap` frames are this window's last ones (the image condition
            # is the first of them, the (overlap)-th from the end); the rest is a placeholder to be generated.
            window = dict(window)
            window[B.VIDEO] = torch.cat([video[:, t - overlap:], video[:, t - overlap:t - overlap + 1].expand(
                -1, t - overlap, -1, -1, -1)], dim=1) if overlap else video[:, -1:].expand(-1, t, -1, -1, -1)
        video = torch.cat(frames, dim=1)
        if not return_latents:
            return video
        latents = torch.cat([latents_so_far[0], *(part[:, overlap:] for part in latents_so_far[1:])], dim=1)
        return video, latents

    def rollout_actions(self, per_round: Sequence[Mapping[str, np.ndarray]], batch_size: int) -> list[dict[str, Tensor]]:
        """:meth:`rollout_rounds`'s ``actions`` from one set of per-frame arrays per round shared by every clip (e.g.
        an actions file's rounds, ``{key: (T, ...)}`` in :func:`vdiff.data.transforms.clip_actions`' layout): round r's
        arrays repeated over the batch, ``{key: (B, T, ...)}`` on the module's device."""
        return [self._stack_actions([entry] * batch_size) for entry in per_round]

    def recorded_rollout_actions(
        self, recorded: Sequence[Mapping[str, Sequence[Any]] | None], rounds: int, window: int, overlap: int = 3
    ) -> list[dict[str, Tensor]]:
        """:meth:`rollout_rounds`'s ``actions`` from each clip's recorded per-frame actions (a shard json's
        ``actions``; None: nothing recorded): round r covers frames ``r (window - overlap)`` to
        ``r (window - overlap) + window - 1`` of the recording; frames past it are invalid (unconditional)."""
        step = window - overlap
        return [
            self._stack_actions([recorded_round_actions(clip or {}, r * step, window) for clip in recorded])
            for r in range(rounds)
        ]

    def _stack_actions(self, per_clip: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Tensor]:
        """Per-clip action arrays -> the batch's action dict ``{key: (B, T, ...)}`` on the module's device."""
        return {key: torch.from_numpy(np.stack([clip[key] for clip in per_clip])).to(self.device) for key in per_clip[0]}

    @torch.no_grad()
    def uncertainty(
        self, batch: dict[str, Any], num_samples: int = 4, seed: int = 0, given_frames: int | None = None,
        sampler: SamplerConfig | None = None, guidance: Guidance | None = None,
    ) -> Tensor:  # fmt: skip
        """Vista's reward signal: the per-clip variance ``(B,)`` of ``num_samples`` samples of the generated
        frames (latent space, averaged over elements); high = the model is unsure of this future. Sample i draws
        from seed ``seed + i`` (the conditions from ``seed``). given_frames: of the evaluation task (None = the
        module's ``evaluation.given_frames``); sampler, guidance: None = the module's. :meth:`reward` turns the
        variance into Vista's reward."""
        if num_samples < 2:
            raise ValueError(f"uncertainty: need at least 2 samples, got {num_samples}")
        guidance = self.guidance if guidance is None else guidance
        x0 = self.batch_latents(batch, sample=False)
        b, t, _, h, w = x0.shape
        mask = self.task_given_mask(self.evaluation.task, t, h, w, b, given_frames)
        cond = self.conditioning(batch, torch.Generator(device=self.device).manual_seed(seed))
        samples = torch.stack([
            self.sample_latents(x0, mask, cond, sampler, torch.Generator(device=self.device).manual_seed(seed + i),
                                guidance=guidance)
            for i in range(num_samples)
        ])  # (S, B, T, c, h, w)
        generated = (~mask).expand_as(x0).float()  # (B, T, c, h, w)
        variance = samples.var(dim=0)  # (B, T, c, h, w)
        return (variance * generated).flatten(1).sum(1) / generated.flatten(1).sum(1).clamp_min(1.0)

    @staticmethod
    def reward(uncertainty: Tensor, num_frames: int, given_frames: int) -> Tensor:
        """Vista's reward (its ``reward.py``) from :meth:`uncertainty` ``(B,)``: ``exp(-variance)`` with the variance
        averaged over ALL ``num_frames`` frames of the window, the ``given_frames`` given ones included (their variance
        is 0)."""
        return torch.exp(-uncertainty * (num_frames - given_frames) / num_frames)
