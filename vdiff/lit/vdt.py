"""VDTModule: the VDT masked video transformer (Lu et al. 2023) trained with unified mask modeling.

One network learns every task of the paper at once - prediction, backward prediction,
interpolation, unconditional generation, image-to-video, random frames and spatial-temporal
completion - because each training clip draws a conditioning mask from a weighted mixture
(:class:`vdiff.diffusion.masks.MaskMixture`). Given content (mask true) enters the network clean,
replaces the sample at every step, and is left out of the loss.

It works in pixel space (no autoencoder, as the quickstart does) or on the latents of any
autoencoder that keeps the contract of DESIGN.md §3. Validation runs one deterministic task
(by default prediction: 2 given frames -> the rest), samples with DDIM from a fixed seed, and logs
PSNR/SSIM on generated frames only beside the copy-last-frame baseline. Test runs the full
evaluation protocol (:class:`EvalProtocol`): ``k`` samples per clip from distinct deterministic
seeds, SSIM/PSNR as the mean over samples and best-of-k, and prints the protocol with the result.

Subclassing: override :meth:`VDTModule.compute_loss` (a different loss), :meth:`build_network` (a
different backbone) or :meth:`conditioning` (class labels, actions...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from vdiff.data import batch as B
from vdiff.diffusion.ddpm import GaussianDiffusion
from vdiff.diffusion.ddpm_samplers import ancestral_sample, ddim_sample
from vdiff.diffusion.masks import MASK_MODES, MaskMixture, MaskSpec, task_mask
from vdiff.lit.base import Generated, VideoDiffusionModule
from vdiff.metrics.frames import copy_last_given_frame, frame_psnr, frame_ssim, masked_frame_mean
from vdiff.models.vdt import VDT, VDT_models

DEFAULT_MASK_WEIGHTS: dict[str, float] = {mode: 1.0 for mode in MASK_MODES}
SAMPLE_SEED_STRIDE = 1_000_003  # seed of sample j of batch b: seed + b + j * stride (distinct while b < stride)
FVD_FRAMES = ("generated", "all")
CLIP_KEYS = (B.VIDEO, B.LATENTS, B.LATENTS_MEAN, B.LATENTS_STD, B.FRAME_INDICES, B.ACTIONS)  # (B, T, ...) entries


def given_frames_of(given_mask: Tensor) -> Tensor:
    """Frames that are given entirely: bool ``(B, T)`` from a mask ``(B, T, 1|C, H, W)``."""
    return given_mask.flatten(2).all(dim=2)


@dataclass(frozen=True)
class EvalProtocol:
    """How a test result was obtained; printed with every result so numbers can be compared.

    task:              the evaluation task, a mask mode (Cityscapes: ``prediction``).
    given_frames:      frames given to the model (prediction/backward; Cityscapes: 2).
    num_frames:        frames of every evaluation clip (the first ``num_frames`` of the data's clip);
                       None = the data's clip length (Cityscapes: 30, i.e. 2 -> 28).
    samples_per_video: k, samples drawn per clip; metrics are the mean over the k samples and the
                       best of the k (MCVD/VDT report SSIM best-of-k).
    sampler, steps, eta: the sampler.
    seed:              sample ``j`` of test batch ``b`` uses the seed ``seed + b + j * 1_000_003``.
    fvd_frames:        which frames would enter FVD: ``"generated"`` (only the predicted frames) or
                       ``"all"`` (given frames included). FVD itself is not computed by vdiff.
    """

    task: str
    given_frames: int
    num_frames: int | None
    samples_per_video: int
    sampler: str
    steps: int
    eta: float
    seed: int
    fvd_frames: Literal["generated", "all"] = "generated"

    def sample_seed(self, batch_idx: int, sample: int) -> int:
        """The seed of sample ``sample`` (0..k-1) of batch ``batch_idx``; sample 0 is validation's seed."""
        return self.seed + batch_idx + sample * SAMPLE_SEED_STRIDE

    def describe(self, clips: int | None = None) -> str:
        """One paragraph naming every choice behind a result (and the number of clips when known)."""
        frames = "the data's clip length" if self.num_frames is None else f"{self.num_frames}"
        if self.task in ("prediction", "backward"):
            generated = "the rest" if self.num_frames is None else f"{self.num_frames - self.given_frames}"
            task = f"{self.task} {self.given_frames} -> {generated} frames"
        else:
            task = self.task
        lines = [
            f"task: {task}; frames per test clip: {frames}"
            + (f"; test clips: {clips}" if clips is not None else ""),
            f"samples per video: k={self.samples_per_video} (seeds {self.seed} + batch + j*{SAMPLE_SEED_STRIDE}); "
            f"sampler: {self.sampler}, {self.steps} steps, eta={self.eta}",
            "metrics: PSNR/SSIM on generated frames only, per clip the mean over the k samples and the best "
            "of k; copy-last-given-frame baseline beside them",
            f"FVD frames: {'generated frames only' if self.fvd_frames == 'generated' else 'all frames (given included)'}"
            " - FVD NOT computed here: it needs I3D (Kinetics-400) weights, which vdiff never downloads",
        ]
        return "\n".join(lines)


class VDTModule(VideoDiffusionModule):
    """Trains and samples a VDT with DDPM (eps or v prediction, learned variance) and mask modeling.

    Args:
        model: size preset, one of ``VDT-S/2``, ``VDT-B/2`` (ours), ``VDT-L/2``.
        patch_size, depth, hidden_size, num_heads, mlp_ratio: override the preset's value when set.
        temporal_pos, spatial_pos: ``"sincos"`` (paper), ``"rope"`` or ``"sincos+rope"``.
        qk_norm: None (paper), ``"rms"`` or ``"layer"``.
        gradient_checkpointing: recompute blocks in backward to save memory.
        num_timesteps, beta_schedule, prediction, learn_sigma: the DDPM process (paper: 1000,
            linear, eps, learned variance with the hybrid MSE + VB loss).
        mask_weights: ``{name: weight}`` of the training mask mixture; names are mask modes or keys
            of ``mask_specs``.
        mask_specs: ``{name: MaskSpec}`` parameters per mode (given frames, step, spatial ratio...).
        val_task: the deterministic task validated, a mask mode.
        val_given_frames: frames given in the validation task (prediction/backward).
        val_sampler: ``ddim`` or ``ancestral``.
        val_steps: sampler steps at validation and by default in :meth:`generate`.
        val_eta: DDIM eta.
        val_seed: seed of the validation noise (same noise every epoch: curves compare).
        autoencoder, lr, weight_decay, betas, warmup_steps, optimizer, lr_decay: see
            :class:`~vdiff.lit.base.VideoDiffusionModule`.
        eval_num_frames: test clips are cut to their first this many frames (None = as the data
            gives them); a shorter clip is an error.
        eval_samples_per_video: k samples per test clip (distinct deterministic seeds); test logs
            ``test/{psnr,ssim}`` (mean over samples) and ``test/{psnr,ssim}_best_of_k``.
        fvd_frames: which frames enter FVD in the printed protocol, ``generated`` or ``all``.
        The test protocol (:meth:`eval_protocol`) also uses val_task, val_given_frames,
        val_sampler, val_steps, val_eta and val_seed.
    """

    def __init__(
        self,
        model: Literal["VDT-S/2", "VDT-B/2", "VDT-L/2"] = "VDT-S/2",
        patch_size: int | None = None,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        temporal_pos: Literal["sincos", "rope", "sincos+rope"] = "sincos",
        spatial_pos: Literal["sincos", "rope", "sincos+rope"] = "sincos",
        qk_norm: Literal["rms", "layer"] | None = None,
        gradient_checkpointing: bool = False,
        num_timesteps: int = 1000,
        beta_schedule: Literal["linear", "cosine", "scaled_linear"] = "linear",
        prediction: Literal["eps", "v", "x0"] = "eps",
        learn_sigma: bool = True,
        mask_weights: dict[str, float] | None = None,
        mask_specs: dict[str, MaskSpec] | None = None,
        val_task: str = "prediction",
        val_given_frames: int = 2,
        val_sampler: Literal["ddim", "ancestral"] = "ddim",
        val_steps: int = 50,
        val_eta: float = 0.0,
        val_seed: int = 0,
        autoencoder: nn.Module | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_decay: Literal["constant", "cosine"] = "constant",
        eval_num_frames: int | None = None,
        eval_samples_per_video: int = 1,
        fvd_frames: Literal["generated", "all"] = "generated",
    ) -> None:
        super().__init__(autoencoder, lr, weight_decay, betas, warmup_steps, optimizer, lr_decay)
        self.save_hyperparameters(ignore=["autoencoder", "optimizer"])
        if model not in VDT_models:
            raise ValueError(f"VDTModule: unknown model {model!r}; choose from {sorted(VDT_models)}")
        if val_task not in MASK_MODES:
            raise ValueError(f"VDTModule: val_task must be one of {MASK_MODES}, got {val_task!r}")
        if eval_samples_per_video < 1:
            raise ValueError(f"VDTModule: eval_samples_per_video must be >= 1, got {eval_samples_per_video}")
        if fvd_frames not in FVD_FRAMES:
            raise ValueError(f"VDTModule: fvd_frames must be one of {FVD_FRAMES}, got {fvd_frames!r}")
        if eval_num_frames is not None and eval_num_frames < 2:
            raise ValueError(f"VDTModule: eval_num_frames must be >= 2 or null, got {eval_num_frames}")
        if eval_num_frames is not None and val_task in ("prediction", "backward") and eval_num_frames <= val_given_frames:
            raise ValueError(
                f"VDTModule: eval_num_frames={eval_num_frames} leaves nothing to generate with "
                f"val_given_frames={val_given_frames}"
            )
        self.diffusion = GaussianDiffusion(
            num_timesteps=num_timesteps, beta_schedule=beta_schedule, prediction=prediction, learn_sigma=learn_sigma
        )
        self.masks = MaskMixture(mask_weights or DEFAULT_MASK_WEIGHTS, mask_specs)
        self.net: VDT | None = None
        self._test_totals: dict[str, float] = {}
        self._test_clips = 0
        self.test_results: dict[str, float] = {}

    # ---------------------------------------------------------------- network

    def build_network(self) -> nn.Module:
        """The denoiser ``net(x, noise_level, cond, given_mask)``; override to swap the backbone."""
        hp = self.hparams
        overrides = {
            k: hp[k] for k in ("patch_size", "depth", "hidden_size", "num_heads") if hp[k] is not None
        }
        preset = VDT_models[hp.model]
        in_channels = int(getattr(self.autoencoder, "latent_channels", 3))
        kwargs: dict[str, Any] = dict(
            in_channels=in_channels,
            mlp_ratio=hp.mlp_ratio,
            learn_sigma=hp.learn_sigma,
            temporal_pos=hp.temporal_pos,
            spatial_pos=hp.spatial_pos,
            qk_norm=hp.qk_norm,
            gradient_checkpointing=hp.gradient_checkpointing,
        )
        if overrides:
            # Read the preset's sizes off a meta-device instance (no memory), then apply overrides.
            with torch.device("meta"):
                base = preset(**kwargs)
            config = dict(
                patch_size=base.patch_size, depth=len(base.blocks), hidden_size=base.hidden_size, num_heads=base.num_heads
            )
            return VDT(**{**config, **overrides}, **kwargs)
        return preset(**kwargs)

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self.build_network()

    def autoencoder_replaced(self) -> None:
        """The network's input channels follow the autoencoder: rebuild it after a checkpoint load
        restored a latent autoencoder (its weights then come from the state dict)."""
        if self.net is not None:
            self.net = self.build_network().to(self.device)

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Conditioning tensors for the network (none for plain VDT); override to add some."""
        return {}

    # ---------------------------------------------------------------- training

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Diffusion loss of a batch with a mask drawn per clip; returns at least ``"loss"``."""
        x0 = self.batch_latents(batch)  # (B, T, c, h, w)
        b, t, _, h, w = x0.shape
        given_mask, _ = self.masks.sample(b, t, h, w, device=x0.device)  # (B, T, 1, h, w)
        return self.diffusion.training_losses(self.net, x0, self.conditioning(batch), given_mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_loss(batch)
        batch_size = len(batch[B.KEY]) if B.KEY in batch else None
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, batch_size=batch_size)
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return losses["loss"]

    # ---------------------------------------------------------------- sampling

    def task_given_mask(
        self, task: str, num_frames: int, height: int, width: int, batch: int, given_frames: int | None = None
    ) -> Tensor:
        """Deterministic mask ``(B, T, 1, h, w)`` (true = given) for an evaluation task."""
        params: dict[str, Any] = {}
        if task in ("prediction", "backward"):
            params["given_frames"] = int(given_frames if given_frames is not None else self.hparams.val_given_frames)
        return task_mask(task, num_frames, height, width, batch=batch, device=self.device, **params)

    @torch.no_grad()
    def sample_latents(
        self,
        given: Tensor,
        given_mask: Tensor,
        cond: dict[str, Tensor] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Sample scaled latents ``(B, T, c, h, w)`` where ``given_mask`` is false; given is pasted in."""
        sampler = sampler or self.hparams.val_sampler
        steps = int(steps or self.hparams.val_steps)
        noise = torch.randn(given.shape, generator=generator, device=given.device, dtype=given.dtype)
        kwargs = dict(given=given, given_mask=given_mask, steps=steps, generator=generator, progress=progress)
        if sampler == "ddim":
            return ddim_sample(self.diffusion, self.net, noise, cond or {}, eta=self.hparams.val_eta if eta is None else eta, **kwargs)
        if sampler == "ancestral":
            return ancestral_sample(self.diffusion, self.net, noise, cond or {}, **kwargs)
        raise ValueError(f"VDTModule: unknown sampler {sampler!r}; use 'ddim' or 'ancestral'")

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
        task = task or self.hparams.val_task
        x0 = self.batch_latents(batch, sample=False)  # (B, T, c, h, w)
        b, t, _, h, w = x0.shape
        given_mask = self.task_given_mask(task, t, h, w, b, given_frames)
        return self._sample_video(batch, x0, given_mask, sampler, steps, eta, generator, progress)

    def _sample_video(
        self,
        batch: dict[str, Any],
        x0: Tensor,
        given_mask: Tensor,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Generated:
        """One sample of the clips whose clean latents are ``x0 (B, T, c, h, w)``, decoded to video."""
        b, t = x0.shape[:2]
        latents = self.sample_latents(
            x0, given_mask, self.conditioning(batch), sampler, steps, eta, generator, progress
        )
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
        conditions a ``window``-frame clip on the last ``given_frames`` frames and appends the
        ``window - given_frames`` new ones, until the video has ``num_frames`` frames (context
        included). Returns ``(B, num_frames, 3, H, W)``.
        """
        if not 1 <= given_frames < window:
            raise ValueError(f"rollout: need 1 <= given_frames < window, got {given_frames} and {window}")
        if context.shape[1] < given_frames:
            raise ValueError(f"rollout: context has {context.shape[1]} frames, given_frames={given_frames}")
        video = context
        while video.shape[1] < num_frames:
            past = self.encode_video(video[:, -given_frames:], sample=False)  # (B, k, c, h, w)
            b, _, c, h, w = past.shape
            given = torch.cat([past, past.new_zeros(b, window - given_frames, c, h, w)], dim=1)  # (B, W, c, h, w)
            mask = self.task_given_mask("prediction", window, h, w, b, given_frames)
            latents = self.sample_latents(given, mask, {}, sampler, steps, None, generator, progress)
            new = self.decode_latents(latents[:, given_frames:])  # (B, W-k, 3, H, W)
            video = torch.cat([video, new], dim=1)
        return video[:, :num_frames]

    # ---------------------------------------------------------------- evaluation

    def evaluate_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """PSNR/SSIM of the validation task's samples on generated frames, and the copy-last baseline.

        Returns per-clip ``(B,)`` tensors: psnr, ssim, psnr_copy_last, ssim_copy_last.
        """
        generated = self.generate(batch, generator=generator)
        target = generated.target
        if target is None:
            raise KeyError("VDTModule validation needs 'video' in the batch to score samples against")
        frames = ~generated.given_frames  # (B, T) generated frames only
        baseline = copy_last_given_frame(target, generated.given_frames)
        return {
            "psnr": masked_frame_mean(frame_psnr(generated.video, target), frames),
            "ssim": masked_frame_mean(frame_ssim(generated.video, target), frames),
            "psnr_copy_last": masked_frame_mean(frame_psnr(baseline, target), frames),
            "ssim_copy_last": masked_frame_mean(frame_ssim(baseline, target), frames),
        }

    def eval_protocol(self) -> EvalProtocol:
        """The test protocol from this module's hyperparameters."""
        hp = self.hparams
        return EvalProtocol(
            task=hp.val_task,
            given_frames=int(hp.val_given_frames),
            num_frames=hp.get("eval_num_frames"),
            samples_per_video=int(hp.get("eval_samples_per_video", 1)),
            sampler=hp.val_sampler,
            steps=int(hp.val_steps),
            eta=float(hp.val_eta),
            seed=int(hp.val_seed),
            fvd_frames=hp.get("fvd_frames", "generated"),
        )

    def protocol_clips(self, batch: dict[str, Any], num_frames: int | None = None) -> dict[str, Any]:
        """The batch cut to its first ``num_frames`` frames (default: the protocol's; None = unchanged)."""
        num_frames = self.eval_protocol().num_frames if num_frames is None else num_frames
        if num_frames is None:
            return batch
        source = B.VIDEO if B.VIDEO in batch else B.LATENTS
        have = int(batch[source].shape[1])
        if have < num_frames:
            raise ValueError(
                f"VDTModule: eval_num_frames={num_frames} but the test clips have {have} frames; "
                "give the data module longer evaluation clips or lower eval_num_frames"
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
    def evaluate_samples(self, batch: dict[str, Any], seeds: Sequence[int]) -> dict[str, Tensor]:
        """Score one sample per seed of every clip on the validation task's generated frames.

        Returns ``psnr``/``ssim`` of shape ``(B, k)`` (k = len(seeds), column j from ``seeds[j]``)
        and the copy-last-given-frame baseline ``psnr_copy_last``/``ssim_copy_last`` of shape ``(B,)``.
        The clips are encoded once; each sample draws its noise from its own generator.
        """
        if not seeds:
            raise ValueError("evaluate_samples: need at least one seed")
        target = batch.get(B.VIDEO)
        if target is None:
            raise KeyError("VDTModule evaluation needs 'video' in the batch to score samples against")
        x0 = self.batch_latents(batch, sample=False)  # (B, T, c, h, w)
        b, t, _, h, w = x0.shape
        given_mask = self.task_given_mask(self.hparams.val_task, t, h, w, b)
        given = given_frames_of(given_mask)  # (B, T)
        frames = ~given  # generated frames only
        psnr, ssim = [], []
        for seed in seeds:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
            video = self._sample_video(batch, x0, given_mask, generator=generator).video
            psnr.append(masked_frame_mean(frame_psnr(video, target), frames))
            ssim.append(masked_frame_mean(frame_ssim(video, target), frames))
        baseline = copy_last_given_frame(target, given)
        return {
            "psnr": torch.stack(psnr, dim=1),  # (B, k)
            "ssim": torch.stack(ssim, dim=1),  # (B, k)
            "psnr_copy_last": masked_frame_mean(frame_psnr(baseline, target), frames),
            "ssim_copy_last": masked_frame_mean(frame_ssim(baseline, target), frames),
        }

    def evaluate_protocol_batch(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """The test protocol on one batch: per-clip ``(B,)`` tensors ``psnr``, ``ssim`` (mean over the
        k samples), ``psnr_best_of_k``, ``ssim_best_of_k`` and the copy-last baselines."""
        protocol = self.eval_protocol()
        seeds = [protocol.sample_seed(batch_idx, j) for j in range(protocol.samples_per_video)]
        scores = self.evaluate_samples(self.protocol_clips(batch), seeds)
        psnr, ssim = scores.pop("psnr"), scores.pop("ssim")
        return {
            "psnr": psnr.mean(dim=1),
            "psnr_best_of_k": psnr.max(dim=1).values,
            "ssim": ssim.mean(dim=1),
            "ssim_best_of_k": ssim.max(dim=1).values,
            **scores,
        }

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.val_seed + batch_idx)
        scores = self.evaluate_batch(batch, generator)
        batch_size = len(batch[B.KEY]) if B.KEY in batch else None
        for name, values in scores.items():
            self.log(f"{stage}/{name}", values.mean(), batch_size=batch_size, sync_dist=True, prog_bar=name == "psnr")
        with torch.no_grad():
            loss = self.compute_loss(batch)["loss"]
        self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self._test_totals, self._test_clips, self.test_results = {}, 0, {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self.evaluate_protocol_batch(batch, batch_idx)
        batch_size = int(next(iter(scores.values())).numel())
        for name, values in scores.items():
            self.log(f"test/{name}", values.mean(), batch_size=batch_size, sync_dist=True)
            self._test_totals[name] = self._test_totals.get(name, 0.0) + float(values.double().sum())
        self._test_clips += batch_size
        with torch.no_grad():
            loss = self.compute_loss(self.protocol_clips(batch))["loss"]
        self.log("test/loss", loss, batch_size=batch_size, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        """Average the per-clip scores over all ranks and print them with the protocol (rank 0)."""
        names = sorted(self._test_totals)
        totals = torch.tensor([self._test_clips] + [self._test_totals[k] for k in names], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        clips = int(totals[0])
        self.test_results = {k: float(v) / max(clips, 1) for k, v in zip(names, totals[1:].tolist())}
        self.test_results["clips"] = clips
        if self.trainer.is_global_zero:
            print(self.test_report(self.test_results, checkpoint=getattr(self.trainer, "ckpt_path", None)))

    def test_report(self, results: dict[str, float], checkpoint: str | None = None) -> str:
        """The test table (``results`` as in :attr:`test_results`) under the protocol that produced it."""
        protocol = self.eval_protocol()
        clips = int(results.get("clips", 0))
        lines = ["", f"VDT test results ({clips} clips)"]
        if checkpoint:
            lines.append(f"checkpoint: {checkpoint}")
        lines += ["protocol:", protocol.describe(clips=clips)]
        if clips == 0:
            lines.append("no test clips were scored (empty test loader)")
            return "\n".join(lines + [""])
        k = protocol.samples_per_video
        lines += [
            f"{'':<28}{'PSNR (dB)':>12}{'SSIM':>10}",
            f"{f'samples, mean of k={k}':<28}{results['psnr']:>12.2f}{results['ssim']:>10.4f}",
            f"{f'samples, best of k={k}':<28}{results['psnr_best_of_k']:>12.2f}{results['ssim_best_of_k']:>10.4f}",
            f"{'copy last given frame':<28}{results['psnr_copy_last']:>12.2f}{results['ssim_copy_last']:>10.4f}",
            "",
        ]
        return "\n".join(lines)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Generated:
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.val_seed + batch_idx)
        return self.generate(batch, generator=generator)
