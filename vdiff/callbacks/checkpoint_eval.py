"""Score the saved checkpoint at the end of training: samples vs the copy-last-frame baseline.

After ``fit``, :class:`EvaluateCheckpoint` reloads the checkpoint Lightning just wrote (so what is
scored is what a user gets from disk, EMA weights included when present), runs the module's
evaluation protocol on the held-out validation clips, and prints the same report as ``vdiff test``
(:func:`vdiff.lit.evaluation.format_report`): PSNR/SSIM on generated frames, mean and best of k,
beside copying the last given frame, under the protocol and sampler that produced them.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch

from vdiff.lit.checkpointing import has_ema_weights
from vdiff.lit.evaluation import ScoreTotals
from vdiff.lit.module_loading import (  # noqa: F401 - checkpoint_entries, checkpoint_module_class: older code's names
    checkpoint_entries,
    checkpoint_module_class,
    load_module,
)
from vdiff.lit.progress import phase_progress


class EvaluateCheckpoint(L.Callback):
    """At the end of ``fit``, print checkpoint sample quality beside copy-last-frame.

    Args:
        max_batches: validation batches to score (None = all held-out clips).
        use_ema: score the EMA weights when the checkpoint has them.
        min_gain_db: if set, fail (raise) when the model beats copy-last by less than this.
    """

    def __init__(self, max_batches: int | None = None, use_ema: bool = True, min_gain_db: float | None = None) -> None:
        super().__init__()
        self.max_batches = max_batches
        self.use_ema = use_ema
        self.min_gain_db = min_gain_db
        self.results: dict[str, float] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if not path:
            raise RuntimeError("EvaluateCheckpoint needs a ModelCheckpoint that saved a checkpoint (save_last: true)")
        module = load_module(path, map_location=pl_module.device, use_ema=self.use_ema)
        datamodule = trainer.datamodule
        totals = ScoreTotals()
        loader = datamodule.val_dataloader()
        with torch.no_grad(), phase_progress(trainer, loader, "Scoring the checkpoint on held-out clips") as batches:
            if self.max_batches is not None and batches.total is not None:
                batches.total = min(batches.total, self.max_batches)
            for index, batch in enumerate(batches):
                if self.max_batches is not None and index >= self.max_batches:
                    break
                batch = datamodule.transfer_batch_to_device(batch, pl_module.device, 0)
                batch = datamodule.on_after_batch_transfer(batch, 0)
                totals.add(module.evaluate_protocol_batch(batch, index))
        reduce = partial(trainer.strategy.reduce, reduce_op="sum") if trainer.world_size > 1 else None
        self.results = totals.means(reduce, pl_module.device)
        if self.results["clips"] == 0:
            raise RuntimeError("EvaluateCheckpoint: the validation loader gave no clips")
        if trainer.is_global_zero:
            weights = "EMA weights" if self.use_ema and has_ema_weights(path) else "trained weights"
            print(
                module.report(
                    self.results,
                    checkpoint=path,
                    title="Checkpoint evaluation on held-out clips",
                    notes=f"weights: {weights}",
                )
            )
        gain = self.results["psnr"] - self.results["psnr_copy_last"]
        if self.min_gain_db is not None and gain < self.min_gain_db:
            raise RuntimeError(f"checkpoint beats copy-last-frame by {gain:.2f} dB, less than {self.min_gain_db} dB")

