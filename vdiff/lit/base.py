"""The base LightningModule every vdiff diffusion model shares.

It owns what is not specific to a model family: the (frozen) autoencoder between pixels and
latents, the optimizer and warm-up, and the small protocol that callbacks use:

* ``generate(batch, **options) -> Generated`` (each subclass) - samples videos for a batch (used
  by ``SampleVideos``, validation and ``vdiff sample``);
* :meth:`VideoDiffusionModule.ema_parameters` - the parameters an EMA callback tracks;
* ``checkpoint["vdiff_module"]`` - the class path, so ``vdiff sample`` can reload any subclass,
  ``checkpoint["vdiff_clip"]`` - the clip length and frame size trained on, and
  ``checkpoint["vdiff_autoencoder_config"]`` - the latent autoencoder's architecture.

Subclasses build their network in ``configure_model()`` (DESIGN.md §6) and implement
``training_step``/``validation_step`` with the diffusion core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from vdiff.data import batch as B

AUTOENCODER_CONFIG_KEY = "vdiff_autoencoder_config"  # checkpoint entry: the VideoAutoencoder's architecture


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


class VideoDiffusionModule(L.LightningModule):
    """Autoencoder plumbing, optimizer, and the callback protocol shared by every diffusion module.

    Args:
        autoencoder: maps video ``(B, T, 3, H, W)`` to latents and back (DESIGN.md §3). None means
            pixel space (the identity autoencoder). It is frozen.
        lr: AdamW learning rate (ignored when ``optimizer`` is given).
        weight_decay: AdamW weight decay, applied to matrices only (not to norms, biases, embeddings).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_decay: ``"constant"`` after warm-up, or ``"cosine"``: cosine decay to 0 at the trainer's
            last step (``trainer.estimated_stepping_batches``, i.e. ``max_steps`` when set).
        optimizer: any optimizer class from the recipe (``class_path``/``init_args``); receives the
            parameter groups.
    """

    def __init__(
        self,
        autoencoder: nn.Module | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_decay: Literal["constant", "cosine"] = "constant",
    ) -> None:
        super().__init__()
        if autoencoder is None:
            from vdiff.models.autoencoder import IdentityAutoencoder

            autoencoder = IdentityAutoencoder()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        if lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {lr_decay!r}")
        self.lr_decay = lr_decay
        self.optimizer_factory = optimizer

    # ---------------------------------------------------------------- autoencoder

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.autoencoder, "scale_factor", 1.0))

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.autoencoder, "shift_factor", 0.0))

    @torch.no_grad()
    def encode_video(self, video: Tensor, sample: bool = True) -> Tensor:
        """Video ``(B, T, 3, H, W)`` in [-1, 1] -> scaled latents ``(B, T, c, h, w)``."""
        posterior = self.autoencoder.encode(video)
        latents = posterior.sample() if sample else posterior.mode()
        return (latents - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents ``(B, T, c, h, w)`` -> video ``(B, T, 3, H, W)`` in [-1, 1] (clamped)."""
        video = self.autoencoder.decode(latents / self.latent_scale + self.latent_shift)
        return video.clamp(-1.0, 1.0)

    def batch_latents(self, batch: dict[str, Any], sample: bool = True) -> Tensor:
        """Scaled latents of a batch from video shards (encoded here) or latent shards (stored)."""
        if B.LATENTS in batch:
            latents = batch[B.LATENTS] if sample else batch.get(B.LATENTS_MEAN, batch[B.LATENTS])
            return (latents - self.latent_shift) * self.latent_scale
        return self.encode_video(batch[B.VIDEO], sample=sample)

    # ---------------------------------------------------------------- callback protocol

    def ema_parameters(self) -> list[nn.Parameter]:
        """Parameters an EMA callback tracks: every trainable parameter outside the autoencoder."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("autoencoder.")]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint["vdiff_module"] = f"{cls.__module__}.{cls.__qualname__}"
        # The clip shape trained on, so `vdiff sample` can cut inputs the same way.
        spec = getattr(getattr(self._trainer, "datamodule", None), "spec", None) if self._trainer else None
        if spec is not None:
            checkpoint["vdiff_clip"] = {"num_frames": int(spec.num_frames), "size": [int(v) for v in spec.out_hw]}
        # The autoencoder is not a hyperparameter (recipes inject it), but its weights are in the state
        # dict: record its architecture so load_from_checkpoint can rebuild it without the weights file.
        from vdiff.models.autoencoder import VideoAutoencoder

        if isinstance(self.autoencoder, VideoAutoencoder):
            checkpoint[AUTOENCODER_CONFIG_KEY] = self.autoencoder.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a latent autoencoder recorded in the checkpoint when this module was constructed
        without one (``load_from_checkpoint``), then let subclasses resize what depends on it."""
        from vdiff.models.autoencoder import AutoencoderConfig, IdentityAutoencoder, VideoAutoencoder

        stored = checkpoint.get(AUTOENCODER_CONFIG_KEY)
        if stored is None or not isinstance(self.autoencoder, IdentityAutoencoder):
            return
        config = AutoencoderConfig.from_dict(stored)
        self.autoencoder = VideoAutoencoder(config).to(self.device).eval().requires_grad_(False)
        self.autoencoder_replaced()

    def autoencoder_replaced(self) -> None:
        """Called after :meth:`on_load_checkpoint` rebuilt the autoencoder; rebuild what it sizes."""

    # ---------------------------------------------------------------- optimisation

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on norms, biases and 1-D embeddings."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "embed" in name else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.parameter_groups()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches if self.lr_decay == "cosine" and self._trainer else None
        if total is not None and not math.isfinite(total):
            raise ValueError("lr_decay='cosine' needs a finite training length: set trainer.max_steps or max_epochs")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_factor, warmup=max(int(self.warmup_steps), 0), total=total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, warmup: int, total: float | None) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then constant (``total``
    None) or cosine decay reaching 0 at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))

