"""AutoencoderModule: trains or fine-tunes a KL video autoencoder (SD VAE layout, optional SVD temporal decoder).

Loss per frame, in taming-transformers' / the SD VAE's scale (sums over pixels and latent elements of a frame,
averaged over frames), so their weights carry over (KL 1e-6, discriminator 0.5)::

    nll  = P * (rec + lpips_weight * lpips)        P = 3*H*W, rec = mean |x - x'| (or squared), lpips per frame
    loss = nll + kl_weight(step) * kl + disc_weight * w_adaptive * g_loss     (GAN term from ``disc_start`` on)

``kl_weight(step)`` rises linearly from 0 over ``kl_warmup_steps``; ``w_adaptive`` balances the gradient norms
of ``nll`` and ``g_loss`` at the decoder's last layer (:func:`~vdiff.models.discriminator.adaptive_gan_weight`).
With a discriminator the module optimises manually with two optimizers (autoencoder, discriminator), each
stepped once per batch, so Lightning's ``global_step`` (and ``trainer.max_steps``) counts 2 per batch; the
schedules here (KL warm-up, ``disc_start``) count *batches* (:attr:`AutoencoderModule.batches_trained`).

``freeze_encoder`` fine-tunes only the decoder, as SVD fine-tuned its temporal decoder on top of the frozen
SD encoder (the KL term then has no trainable input and is only logged).

Validation logs PSNR/SSIM (and LPIPS when its network is built) of the posterior-mode reconstruction, the
losses, a blob indicator of the latents and of the decoder's feature maps (:mod:`vdiff.metrics.blob`), and a
per-patch error map image; ``generate`` returns reconstructions so :class:`~vdiff.callbacks.SampleVideos`
logs ground truth | reconstruction side by side.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from vdiff.data import batch as B
from vdiff.lit.base import Generated
from vdiff.lit.frozen import FrozenPartsInEvalMode
from vdiff.lit.optim import OptimizerSettings, settings_in_old_checkpoint
from vdiff.lit.safe_loading import load_checkpoint
from vdiff.metrics.blob import DEFAULT_BLOB_THRESHOLD, FeatureNormProbe, blob_ratio
from vdiff.metrics.frames import frame_psnr, frame_ssim
from vdiff.metrics.lpips import LPIPS, LpipsNet
from vdiff.models.autoencoder import AutoencoderConfig, DiagonalGaussian, TemporalDecoder, VideoAutoencoder
from vdiff.models.discriminator import (
    DiscNorm,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from vdiff.models.presets import config_from_spec
from vdiff.weights.autoencoder import LoadLayout, SaveLayout, load_autoencoder, save_autoencoder
from vdiff.weights.registry import lpips_backbone
from vdiff.weights.safetensors_io import resolve_weights_path


def patch_error_map(pred: Tensor, target: Tensor, patch: int) -> Tensor:
    """Mean absolute error per ``patch x patch`` pixel block over channels and frames: ``(B, H/p, W/p)``."""
    error = (pred.float() - target.float()).abs().mean(dim=(1, 2))  # (B, H, W)
    return F.avg_pool2d(error.unsqueeze(1), patch, ceil_mode=True).squeeze(1)  # (B, H/p, W/p)


def heat_colours(values: Tensor) -> Tensor:
    """Values in [0, 1] ``(...)`` -> RGB ``(..., 3)`` on a black-red-yellow-white ("hot") scale."""
    v = values.clamp(0, 1)
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=-1)


def _keep_own_weights(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: entries of ``module`` missing from ``state_dict`` keep their current values."""
    for name, value in module.state_dict().items():
        state_dict.setdefault(prefix + name, value)


AUTOENCODER_OPTIMIZER = OptimizerSettings.complete(lr=4.5e-6, betas=(0.5, 0.9))  # taming's AdamW (its lr: 4.5e-6 x batch)


