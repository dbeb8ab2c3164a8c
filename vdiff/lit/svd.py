"""SVDModule: Stable Video Diffusion's image-to-video UNet trained and fine-tuned end to end.

Stability never released SVD's training code; this module trains SVD and SVD-XT from their real
weights (or a tiny UNet from scratch) with the shared :class:`~vdiff.lit.base.VideoDiffusionModule`:

* EDM as SVD uses it: V-scaling preconditioning with EDM's ``c_noise``, one sigma per clip drawn
  log-normally (``P_mean``/``P_std`` from the recipe), V loss weighting, optional offset noise;
* image-to-video conditioning from a chosen frame (:class:`SVDConditioning`): the CLIP image
  embedding of the clean frame (cross-attention ``context``), the autoencoder's posterior mode of
  the noise-augmented frame (``concat``, unscaled, as SVD) and the micro-conditioning
  ``(fps_id, motion_bucket_id, cond_aug)``, with ``fps_id`` from the clip's fps and
  ``motion_bucket_id`` from its motion score through a fitted :class:`MotionBuckets` map;
* per-condition dropout in training and SVD's per-frame linear classifier-free guidance at sampling
  (the unconditional branch zeroes the image embedding and the concat latent);
* optimizer parameter groups from the recipe: ``train: temporal`` trains the temporal layers only,
  ``spatial_lr_scale`` scales the spatial layers' learning rate (SVD fine-tunes: 0.1); frozen parts
  (autoencoder, image encoder, spatial layers when frozen) never reach the optimizer;
* validation with Euler EDM (SVD: 25 steps, sigma_max 700, SVD's initial-noise scale) scored by the
  shared evaluation protocol (PSNR/SSIM on generated frames beside copy-last-frame).

Batches from video shards encode through the autoencoder; batches from latent shards
(``vdiff encode``) bring the latents, the clean first frame and optionally its CLIP embedding
(``image_embed``), so CLIP does not run in the training loop and the autoencoder encodes only the
one noise-augmented conditioning frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from vdiff.data import batch as B
from vdiff.data.motion_buckets import load_motion_buckets
from vdiff.diffusion.edm import EDMDiffusion, LogNormalSigma, VScalingPrecond
from vdiff.diffusion.flow import FlowMatching
from vdiff.diffusion.guidance import Guidance, LinearCFG, TriangleCFG, VanillaCFG, drop_conditions
from vdiff.diffusion.masks import task_mask
from vdiff.diffusion.sampling import SamplerConfig
from vdiff.lit.base import MODULE_SETTING, ModuleSetting, VideoDiffusionModule, allow_config_objects_in_checkpoints
from vdiff.lit.evaluation import EvalProtocol
from vdiff.lit.optim import OptimizerSettings
from vdiff.models.conditioners import (
    DEFAULT_MOTION_BUCKETS,
    SVD_COND_AUG,
    SVD_FPS_ID,
    SVD_MOTION_BUCKET_ID,
    CLIPImageEmbedder,
    CLIPImageEmbedderConfig,
    SVDConditioner,
    cfg_drop_probs,
    fps_id_from_fps,
    fps_id_of,
    fps_of,
    unconditional,
)
from vdiff.models.presets import config_from_spec
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig

IMAGE_ENCODER_KEY = "vdiff_image_encoder"  # checkpoint entry: the frozen CLIP's config (and file, when file-backed)
IMAGE_ENCODER_PREFIX = "conditioner.image_embedder."
SVD_OPTIMIZER = OptimizerSettings.complete(lr=1e-5)  # SVDModule's and VistaModule's defaults (a recipe's fields replace them)
MOTION_SCORE = B.MOTION_SCORE  # batch key: (B,) curation motion score (NaN where unknown)


@dataclass
class SVDConditioning:
    """How SVD's conditions are made from a clip.

    frame: index of the conditioning frame in the clip (SVD: 0, the first frame).
    cond_aug: std of the noise added to the conditioning frame before encoding (SVD samples with 0.02);
        used at sampling, and in training unless ``cond_aug_lognormal`` is set.
    cond_aug_lognormal: ``(mean, std)`` of ``ln cond_aug`` drawn per clip in training (None = the fixed
        ``cond_aug``). SVD's training distribution was not published; ``(-3.0, 0.5)`` is a common choice.
    fps_id: the fps id given to the network; None = from each clip's fps (``fps - 1``, as SVD).
    motion_bucket_id: the motion bucket; None = from each clip's motion score through ``motion_buckets``
        (clips without a score get SVD's default, 127).
    motion_buckets: a JSON file of a fitted :class:`~vdiff.models.conditioners.MotionBuckets` map (None = the
        documented default map).
    drop_image, drop_concat: training dropout probabilities of the image embedding and the concat latent
        (classifier-free guidance learns from the dropped samples).
    drop_together: drop both with one draw per clip (else independently).
    """

    frame: int = 0
    cond_aug: float = SVD_COND_AUG
    cond_aug_lognormal: tuple[float, float] | None = None
    fps_id: float | None = None
    motion_bucket_id: float | None = None
    motion_buckets: str | None = None
    drop_image: float = 0.1
    drop_concat: float = 0.1
    drop_together: bool = False

    def __post_init__(self) -> None:
        for name in ("drop_image", "drop_concat"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SVDConditioning: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.drop_together and self.drop_image != self.drop_concat:
            raise ValueError("SVDConditioning: drop_together needs drop_image == drop_concat")
        if self.cond_aug < 0:
            raise ValueError(f"SVDConditioning: cond_aug must be >= 0, got {self.cond_aug}")


@dataclass(frozen=True)
class ImageToVideoSettings:
    """What an image-to-video call conditions and guides with (:meth:`SVDModule.image_to_video_settings`).

    fps_id, motion_bucket_id, cond_aug: SVD's micro-conditioning (:mod:`vdiff.models.conditioners`).
    guidance: the CFG schedule; None = none (one conditional network call per step).
    """

    fps_id: float
    motion_bucket_id: float
    cond_aug: float
    guidance: Guidance | None

    @property
    def fps(self) -> float:
        """The frame rate ``fps_id`` stands for (``fps_id + 1``): SVD's scripts write the video at this rate."""
        return fps_of(self.fps_id)


def frame_size_multiple(module: Any) -> tuple[int, int]:
    """``(autoencoder spatial downsampling, UNet total downsampling)`` of an SVD-style module (its ``autoencoder`` and
    ``net_config``); frame sides must be multiples of their product (SVD: 8 x 8 = 64)."""
    autoencoder = int(getattr(module.autoencoder, "spatial_downsample", 1))
    levels = len(getattr(getattr(module, "net_config", None), "channel_mult", (1,)))
    return autoencoder, 2 ** (levels - 1)


def check_frame_size(module: Any, size: tuple[int, int], where: str) -> None:
    """Raise ValueError (prefixed ``where``) unless both sides of ``size`` (H, W) are multiples of
    :func:`frame_size_multiple`'s product."""
    autoencoder, unet = frame_size_multiple(module)
    multiple = autoencoder * unet
    height, width = size
    if height < 1 or width < 1 or height % multiple or width % multiple:
        raise ValueError(
            f"{where}: size {width}x{height} (WxH) is not divisible by {multiple}: frame sides must be multiples of "
            f"the autoencoder's spatial downsampling ({autoencoder}) times the UNet's total downsampling ({unet}) = "
            f"{multiple}"
        )


class SVDModule(VideoDiffusionModule):
    """Trains and samples SVD's UNet (image-to-video, or any mask task such as interpolation).

    Args:
        net: a size of :data:`vdiff.models.unet_svd.UNET_SVD_CONFIGS` (``svd``, ``svd-xt``, ``tiny``), that size
            with fields overridden (``{name: svd-xt, gradient_checkpointing: true}``) or a :class:`UNetSVDConfig`
            mapping (:func:`vdiff.models.presets.config_from_spec`). Its ``in_channels`` must be the latent channels
            plus ``concat_channels`` and ``out_channels`` the latent channels.
        image_encoder: the frozen CLIP image embedder (e.g. ``vdiff.weights.clip.PretrainedCLIPImageEmbedder``
            from a local file); None when every batch brings ``image_embed``.
        conditioning: how the conditions are made (:class:`SVDConditioning`).
        guidance: CFG at sampling; None = SVD's ``LinearCFG(1.0, 2.5)``; ``VanillaCFG(1.0)`` disables it.
        train: ``all`` parameters of the UNet, or ``temporal`` layers only (the spatial ones frozen).
        spatial_lr_scale: learning-rate factor of the spatial layers (SVD/Vista fine-tunes: 0.1).
        net_weights: a LOCAL UNet weights file or folder to start from (a diffusers ``unet/`` or pipeline
            folder, an original ``svd.safetensors``, a vdiff file); checked when the module is built, loaded
            when a fresh ``fit`` builds the network (a resumed run or a loaded checkpoint brings its own).
        net_weights_layout: ``auto``, ``diffusers``, ``sgm`` or ``vdiff`` (see :func:`vdiff.weights.unet_svd.read_unet_svd`),
            or ``sd21-image``: an SD 2.1 image UNet (diffusers folder or ldm/sgm file) inflated into the video UNet
            with temporal layers that leave its output unchanged (:mod:`vdiff.weights.inflate`), or ``vista``: a
            Vista release (``hf://OpenDriveLab/Vista/vista.safetensors``) read directly, its LoRA merged as Vista
            samples (:func:`vdiff.weights.vista.read_vista`; no conversion step).
        paste_cond_frame: paste the conditioning frame's latent during sampling (the sampler keeps it
            fixed). SVD generates it too (False); set True where training kept it clean (a mask task).
        mask_task: a mask mode given clean in training and at sampling beside the image conditioning
            (e.g. ``interpolation`` for SVD's frame interpolation); None = image-to-video only.
        mask_params: parameters of ``mask_task`` (e.g. ``{"step": 4}``).
        decode_chunk, decode_overlap: decode latents in temporal chunks of ``decode_chunk`` frames overlapping by
            ``decode_overlap`` (validation, sampling; SVD decodes 14 at a time, Vista 14 with 3 overlapping);
            None decodes every frame at once.
        diffusion: None = SVD's EDM (V-scaling, log-normal sigma 0.7 / 1.6, V weighting); or a
            :class:`~vdiff.diffusion.flow.FlowMatching` process (the UNet then predicts the velocity).
        sampler: None = Euler, 25 steps, sigma_max 700, SVD's initial-noise scale (EDM), or the flow process's
            default sampler.
        evaluation: None = prediction from 1 given frame (the conditioning frame).
        optimizer: :class:`~vdiff.lit.optim.OptimizerSettings` (lr 1e-5, no weight decay, no warm-up by default).
        autoencoder, optimizer_class: see the base module.
    """

    DEFAULT_OPTIMIZER = SVD_OPTIMIZER

    # Arguments kept out of the hyperparameters (modules and factories: the checkpoint's state or on_save_checkpoint
    # records them); a subclass adds its own, since this class's save_hyperparameters also sees the subclass's.
    UNSAVED_ARGUMENTS: tuple[str, ...] = ("autoencoder", "image_encoder", "optimizer_class")

    def __init__(
        self,
        net: str | dict[str, Any] | UNetSVDConfig = "svd",
        image_encoder: nn.Module | None = None,
        conditioning: SVDConditioning | None = None,
        guidance: LinearCFG | VanillaCFG | TriangleCFG | None = None,
        train: Literal["all", "temporal"] = "all",
        spatial_lr_scale: float = 1.0,
        net_weights: str | None = None,
        net_weights_layout: Literal["auto", "diffusers", "sgm", "vdiff", "sd21-image", "vista"] = "auto",
        paste_cond_frame: bool = False,
        mask_task: str | None = None,
        mask_params: dict[str, Any] | None = None,
        decode_chunk: int | None = None,
        decode_overlap: int = 0,
        diffusion: EDMDiffusion | FlowMatching | None = None,
        sampler: SamplerConfig | None = None,
        evaluation: EvalProtocol | None = None,
        autoencoder: nn.Module | None = None,
        optimizer: OptimizerSettings | None = None,
        optimizer_class: OptimizerCallable | None = None,
    ) -> None:
        if evaluation is None:
            evaluation = EvalProtocol(task="prediction", given_frames=1)
        if sampler is None and not isinstance(diffusion, FlowMatching):
            sampler = self.svd_sampler()
        super().__init__(autoencoder, diffusion, sampler, evaluation, optimizer, optimizer_class)
        self.save_hyperparameters(ignore=list(self.UNSAVED_ARGUMENTS))
        if train not in ("all", "temporal"):
            raise ValueError(f"SVDModule: train must be 'all' or 'temporal', got {train!r}")
        if not spatial_lr_scale >= 0:
            raise ValueError(f"SVDModule: spatial_lr_scale must be >= 0, got {spatial_lr_scale}")
        self.net_config = config_from_spec(UNetSVDConfig, net)
        self.net_weights = None
        if net_weights is not None:
            from vdiff.weights.safetensors_io import resolve_weights_path

            self.net_weights = str(resolve_weights_path(net_weights, what="SVDModule net_weights", allow_dir=True))
        self.net_weights_layout = net_weights_layout
        self.cond_config = conditioning or SVDConditioning()
        self.guidance = guidance if guidance is not None else LinearCFG(1.0, 2.5)
        self.train_part = train
        self.spatial_lr_scale = float(spatial_lr_scale)
        self.paste_cond_frame = paste_cond_frame
        if decode_chunk is not None and not 0 <= decode_overlap < decode_chunk:
            raise ValueError(f"SVDModule: need 0 <= decode_overlap < decode_chunk, got {decode_overlap}, {decode_chunk}")
        self.decode_chunk, self.decode_overlap = decode_chunk, int(decode_overlap)
        self.mask_task = mask_task
        self.mask_params = dict(mask_params or {})
        if mask_task is not None:
            task_mask(mask_task, 4, 1, 1, **self.mask_params)  # validates the name and parameters now
        self.motion_buckets = (
            load_motion_buckets(self.cond_config.motion_buckets) if self.cond_config.motion_buckets else DEFAULT_MOTION_BUCKETS
        )
        self.conditioner = SVDConditioner(image_encoder)
        if image_encoder is not None:
            image_encoder.eval().requires_grad_(False)
            embed_dim = getattr(getattr(image_encoder, "config", None), "embed_dim", None)
            if embed_dim is not None and embed_dim != self.net_config.context_dim:
                raise ValueError(
                    f"SVDModule: the image encoder gives {embed_dim}-d embeddings but net.context_dim is "
                    f"{self.net_config.context_dim}"
                )
        if autoencoder is not None:  # else pixel space, or load_from_checkpoint restoring the recorded one: checked then
            self.check_autoencoder()

    # ---------------------------------------------------------------- defaults and network

    def default_diffusion(self) -> EDMDiffusion:
        return EDMDiffusion(VScalingPrecond(), LogNormalSigma(0.7, 1.6), loss_weighting="v")

    @staticmethod
    def svd_sampler(steps: int = 25) -> SamplerConfig:
        """SVD's sampler: Euler EDM, sigma 0.002..700, rho 7, initial noise scaled by sqrt(1 + sigma_max^2)."""
        return SamplerConfig(name="euler", steps=steps, sigma_min=0.002, sigma_max=700.0, rho=7.0, init_noise_scale="svd")

    def check_autoencoder(self) -> None:
        """The UNet's channels must fit the autoencoder: in = latent + concat, out = latent."""
        c = self.latent_channels
        cfg = self.net_config
        if cfg.concat_channels != c or cfg.in_channels != 2 * c or cfg.out_channels != c:
            raise ValueError(
                f"SVDModule: the autoencoder gives {c} latent channels, so the UNet needs in_channels={2 * c}, "
                f"concat_channels={c}, out_channels={c}; net has in_channels={cfg.in_channels}, "
                f"concat_channels={cfg.concat_channels}, out_channels={cfg.out_channels}"
            )

    def build_network(self) -> nn.Module:
        net = UNetSVD(self.net_config)
        trainer = self._trainer
        if self.net_weights is not None and trainer is not None and trainer.ckpt_path is None:
            self.load_net_weights(net)  # a fresh fit starts from the weights file
        if self.train_part == "temporal":
            for name, param in net.named_parameters():
                param.requires_grad_(self.parameter_role(name) != "spatial")
        return net

    def parameter_role(self, name: str) -> Literal["spatial", "temporal", "new"]:
        """What a UNet parameter is for the optimizer: ``spatial`` (the image UNet's layers: lr x
        ``spatial_lr_scale``, frozen by ``train: temporal``), ``temporal`` (SVD's temporal layers) or ``new``
        (layers the starting weights lack: Vista's action and conditioning-frame layers; for a UNet inflated from
        SD 2.1 also the added-time-id embedder and ``conv_in`` (its concat kernels); full lr, always trained)."""
        if UNetSVD.is_vista_parameter(name):
            return "new"
        if UNetSVD.is_temporal_parameter(name):
            return "temporal"
        if self.net_weights_layout == "sd21-image" and (name.startswith("added_time_embed.") or name == "conv_in.weight"):
            return "new"
        return "spatial"

    def load_net_weights(self, net: nn.Module | None = None) -> nn.Module:
        """Load ``net_weights`` into ``net`` (default: this module's network) strictly; returns it."""
        from vdiff.weights.unet_svd import read_unet_svd

        net = net if net is not None else self.net
        if self.net_weights is None:
            raise ValueError("SVDModule.load_net_weights: no net_weights were given")
        if self.net_weights_layout == "sd21-image":  # an SD 2.1 image UNet, inflated (output = image model's)
            from vdiff.weights.inflate import load_inflated_state_dict

            net.load_state_dict(load_inflated_state_dict(self.net_weights, self.net_config), strict=True)
            return net
        if self.net_weights_layout == "vista":  # Vista's release (sgm file + its LoRA merged, as Vista samples)
            from vdiff.weights.vista import read_vista

            net.load_state_dict(read_vista(self.net_weights, config=self.net_config, lora="merge").state_dict, strict=True)
            return net
        weights = read_unet_svd(self.net_weights, layout=self.net_weights_layout, config=self.net_config)
        net.load_state_dict(weights.state_dict, strict=True)
        return net

    @property
    def image_encoder(self) -> nn.Module | None:
        return self.conditioner.image_embedder

    # ---------------------------------------------------------------- conditioning

    def _frame(self, batch: dict[str, Any]) -> Tensor:
        """The clean conditioning frame ``(B, 3, H, W)`` in [-1, 1]."""
        index = self.cond_config.frame
        if B.VIDEO in batch:
            return batch[B.VIDEO][:, index]
        if B.FIRST_FRAME in batch and index == 0:
            return batch[B.FIRST_FRAME]
        raise KeyError(
            f"SVDModule: the batch has no 'video' and conditioning.frame={index}; latent shards store only the "
            "first frame ('first_frame'), so use conditioning.frame: 0 with them"
        )

    def _micro(
        self, batch: dict[str, Any], batch_size: int, fps_id: float | None = None, motion_bucket_id: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """fps_id and motion_bucket_id ``(B,)`` of a batch: the ones given, else the conditioning's, else from the
        batch's ``fps`` and motion scores."""
        cfg = self.cond_config
        fps_id = cfg.fps_id if fps_id is None else fps_id
        motion_bucket_id = cfg.motion_bucket_id if motion_bucket_id is None else motion_bucket_id
        if fps_id is not None:
            fps_id = torch.full((batch_size,), float(fps_id))
        elif B.FPS in batch:
            fps_id = fps_id_from_fps(batch[B.FPS].float().cpu())
        else:
            raise KeyError("SVDModule: the batch has no 'fps' and conditioning.fps_id is not set")
        if motion_bucket_id is not None:
            bucket = torch.full((batch_size,), float(motion_bucket_id))
        else:
            scores = batch.get(MOTION_SCORE)
            bucket = torch.full((batch_size,), float(SVD_MOTION_BUCKET_ID))
            if scores is not None:
                scores = scores.float().cpu()
                known = torch.isfinite(scores)
                if known.any():
                    bucket[known] = self.motion_buckets(scores[known]).float()
        return fps_id.to(self.device), bucket.to(self.device)

    def _conditions(
        self, batch: dict[str, Any], cond_aug: Tensor, generator: torch.Generator | None, fps_id: float | None = None,
        motion_bucket_id: float | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        frame = self._frame(batch)
        num_frames = int((batch[B.VIDEO] if B.VIDEO in batch else batch[B.LATENTS]).shape[1])
        fps_id, bucket = self._micro(batch, frame.shape[0], fps_id, motion_bucket_id)
        with torch.no_grad():
            return self.conditioner(
                frame, self.autoencoder, num_frames, fps_id=fps_id, motion_bucket_id=bucket, cond_aug=cond_aug,
                image_embed=batch.get(B.IMAGE_EMBED), generator=generator,
            )  # fmt: skip

    def conditioning(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, fps_id: float | None = None,
        motion_bucket_id: float | None = None, cond_aug: float | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Sampling conditions: the fixed ``cond_aug``, no dropout. ``fps_id``, ``motion_bucket_id`` and ``cond_aug``
        replace the conditioning's (and the batch's ``fps`` and motion scores) for every clip when given."""
        batch_size = self._frame(batch).shape[0]
        cond_aug = self.cond_config.cond_aug if cond_aug is None else cond_aug
        cond_aug = torch.full((batch_size,), float(cond_aug), device=self.device)
        return self._conditions(batch, cond_aug, generator, fps_id, motion_bucket_id)

    def training_conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Training conditions: ``cond_aug`` drawn per clip when configured, then per-condition dropout."""
        cfg = self.cond_config
        batch_size = self._frame(batch).shape[0]
        if cfg.cond_aug_lognormal is not None:
            mean, std = cfg.cond_aug_lognormal
            cond_aug = torch.exp(mean + std * torch.randn(batch_size, device=self.device))
        else:
            cond_aug = torch.full((batch_size,), float(cfg.cond_aug), device=self.device)
        cond = self._conditions(batch, cond_aug, None)
        probs = cfg_drop_probs(cfg.drop_image, cfg.drop_concat)
        groups = [tuple(probs)] if cfg.drop_together else ()
        return drop_conditions(cond, probs, groups=groups)

    def unconditional(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """SVD's unconditional branch: zero image embedding and concat latent; micro-conditioning shared."""
        return unconditional(cond)

    # ---------------------------------------------------------------- masks

    def training_given_mask(self, latents: Tensor) -> Tensor | None:
        """The ``mask_task`` mask (true = given, clean, left out of the loss), or None for image-to-video."""
        if self.mask_task is None:
            return None
        b, t, _, h, w = latents.shape
        return task_mask(self.mask_task, t, h, w, batch=b, device=latents.device, **self.mask_params)

    def task_given_mask(self, task, num_frames, height, width, batch, given_frames=None) -> Tensor:
        """As the base, with ``mask_params`` for the module's own ``mask_task`` (e.g. the interpolation step)."""
        if task == self.mask_task and self.mask_params:
            return task_mask(task, num_frames, height, width, batch=batch, device=self.device, **self.mask_params)
        return super().task_given_mask(task, num_frames, height, width, batch, given_frames)

    @torch.no_grad()
    def sample_latents(
        self, given, given_mask, cond=None, sampler=None, generator=None, progress=False, *,
        guidance: Guidance | None | ModuleSetting = MODULE_SETTING, noise: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """As the base, but the conditioning frame is generated too unless ``paste_cond_frame`` (SVD)."""
        if not self.paste_cond_frame and given_mask is not None:
            frame = torch.zeros(given_mask.shape[1], dtype=torch.bool, device=given_mask.device)
            frame[self.cond_config.frame] = True
            given_mask = given_mask & ~frame.view(1, -1, 1, 1, 1)
            if not bool(given_mask.any()):
                given_mask = None
        return super().sample_latents(given, given_mask, cond, sampler, generator, progress, guidance=guidance,
                                      noise=noise)  # fmt: skip

    # ---------------------------------------------------------------- image to video

    def image_batch(self, image: Tensor, num_frames: int) -> dict[str, Any]:
        """A batch of clips of ``num_frames`` frames that all show ``image`` ``(B, 3, H, W)`` (a view, no copy): what
        :meth:`conditioning` makes an image's conditions from."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: images must be (B, 3, H, W), got {tuple(image.shape)}")
        return {B.VIDEO: image[:, None].expand(-1, int(num_frames), -1, -1, -1)}

    def guidance_with(self, min_scale: float | None = None, max_scale: float | None = None) -> Guidance | None:
        """SVD's frame-wise ``LinearCFG(min_scale, max_scale)``, a scale left None taken from the module's schedule
        (1.0 / 2.5 where it has none); the module's guidance itself when both are None."""
        if min_scale is None and max_scale is None:
            return self.guidance
        low = min_scale if min_scale is not None else getattr(self.guidance, "min_scale", 1.0)
        high = max_scale if max_scale is not None else getattr(self.guidance, "max_scale", 2.5)
        return LinearCFG(float(low), float(high))

    def image_to_video_settings(
        self, num_frames: int, fps_id: float | None = None, motion_bucket_id: float | None = None,
        cond_aug: float | None = None, guidance: Guidance | None = None, source_fps: float | None = None,
    ) -> ImageToVideoSettings:  # fmt: skip
        """The settings :meth:`image_to_video` samples ``num_frames`` frames with; each is the argument, else the
        module's (``conditioning``, ``guidance``), else SVD's default.

        fps_id: else ``conditioning.fps_id``, else ``source_fps - 1`` (the rate of the image's video, when known),
            else SVD's 6 (7 fps).
        motion_bucket_id: else ``conditioning.motion_bucket_id``, else SVD's 127.
        cond_aug: else ``conditioning.cond_aug`` (SVD: 0.02).
        guidance: else the module's. A schedule of 1 at every frame is the conditional model: it becomes None (no
            guidance, one conditional call per step, as diffusers' pipeline does when its maximum scale is 1).
        """
        cfg = self.cond_config
        if fps_id is None:
            fps_id = cfg.fps_id if cfg.fps_id is not None else fps_id_of(source_fps) if source_fps else SVD_FPS_ID
        if motion_bucket_id is None:
            motion_bucket_id = cfg.motion_bucket_id if cfg.motion_bucket_id is not None else SVD_MOTION_BUCKET_ID
        guidance = self.guidance if guidance is None else guidance
        if guidance is not None and bool((guidance.scale(int(num_frames)) == 1.0).all()):
            guidance = None
        return ImageToVideoSettings(float(fps_id), float(motion_bucket_id),
                                    float(cfg.cond_aug if cond_aug is None else cond_aug), guidance)  # fmt: skip

    @torch.no_grad()
    def image_latents(
        self, image: Tensor, num_frames: int, fps_id: float | None = None, motion_bucket_id: float | None = None,
        cond_aug: float | None = None, guidance: Guidance | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None, sampler: SamplerConfig | None = None, progress: bool = False,
    ) -> Tensor:  # fmt: skip
        """Scaled latents ``(B, T, c, h, w)`` of ``num_frames``-frame clips sampled from images ``(B, 3, H, W)`` in
        [-1, 1]: :meth:`image_to_video` without the decode (same arguments)."""
        if self.mask_task is not None:
            raise ValueError(
                f"{type(self).__name__}.image_to_video: this module was trained with mask_task={self.mask_task!r}, "
                "which needs given frames beside the image; sample clips with generate(batch, task=...)"
            )
        image = image.to(self.device)
        batch = self.image_batch(image, num_frames)
        b, t, _, height, width = batch[B.VIDEO].shape
        check_frame_size(self, (height, width), f"{type(self).__name__}.image_to_video")
        index = self.cond_config.frame
        if not 0 <= index < t:
            raise ValueError(f"{type(self).__name__}.image_to_video: the module conditions on frame {index}; "
                             f"num_frames={t} is too short")  # fmt: skip
        settings = self.image_to_video_settings(t, fps_id, motion_bucket_id, cond_aug, guidance)
        cond = self.conditioning(batch, generator, fps_id=settings.fps_id, motion_bucket_id=settings.motion_bucket_id,
                                 cond_aug=settings.cond_aug)  # fmt: skip
        f = frame_size_multiple(self)[0]
        given = image.new_zeros(b, t, self.latent_channels, height // f, width // f)
        given_mask = torch.zeros(b, t, 1, 1, 1, dtype=torch.bool, device=self.device)
        given_mask[:, index] = True  # generated too unless paste_cond_frame (sample_latents)
        if self.paste_cond_frame:
            given[:, index] = self.encode_video(image[:, None], sample=False)[:, 0]
        return self.sample_latents(given, given_mask, cond, sampler, generator, progress, guidance=settings.guidance,
                                   noise=noise)  # fmt: skip

    @torch.no_grad()
    def image_to_video(
        self, image: Tensor, num_frames: int, fps_id: float | None = None, motion_bucket_id: float | None = None,
        cond_aug: float | None = None, guidance: Guidance | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None, decode_chunk: int | None = None, decode_overlap: int = 0,
        sampler: SamplerConfig | None = None, progress: bool = False,
    ) -> Tensor:  # fmt: skip
        """SVD image-to-video: images ``(B, 3, H, W)`` in [-1, 1] -> videos ``(B, num_frames, 3, H, W)`` in [-1, 1].

        Conditions as SVD samples: the CLIP embedding of the clean image, the autoencoder's posterior mode of the image
        plus ``cond_aug`` noise, the micro-conditioning ``(fps_id, motion_bucket_id, cond_aug)``; then the sampler
        (Euler EDM with SVD's initial-noise scale) under frame-wise CFG, and a decode in temporal chunks.
        Nothing on the module changes: every setting travels as an argument.

        fps_id, motion_bucket_id, cond_aug, guidance: None = the module's, else SVD's defaults
            (:meth:`image_to_video_settings`; a schedule of 1 at every frame samples without guidance).
        noise: the standard-normal initial latents ``(B, T, c, h, w)`` (before the sampler's initial-noise scale).
        generator: draws, as diffusers' ``StableVideoDiffusionPipeline`` draws from its generator, first the
            conditioning-frame noise ``(B, 3, H, W)``, then the initial latents (unless ``noise`` is given); with the
            same weights, image, seed and settings both give the same video.
        decode_chunk, decode_overlap: decode this many frames at a time, consecutive chunks sharing ``decode_overlap``
            frames (cross-faded); None decodes every frame at once (:meth:`decode_latents`).
        sampler: None = the module's (e.g. ``module.sampler_with(steps=25)``). progress: show a progress bar.
        """
        latents = self.image_latents(image, num_frames, fps_id, motion_bucket_id, cond_aug, guidance, noise, generator,
                                     sampler, progress)  # fmt: skip
        return self.decode_latents(latents, decode_chunk, decode_overlap)

    # ---------------------------------------------------------------- optimisation and EMA

    def ema_named_parameters(self):
        for name, param in super().ema_named_parameters():
            if not name.startswith("conditioner."):
                yield name, param

    def frozen_parts(self) -> list[nn.Module | None]:
        """The autoencoder and the CLIP image encoder."""
        return [*super().frozen_parts(), self.image_encoder]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight-decay groups split by :meth:`parameter_role` (spatial: lr x ``spatial_lr_scale``); only trainable
        UNet parameters (the autoencoder and image encoder are frozen)."""
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.net.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim >= 2 and "embed" not in name
            groups.setdefault((self.parameter_role(name), decay), []).append(param)
        out, settings = [], self.optimizer_settings
        for (role, decay), params in sorted(groups.items()):
            scale = self.spatial_lr_scale if role == "spatial" else 1.0
            if scale == 0.0:
                continue
            out.append({"params": params, "weight_decay": settings.weight_decay if decay else 0.0,
                        "lr": settings.lr * scale, "name": f"{role}{'' if decay else '_no_decay'}"})
        return out

    # ---------------------------------------------------------------- checkpoints (frozen image encoder)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        encoder = self.image_encoder
        if encoder is None:
            return
        entry: dict[str, Any] = {"config": encoder.config.to_dict()}
        if getattr(encoder, "weights_sha256", None):
            from vdiff.lit.autoencoder_source import describe_weights_file

            entry.update(describe_weights_file(encoder))
            self.drop_file_backed_state(checkpoint, IMAGE_ENCODER_PREFIX)
        checkpoint[IMAGE_ENCODER_KEY] = entry

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        entry = checkpoint.get(IMAGE_ENCODER_KEY)
        if entry is None:
            return
        from vdiff.lit import autoencoder_source as source

        current = self.image_encoder
        sha256 = entry.get("sha256")
        if current is None:
            if sha256:
                from vdiff.weights.clip import PretrainedCLIPImageEmbedder

                path = source.find_recorded_weights({**entry, "what": "image encoder"})  # also under $VDIFF_WEIGHTS
                source.check_recorded_config_file(entry, path, "image encoder")  # before a changed one is read
                current = PretrainedCLIPImageEmbedder(path, layout=entry["layout"],
                                                      config=CLIPImageEmbedderConfig.from_dict(entry["config"]))
                if current.weights_sha256 != sha256:
                    raise ValueError(f"{path}: the image-encoder weights file changed since the checkpoint "
                                     "was written (sha256 differs)")
                source.check_config_file(entry, current.config_file, current.config_file_content, "image encoder")
            else:
                current = CLIPImageEmbedder(CLIPImageEmbedderConfig.from_dict(entry["config"]))
            self.conditioner.image_embedder = current.to(self.device).eval().requires_grad_(False)
        elif sha256 and getattr(current, "weights_sha256", None) != sha256:
            raise ValueError("SVDModule: the image encoder given is not the file this checkpoint was trained with "
                             f"({entry['path']})")
        elif sha256:
            source.check_part_config(entry, current, "image encoder")
        if sha256:
            self.refill_file_backed_state(checkpoint, IMAGE_ENCODER_PREFIX, current)


allow_config_objects_in_checkpoints(UNetSVDConfig, SVDConditioning, CLIPImageEmbedderConfig)
