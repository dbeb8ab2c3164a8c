"""Video-quality metrics in the validation loop: PSNR/SSIM/LPIPS on generated frames, FVD and FID.

:class:`VideoQuality` talks to the module through the callback protocol only: ``generate(batch,
generator=...) -> Generated``, ``protocol_clips(batch)``, ``evaluation`` (:class:`EvalProtocol`) and
``sampler``. On every validation batch it draws the protocol's sample 0 (seed
``evaluation.sample_seed(batch_idx, 0)``, the same sample the module's own validation scores) with
whatever weights are in the module then: an :class:`~vdiff.callbacks.ema.EMA` callback swaps the
averaged weights in at ``on_validation_start``, so they are the EMA weights when one is used.

* PSNR, SSIM (:mod:`vdiff.metrics.frames`) and LPIPS (:mod:`vdiff.metrics.lpips`, backbone from a local
  file) per frame, on generated frames only, averaged per clip and then over clips; merged exactly over
  ranks with clip counts (:class:`~vdiff.lit.evaluation.ScoreTotals`).
* FVD (:mod:`vdiff.metrics.fvd`) when ``fvd_weights`` names an I3D file, and FID (:mod:`vdiff.metrics.fid`)
  when ``fid_weights`` names an Inception file, on the frames ``EvalProtocol.fvd_frames`` selects
  (``generated``, or ``all`` with the given ones). Real clips are the batches' ground truth; their
  statistics are computed on the first validation run and then reused: kept in memory, and on disk
  (``stats_cache``) keyed by the protocol and the validation data (shard paths, sizes, times, clip spec).

Results are logged (``<prefix>psnr``, ``ssim``, ``lpips``, ``fvd``, ``fid``), printed with the protocols
that produced them, and the protocols are stored in checkpoints under ``vdiff_video_quality``.
Weights are read by :mod:`vdiff.weights.i3d`; a missing file fails at ``setup``, before training.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch

from vdiff.lit.evaluation import ScoreTotals
from vdiff.lit.quality_metrics import (
    build_fid,
    build_fvd,
    build_lpips,
    format_quality_report,
    per_frame_scores,
    select_frames,
)
from vdiff.metrics.fid import FIDProtocol
from vdiff.metrics.frechet import FrechetMetric, FrechetStats, StatsCache, stats_key
from vdiff.metrics.fvd import FVDProtocol

QUALITY_KEY = "vdiff_video_quality"  # checkpoint entry: protocols and the last results


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


# ------------------------------------------------------------------------------------------------ callback


class VideoQuality(L.Callback):
    """PSNR/SSIM/LPIPS on generated frames, FVD and FID, during validation (see the module docstring).

    Args:
        fvd_weights: local I3D file for FVD (StyleGAN-V's ``i3d_torchscript.pt``, or vdiff I3D weights);
            relative paths are also looked up under ``$VDIFF_WEIGHTS``. None = no FVD.
        fid_weights: local Inception file for FID (clean-fid's ``inception-2015-12-05.pt``, or
            torch-fidelity's file with ``fid.backend: torchmetrics``). None = no FID.
        lpips: LPIPS backbone (``alex``, ``vgg``, ``squeeze``; its file under ``$TORCH_HOME``), None = no LPIPS.
        fvd: the FVD protocol: an :class:`FVDProtocol`, a preset name (``stylegan-v``, ``tats``) or None
            (``stylegan-v``). ``frames`` and ``seed`` are taken from the module's ``EvalProtocol``.
        fid: the FID protocol (``frames`` and ``seed`` from the module as well).
        stats_cache: folder for real-data statistics; None = ``$VDIFF_CACHE/frechet_stats``; False = none.
        real_data_id: identifies the validation data in the cache key; None = derived from the data
            module's ``val`` shards (without shards and without an id, statistics are kept in memory only).
        every_n_epochs: run on every n-th validation (sanity checks never run).
        max_batches: validation batches scored per rank (None = all the loader gives).
        prefix: logged names are ``<prefix><metric>``.
        print_report: print the table with its protocols on rank 0 after each run.
        generate_options: extra ``generate`` keyword arguments (e.g. ``{"steps": 50}``).
    """

    def __init__(
        self,
        fvd_weights: str | None = None,
        fid_weights: str | None = None,
        lpips: str | None = "alex",
        fvd: FVDProtocol | str | None = None,
        fid: FIDProtocol | None = None,
        stats_cache: str | bool | None = None,
        real_data_id: str | None = None,
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        prefix: str = "val/quality/",
        print_report: bool = True,
        generate_options: dict[str, Any] | None = None,
        fvd_chunk: int = 4,
        fid_chunk: int = 32,
    ) -> None:
        super().__init__()
        self.fvd_weights = fvd_weights
        self.fid_weights = fid_weights
        self.lpips_net = lpips
        self.fvd_protocol = FVDProtocol.preset(fvd) if isinstance(fvd, str) else (fvd or FVDProtocol())
        self.fid_protocol = fid or FIDProtocol()
        self.cache = None if stats_cache is False else StatsCache(None if stats_cache in (None, True) else stats_cache)
        self.real_data_id = real_data_id
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.max_batches = max_batches
        self.prefix = prefix
        self.print_report = print_report
        self.generate_options = dict(generate_options or {})
        self.fvd_chunk, self.fid_chunk = fvd_chunk, fid_chunk
        self.metrics: dict[str, FrechetMetric] = {}
        self.lpips = None
        self.results: dict[str, Any] = {}
        self.real_source: dict[str, str] = {}  # per metric: "computed", "memory" or the cache file read
        self._real_memory: dict[str, FrechetStats] = {}
        self._need_real: dict[str, bool] = {}
        self._totals = ScoreTotals()
        self._runs = 0
        self._active = False
        self._built = False

    # -------------------------------------------------------------- setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._built:
            return
        evaluation = getattr(pl_module, "evaluation", None)
        frames = getattr(evaluation, "fvd_frames", "generated")
        seed = int(getattr(evaluation, "seed", 0))
        if self.fvd_weights is not None:
            self.metrics["fvd"] = build_fvd(
                self.fvd_weights, self.fvd_protocol.replace(frames=frames, seed=seed), self.fvd_chunk
            )
            self.fvd_protocol = self.metrics["fvd"].protocol
        if self.fid_weights is not None:
            self.metrics["fid"] = build_fid(
                self.fid_weights, self.fid_protocol.replace(frames=frames, seed=seed), self.fid_chunk
            )
            self.fid_protocol = self.metrics["fid"].protocol
        self.lpips = build_lpips(self.lpips_net)
        self._built = True

    def protocols(self) -> dict[str, Any]:
        return {
            "fvd": self.fvd_protocol.to_dict() if "fvd" in self.metrics else None,
            "fid": self.fid_protocol.to_dict() if "fid" in self.metrics else None,
            "lpips": self.lpips_net if self.lpips is not None else None,
        }

    # -------------------------------------------------------------- real statistics

    def data_id(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """What the real statistics were computed from; None when it cannot be told (no disk cache then)."""
        evaluation = getattr(pl_module, "evaluation", None)
        scope = {
            "evaluation": asdict(evaluation) if evaluation is not None else None,
            "max_batches": self.max_batches,
            "limit_val_batches": trainer.limit_val_batches,
            "world_size": trainer.world_size,
        }
        if self.real_data_id is not None:
            return json.dumps({"id": self.real_data_id, **scope}, sort_keys=True, default=str)
        datamodule = getattr(trainer, "datamodule", None)
        sources = getattr(datamodule, "sources", {}).get("val") if datamodule is not None else None
        if not sources:
            return None
        from vdiff.data.shards import expand_shard_spec

        files = []
        for path in expand_shard_spec([s.path for s in sources]):
            stat = os.stat(path)
            files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
        clip = getattr(datamodule, "eval_spec", None)
        scope.update(shards=files, clip=asdict(clip) if clip is not None else None,
                     clips_per_video=getattr(datamodule, "val_clips_per_video", None))  # fmt: skip
        return json.dumps(scope, sort_keys=True, default=str)

    def _plan_real_stats(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data_id = self.data_id(trainer, pl_module) if self.cache is not None else None
        if trainer.world_size > 1:  # rank 0 decides, so every rank takes part in the same broadcasts
            data_id = trainer.strategy.broadcast(data_id, src=0)
        for name, metric in self.metrics.items():
            if name in self._real_memory:
                metric.real_stats, self._need_real[name] = self._real_memory[name], False
                self.real_source[name] = "memory"
                continue
            loaded = None
            if data_id is not None:
                key = stats_key(metric.protocol.real_stats_fields(), data_id)
                loaded = self.cache.load(name, key) if trainer.is_global_zero else None
                if trainer.world_size > 1:
                    loaded = trainer.strategy.broadcast(loaded, src=0)
                if loaded is not None:
                    self.real_source[name] = f"read from {self.cache.path(name, key)}"
            metric.real_stats = loaded
            self._need_real[name] = loaded is None
            if loaded is not None:
                self._real_memory[name] = loaded

    def _keep_real_stats(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data_id = None
        for name, metric in self.metrics.items():
            if not self._need_real.get(name):
                continue
            stats = metric.synced_stats(real=True)  # collective: every rank
            self._real_memory[name] = stats
            metric.real_stats = stats
            self.real_source[name] = "computed"
            if self.cache is not None and stats.count >= 2:
                data_id = data_id or self.data_id(trainer, pl_module)
                if data_id is not None and trainer.is_global_zero:
                    key = stats_key(metric.protocol.real_stats_fields(), data_id)
                    path = self.cache.save(name, key, stats, {"protocol": metric.protocol.to_dict(), "data": data_id})
                    self.real_source[name] = f"computed, saved to {path}"

    # -------------------------------------------------------------- validation

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking:
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_epochs:
            return
        if not hasattr(pl_module, "generate"):
            raise TypeError(f"VideoQuality needs {type(pl_module).__name__}.generate(batch) -> Generated")
        self._active = True
        device = pl_module.device
        names = ["psnr", "ssim"] + (["lpips"] if self.lpips is not None else [])
        self._totals = ScoreTotals()
        self._totals.sums = dict.fromkeys(names, 0.0)  # every rank reduces the same names, even with no clips
        if self.lpips is not None:
            self.lpips.to(device)
        for metric in self.metrics.values():
            metric.to(device)
            metric.reset()
        self._plan_real_stats(trainer, pl_module)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active or dataloader_idx != 0:
            return
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        clips = pl_module.protocol_clips(batch) if hasattr(pl_module, "protocol_clips") else batch
        evaluation = getattr(pl_module, "evaluation", None)
        seed = evaluation.sample_seed(batch_idx, 0) if evaluation is not None else batch_idx
        generator = torch.Generator(device=pl_module.device).manual_seed(int(seed))
        generated = pl_module.generate(clips, generator=generator, **self.generate_options)
        target = generated.target
        if target is None:  # latent shards: the decoded posterior mean is the reference
            target = pl_module.decode_latents(pl_module.batch_latents(clips, sample=False))
        video, given = generated.video, generated.given_frames
        self._totals.add(per_frame_scores(video, target, given, self.lpips))
        for name, metric in self.metrics.items():
            which = metric.protocol.frames
            if self._need_real[name]:
                metric.update(select_frames(target, given, which), real=True)
            metric.update(select_frames(video, given, which), real=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        reduce = partial(trainer.strategy.reduce, reduce_op="sum") if trainer.world_size > 1 else None
        results: dict[str, Any] = self._totals.means(reduce, pl_module.device)
        self._keep_real_stats(trainer, pl_module)
        for name, metric in self.metrics.items():
            real = metric.real_stats
            generated = metric.synced_stats(real=False)  # collective
            results[f"{name}_real"], results[f"{name}_generated"] = real.count, generated.count
            if real.count >= 2 and generated.count >= 2:
                results[name] = real.distance(generated, metric.protocol.cov_divisor)
        self.results = results
        for name in ("psnr", "ssim", "lpips", "fvd", "fid"):
            if name in results and results["clips"] > 0 and _finite(results[name]):
                pl_module.log(f"{self.prefix}{name}", float(results[name]), sync_dist=True)
        if self.print_report and trainer.is_global_zero:
            print(self.report(trainer, pl_module))

    def report(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> str:
        evaluation = getattr(pl_module, "evaluation", None)
        sampler = getattr(pl_module, "sampler", None)
        lines = []
        if evaluation is not None:
            frames = "the data's clip length" if evaluation.num_frames is None else str(evaluation.num_frames)
            lines.append(f"task: {evaluation.task}, given frames: {evaluation.given_frames}; frames per clip: {frames}; "
                         f"sample 0 of each clip (seed {evaluation.seed} + batch index)")  # fmt: skip
        if sampler is not None:
            lines.append(
                f"sampler: {sampler.describe()}"
                + (f"; generate options {self.generate_options}" if self.generate_options else "")
            )
        for name, source in self.real_source.items():
            lines.append(f"{name.upper()} real statistics: {source}")
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}" if trainer is not None else ""
        return format_quality_report(f"Video quality on validation clips ({where})", self.results, lines,
                                     self.fvd_protocol if "fvd" in self.metrics else None,
                                     self.fid_protocol if "fid" in self.metrics else None,
                                     self.lpips_net if self.lpips is not None else None)  # fmt: skip

    # -------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        evaluation = getattr(pl_module, "evaluation", None)
        sampler = getattr(pl_module, "sampler", None)
        checkpoint[QUALITY_KEY] = {
            **self.protocols(),
            "evaluation": asdict(evaluation) if evaluation is not None else None,
            "sampler": sampler.describe() if sampler is not None else None,
            "generate_options": dict(self.generate_options),
            "results": {k: v for k, v in self.results.items()},
        }