class AutoencoderModule(FrozenPartsInEvalMode, L.LightningModule):
    """Reconstruction + LPIPS + KL (+ PatchGAN) training of a :class:`~vdiff.models.autoencoder.VideoAutoencoder`.

    Batches are video batches (:mod:`vdiff.data.batch`): ``video`` ``(B, T, 3, H, W)`` in [-1, 1].

    Args:
        net: the architecture: a preset name of ``AUTOENCODER_CONFIGS`` (``"sd"``, ``"svd"``, ``"tiny"``,
            ``"tiny-svd"``), a preset with fields overridden (``{name: svd, dropout: 0.1}``) or an
            :class:`AutoencoderConfig` (a mapping of its fields in a recipe; its defaults are the SD 2.1 VAE); see
            :func:`vdiff.models.presets.config_from_spec`. None with ``pretrained``: the config stored with the
            weights (a diffusers folder's ``config.json``, a vdiff file's metadata), else a guess; None without:
            SD 2.1. On the command line a field override (``--model.init_args.net.ch 64``) changes one field of the
            recipe's mapping (its ``name`` kept); after a bare preset name it would start from the dataclass defaults
            (SD 2.1), so recipes write ``net: {name: svd}``, or give ``--model.init_args.net '{name: svd, ch: 64}'``.
        pretrained: LOCAL weights to start from: a diffusers model folder or a weights file (a relative path is
            also looked up in ``$VDIFF_WEIGHTS``); checked when the module is built, so a missing file fails
            before any training. Read by :func:`vdiff.weights.autoencoder.load_autoencoder`.
        pretrained_layout: key layout of ``pretrained``: ``auto`` (detected), ``vdiff``, ``diffusers`` or ``sgm``.
        freeze_encoder: train only the decoder (and post-quant conv); encoder and quant conv stay fixed.
        rec_loss: ``l1`` or ``l2`` pixel reconstruction loss.
        lpips_weight: LPIPS weight (SD: 1.0). Its torchvision backbone is read from ``$TORCH_HOME`` or downloaded
            into the weights cache when the module is built (:func:`vdiff.weights.registry.lpips_backbone`), unless
            this is 0 and ``val_lpips`` is off.
        lpips_net: LPIPS backbone: ``alex`` (standard), ``vgg`` or ``squeeze``.
        val_lpips: log LPIPS in validation; None = when ``lpips_weight`` > 0.
        kl_weight: KL weight after warm-up (SD: 1e-6).
        kl_warmup_steps: batches over which the KL weight rises linearly from 0.
        sample_posterior: decode a posterior sample in training (True, as SD) or its mean.
        disc_weight: adversarial weight (SD: 0.5); 0 = no discriminator.
        disc_start: batch from which the GAN terms are on (SD: 50001).
        disc_channels, disc_layers, disc_norm: PatchGAN size (64, 3, batch norm as taming).
        disc_max_adaptive_weight: clamp of the adaptive weight (taming: 1e4).
        optimizer: AdamW of the autoencoder and the discriminator, :class:`~vdiff.lit.optim.OptimizerSettings`
            (defaults: lr 4.5e-6, betas 0.5/0.9 as taming, whose lr is 4.5e-6 x batch); ``warmup_steps`` and
            ``lr_decay`` count batches (cosine ends at ``trainer.max_steps`` / the number of optimizers).
        disc_lr: discriminator learning rate (default ``optimizer.lr``).
        optimizer_class, disc_optimizer_class: other optimizer classes from the recipe (replace AdamW).
        grad_clip_val: gradient norm clip for both optimizers (manual optimisation ignores the Trainer's).
        blob_threshold: blob ratio above which validation warns (see :mod:`vdiff.metrics.blob`).
        error_patch: side in pixels of the patches of the validation error map.
        val_seed: seed of validation posterior samples (the losses use a posterior sample).
    """

    DEFAULT_OPTIMIZER = AUTOENCODER_OPTIMIZER

    def __init__(
        self,
        net: str | dict[str, Any] | AutoencoderConfig | None = None,
        pretrained: str | None = None,
        pretrained_layout: LoadLayout = "auto",
        freeze_encoder: bool = False,
        rec_loss: Literal["l1", "l2"] = "l1",
        lpips_weight: float = 1.0,
        lpips_net: LpipsNet = "alex",
        val_lpips: bool | None = None,
        kl_weight: float = 1e-6,
        kl_warmup_steps: int = 0,
        sample_posterior: bool = True,
        disc_weight: float = 0.0,
        disc_start: int = 50001,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_norm: DiscNorm = "batch",
        disc_max_adaptive_weight: float = 1e4,
        optimizer: OptimizerSettings | None = None,
        disc_lr: float | None = None,
        optimizer_class: OptimizerCallable | None = None,
        disc_optimizer_class: OptimizerCallable | None = None,
        grad_clip_val: float | None = None,
        blob_threshold: float = DEFAULT_BLOB_THRESHOLD,
        error_patch: int = 8,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        if net is not None:  # a preset name, a preset with overrides, or fields (YAML can hand the dataclass as a dict)
            net = config_from_spec(AutoencoderConfig, net)
        self.save_hyperparameters(ignore=["optimizer_class", "disc_optimizer_class"])
        self.optimizer_settings = OptimizerSettings.of(optimizer, self.DEFAULT_OPTIMIZER)
        self.config: AutoencoderConfig | None = net  # the dataclass (hparams hold what the recipe gave)
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"AutoencoderModule: rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        for name, value in (("lpips_weight", lpips_weight), ("kl_weight", kl_weight), ("disc_weight", disc_weight)):
            if not value >= 0:
                raise ValueError(f"AutoencoderModule: {name} must be >= 0, got {value}")
        if kl_warmup_steps < 0 or disc_start < 0 or error_patch < 1:
            raise ValueError("AutoencoderModule: kl_warmup_steps and disc_start must be >= 0, error_patch >= 1")
        self.use_lpips_loss = lpips_weight > 0
        self.use_val_lpips = self.use_lpips_loss if val_lpips is None else bool(val_lpips)
        # Fail before any training when a local file is missing (both raise FileNotFoundError naming it).
        if pretrained is not None:
            resolve_weights_path(pretrained, what="pretrained autoencoder weights", allow_dir=True)
        # LPIPS' torchvision backbone: $TORCH_HOME's, else downloaded into the weights cache (before any training).
        self.lpips_backbone = lpips_backbone(lpips_net) if self.use_lpips_loss or self.use_val_lpips else None
        self.optimizer_factory = optimizer_class
        self.disc_optimizer_factory = disc_optimizer_class
        self.automatic_optimization = False
        self.autoencoder: VideoAutoencoder | None = None
        self.discriminator: PatchDiscriminator | None = None
        self.lpips: LPIPS | None = None
        self.register_buffer("batches_trained", torch.zeros((), dtype=torch.long))
        self._val_panel: Tensor | None = None  # first validation batch: truth | reconstruction | error map
        self._worst_patch: Tensor | None = None
        self._val_blob_flags = 0

    # ---------------------------------------------------------------- building

    def build_autoencoder(self) -> VideoAutoencoder:
        """The network: from ``pretrained`` (a local file or folder) or freshly initialised from ``net``."""
        hp = self.hparams
        if hp.pretrained is not None:
            return load_autoencoder(hp.pretrained, layout=hp.pretrained_layout, config=self.config)
        return VideoAutoencoder(self.config or AutoencoderConfig())

    def configure_model(self) -> None:
        if self.autoencoder is not None:
            return
        hp = self.hparams
        self.autoencoder = self.build_autoencoder()
        if hp.freeze_encoder:
            for module in (self.autoencoder.encoder, self.autoencoder.quant_conv):
                if module is not None:
                    module.requires_grad_(False)
        if hp.disc_weight > 0:
            self.discriminator = PatchDiscriminator(
                self.autoencoder.config.out_channels, hp.disc_channels, hp.disc_layers, hp.disc_norm
            )
        if self.use_lpips_loss or self.use_val_lpips:
            self.lpips = LPIPS(hp.lpips_net, backbone=self.lpips_backbone)
            # Fixed, local weights: kept out of checkpoints (see on_save_checkpoint) and restored from the
            # built network when a state dict lacks them.
            self.lpips.register_load_state_dict_pre_hook(_keep_own_weights)

    def last_layer(self) -> Tensor:
        """Weight of the decoder's last layer, where the adaptive GAN weight compares gradients."""
        decoder = self.autoencoder.decoder
        if isinstance(decoder, TemporalDecoder):
            return decoder.time_conv_out.weight
        return decoder.conv_out.weight

    def ema_parameters(self) -> list[nn.Parameter]:
        """Parameters an EMA callback tracks: the trainable autoencoder weights (not the discriminator)."""
        return [p for p in self.autoencoder.parameters() if p.requires_grad]

    def frozen_parts(self) -> list[nn.Module | None]:
        """The LPIPS network of the loss (frozen, in eval mode)."""
        return [self.lpips]

    # ---------------------------------------------------------------- losses

    def kl_weight_at(self, step: int) -> float:
        """KL weight at batch ``step``: linear warm-up from 0 to ``kl_weight`` over ``kl_warmup_steps``."""
        warmup = self.hparams.kl_warmup_steps
        return float(self.hparams.kl_weight) * (min(1.0, step / warmup) if warmup else 1.0)

    def reconstruct(
        self, video: Tensor, sample: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """``video (B, T, 3, H, W)`` -> ``(reconstruction, posterior)``; no encoder graph when it is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_encoder):
            posterior = self.autoencoder.encode(video)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, T, c, h, w)
        return self.autoencoder.decode(z), posterior

    def reconstruction_losses(self, recon: Tensor, video: Tensor, posterior: DiagonalGaussian) -> dict[str, Tensor]:
        """Mean-form terms and the taming-scale ``nll`` and per-frame ``kl`` (scalars)."""
        diff = recon.float() - video.float()
        rec = diff.abs().mean() if self.hparams.rec_loss == "l1" else diff.pow(2).mean()
        pixels = video[0, 0].numel()  # 3*H*W: taming sums the per-pixel loss over a frame
        out = {"rec": rec}
        nll_mean = rec
        if self.use_lpips_loss:
            out["lpips"] = self.lpips(recon.float(), video.float()).mean()
            nll_mean = nll_mean + self.hparams.lpips_weight * out["lpips"]
        out["nll"] = pixels * nll_mean
        out["kl"] = (posterior.kl() / video.shape[1]).mean()  # per frame, averaged over clips
        return out

    # ---------------------------------------------------------------- training

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.hparams.disc_start

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        video = batch[B.VIDEO]
        step = int(self.batches_trained)
        optimizers = self.optimizers()
        opt_ae, opt_d = (optimizers if isinstance(optimizers, (list, tuple)) else (optimizers, None))
        logs: dict[str, Tensor] = {}

        # -- autoencoder
        if opt_d is not None:
            self.toggle_optimizer(opt_ae)
        recon, posterior = self.reconstruct(video, sample=self.hparams.sample_posterior)
        losses = self.reconstruction_losses(recon, video, posterior)
        kl_weight = self.kl_weight_at(step)
        loss = losses["nll"] + kl_weight * losses["kl"]
        if self.gan_active(step):
            g_loss = hinge_g_loss(self.discriminator(recon))
            weight = adaptive_gan_weight(
                losses["nll"], g_loss, self.last_layer(), self.hparams.disc_max_adaptive_weight
            ) * self.hparams.disc_weight
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=weight)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_ae)
        opt_ae.step()
        if opt_d is not None:
            self.untoggle_optimizer(opt_ae)

        # -- discriminator (stepped every batch so the step count is regular; no gradient before disc_start)
        if opt_d is not None:
            self.toggle_optimizer(opt_d)
            opt_d.zero_grad(set_to_none=True)
            if self.gan_active(step):
                logits_real = self.discriminator(video.detach())
                logits_fake = self.discriminator(recon.detach())
                d_loss = hinge_d_loss(logits_real, logits_fake)
                self.manual_backward(d_loss)
                self._clip(opt_d)
                logs.update(d_loss=d_loss.detach(), logits_real=logits_real.mean().detach(),
                            logits_fake=logits_fake.mean().detach())
            opt_d.step()
            self.untoggle_optimizer(opt_d)

        self._step_schedulers()
        self.batches_trained += 1
        logs.update({k: v.detach() for k, v in losses.items()}, loss=loss.detach())
        logs["kl_weight"] = torch.tensor(kl_weight)
        size = video.shape[0]
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=size)
        return loss.detach()

    def _clip(self, optimizer) -> None:
        if self.hparams.grad_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip_val, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        """AdamW (or ``optimizer_class``) of the autoencoder and, with a discriminator, of the discriminator; with
        ``optimizer.warmup_steps`` or ``lr_decay: cosine`` a schedule for each, stepped once per batch."""
        settings = self.optimizer_settings
        params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if not params:
            raise ValueError("AutoencoderModule: no trainable autoencoder parameter")
        optimizers = [self.optimizer_factory(params) if self.optimizer_factory is not None else settings.adamw(params)]
        if self.discriminator is not None:
            disc_params = list(self.discriminator.parameters())
            if self.disc_optimizer_factory is not None:
                optimizers.append(self.disc_optimizer_factory(disc_params))
            else:
                optimizers.append(settings.adamw(disc_params, lr=self.hparams.disc_lr or settings.lr))
        if not settings.warmup_steps and settings.lr_decay == "constant":
            return optimizers[0] if len(optimizers) == 1 else optimizers
        # Every optimizer steps once per batch, so trainer.max_steps counts len(optimizers) steps per batch.
        cosine = settings.lr_decay == "cosine" and self._trainer is not None
        total = self.trainer.estimated_stepping_batches / len(optimizers) if cosine else None
        return optimizers, [settings.scheduler(optimizer, total) for optimizer in optimizers]

    def _step_schedulers(self) -> None:
        """Manual optimisation: Lightning leaves the learning-rate schedules to the module (one step per batch)."""
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []:
            scheduler.step()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written before the ``optimizer`` group holds flat ``lr``, ``betas``, ``weight_decay``: read
        them into the group when the module was loaded without a trainer (``load_from_checkpoint``)."""
        super().on_load_checkpoint(checkpoint)
        settings = settings_in_old_checkpoint(checkpoint, self.DEFAULT_OPTIMIZER, type(self).__name__)
        if settings is not None and self._trainer is None:
            self.optimizer_settings = self.hparams["optimizer"] = settings

    # ---------------------------------------------------------------- reconstruction as "generation"

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], generator: torch.Generator | None = None, **options: Any) -> Generated:
        """Reconstruct ``batch["video"]`` through the posterior mode (the callback protocol of ``vdiff.lit.base``).

        No frame is given: ``given_frames`` is all False. ``generator`` and other options are accepted for the
        protocol and unused (the mode is deterministic).
        """
        video = batch[B.VIDEO]
        recon, _ = self.reconstruct(video, sample=False)
        given = torch.zeros(video.shape[:2], dtype=torch.bool, device=video.device)
        return Generated(video=recon.clamp(-1, 1), given_frames=given, target=video)

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-clip ``(B,)`` scores of the posterior-mode reconstruction: psnr, ssim, lpips (when built),
        blob_latent and blob_decoder; plus ``recon`` ``(B, T, 3, H, W)`` and scalar losses under ``loss/``."""
        video = batch[B.VIDEO]
        b = video.shape[0]
        posterior = self.autoencoder.encode(video)
        decoder = self.autoencoder.decoder
        probed = {f"up{i}": level for i, level in enumerate(decoder.up)} | {"mid": decoder.mid}
        with FeatureNormProbe(probed, batch_size=b) as probe:
            recon = self.autoencoder.decode(posterior.mode())
        clamped = recon.clamp(-1, 1)
        scores = {
            "psnr": frame_psnr(clamped, video).mean(dim=1),
            "ssim": frame_ssim(clamped, video).mean(dim=1),
            "blob_latent": blob_ratio(posterior.mean),
            "blob_decoder": probe.max_ratio(),
            "recon": clamped,
        }
        if self.use_val_lpips:
            scores["lpips"] = self.lpips(clamped.float(), video.float()).mean(dim=1)
        sampled = posterior.sample(generator) if self.hparams.sample_posterior else posterior.mode()
        losses = self.reconstruction_losses(self.autoencoder.decode(sampled), video, posterior)
        scores.update({f"loss/{k}": v for k, v in losses.items()})
        return scores

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.val_seed + batch_idx)
        scores = self.evaluate_batch(batch, generator)
        recon = scores.pop("recon")
        size = batch[B.VIDEO].shape[0]
        for name, values in scores.items():
            if name.startswith("loss/"):
                self.log(f"{stage}/{name[5:]}", values, batch_size=size, sync_dist=True)
            else:
                self.log(f"{stage}/{name}", values.mean(), batch_size=size, sync_dist=True, prog_bar=name == "psnr")
        for name in ("blob_latent", "blob_decoder"):
            self.log(f"{stage}/{name}_max", scores[name].max(), batch_size=size, sync_dist=True, reduce_fx="max")
        flagged = (torch.maximum(scores["blob_latent"], scores["blob_decoder"]) > self.hparams.blob_threshold)
        self._val_blob_flags += int(flagged.sum())
        if batch_idx == 0:
            self._val_panel = self.error_panel(recon, batch[B.VIDEO])

    def error_panel(self, recon: Tensor, video: Tensor) -> Tensor:
        """First frame of each clip: ground truth | reconstruction | per-patch error map, ``(3, B*H, 3*W)`` in [0, 1].

        The error map is scaled so that the worst patch of the batch is white; the batch's worst patch error
        (mean absolute error in [-1, 1] units) is logged as ``val/worst_patch_error``.
        """
        errors = patch_error_map(recon, video, self.hparams.error_patch)  # (B, h, w)
        h, w = video.shape[-2:]
        scaled = errors / errors.max().clamp_min(1e-8)
        heat = F.interpolate(scaled.unsqueeze(1), scale_factor=self.hparams.error_patch, mode="nearest")
        heat = heat_colours(heat[:, 0, :h, :w]).permute(0, 3, 1, 2)  # (B, 3, H, W)
        rows = torch.cat([(video[:, 0].float() + 1) / 2, (recon[:, 0].float() + 1) / 2, heat], dim=-1)  # (B, 3, H, 3W)
        self._worst_patch = errors.max()
        return torch.cat(list(rows), dim=-2).clamp(0, 1).cpu()  # (3, B*H, 3W)

    def on_validation_epoch_start(self) -> None:
        self._val_panel, self._val_blob_flags = None, 0

    def on_validation_epoch_end(self) -> None:
        if self._val_blob_flags:
            rank_zero_warn(
                f"AutoencoderModule: {self._val_blob_flags} validation clip(s) have a blob ratio above "
                f"{self.hparams.blob_threshold} (latent or decoder feature-norm spike): check for blob artifacts"
            )
        if self._val_panel is None or self.trainer.sanity_checking:
            return
        self.log("val/worst_patch_error", self._worst_patch, sync_dist=False, rank_zero_only=True)
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/error_map", self._val_panel, global_step=self.global_step)
        if self.trainer.log_dir:
            from PIL import Image

            folder = Path(self.trainer.log_dir) / "error_maps"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (self._val_panel.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            step = int(self.batches_trained)
            Image.fromarray(pixels).save(folder / f"epoch={self.current_epoch}-batch={step}.png")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Generated:
        return self.generate(batch)

    # ---------------------------------------------------------------- checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class (for ``load_module``) and make the checkpoint self-contained: the resolved config
        replaces ``net`` and ``pretrained`` is dropped (its weights are in the state dict), so loading
        needs no weights file; the original path stays in ``checkpoint["vdiff_pretrained"]``."""
        cls = type(self)
        checkpoint["vdiff_module"] = f"{cls.__module__}.{cls.__qualname__}"
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("lpips.")]:
            del state[key]
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and self.autoencoder is not None:
            checkpoint["vdiff_pretrained"] = hparams.get("pretrained")
            hparams["net"] = dataclasses.replace(self.autoencoder.config)
            hparams["pretrained"] = None

    def save_autoencoder(self, path: str | os.PathLike, layout: SaveLayout = "vdiff") -> Path:
        """Write the autoencoder alone (:func:`vdiff.weights.autoencoder.save_autoencoder`): a vdiff
        ``.safetensors`` file (config in the metadata), a diffusers folder or an sgm file; returns the file."""
        return save_autoencoder(self.autoencoder, path, layout=layout)


def load_autoencoder_from_checkpoint(
    path: str | os.PathLike, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> VideoAutoencoder:
    """The :class:`VideoAutoencoder` of an :class:`AutoencoderModule` checkpoint (EMA weights when present and
    ``use_ema``), without building the discriminator or LPIPS (so no backbone file is needed). The file is read
    without running code (:func:`~vdiff.lit.safe_loading.load_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no AutoencoderModule checkpoint at {path}")
    checkpoint = load_checkpoint(path, map_location=map_location)
    hparams = checkpoint.get("hyper_parameters", {})
    config = hparams.get("net", hparams.get("config"))  # "config": checkpoints written before the rename
    if not isinstance(config, AutoencoderConfig):
        if isinstance(config, dict):
            config = AutoencoderConfig.from_dict(config)
        else:
            raise ValueError(f"{path}: no autoencoder config in hyper_parameters; was it written by AutoencoderModule?")
    prefix = "autoencoder."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if use_ema:
        ema = checkpoint.get("ema_state_dict") or {}
        state.update({k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})
    model = VideoAutoencoder(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
