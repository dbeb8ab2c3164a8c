"""Score the saved checkpoint at the end of training: samples vs the copy-last-frame baseline.

After ``fit``, :class:`EvaluateCheckpoint` reloads the checkpoint Lightning just wrote (so what is
scored is what a user gets from disk, EMA weights included when present), runs the module's
evaluation protocol on the held-out validation clips, and prints the same report as ``vdiff test``
(:func:`vdiff.lit.evaluation.format_report`): PSNR/SSIM on generated frames, mean and best of k,
beside copying the last given frame, under the protocol and sampler that produced them.
"""

from __future__ import annotations

import importlib
import os
from functools import partial
from typing import Any

import lightning as L
import torch

from vdiff.callbacks.ema import load_ema_weights
from vdiff.callbacks.lora import LORA_KEY, adapters_reapplied
from vdiff.lit.evaluation import ScoreTotals
from vdiff.lit.progress import phase_progress
from vdiff.lit.safe_loading import load_checkpoint, refusing_code


def checkpoint_entries(path: str | os.PathLike) -> dict[str, Any]:
    """The entries of a training checkpoint (tensors mapped, not read) or of a ``vdiff export`` file (what it
    carries of its checkpoint: hyperparameters, ``vdiff_module``, ``vdiff_clip`` ...), read without running code."""
    from vdiff.callbacks.exported_module import export_entries, is_export

    return export_entries(path) if is_export(path) else load_checkpoint(path, mmap=True)


def checkpoint_module_class(checkpoint: Any, path: str | os.PathLike) -> type[L.LightningModule]:
    """The LightningModule class that wrote a training checkpoint (its ``vdiff_module`` entry), imported.

    Raises ValueError when the file is no vdiff training checkpoint (naming a safetensors weights file, as
    ``vdiff export`` writes, as such), and ImportError naming the class and the fix (its module on
    ``PYTHONPATH``) when the class cannot be imported."""
    from vdiff.callbacks.exported_module import is_export

    class_path = checkpoint.get("vdiff_module") if isinstance(checkpoint, dict) else None
    if not isinstance(class_path, str):
        if is_export(path):
            raise ValueError(
                f"{path} is a safetensors weights file (as `vdiff export` writes), not a training checkpoint: "
                "give the .ckpt file `vdiff fit` wrote (e.g. runs/NAME/version_0/checkpoints/last.ckpt)"
            )
        raise ValueError(f"{path}: no 'vdiff_module' entry; was it written by a vdiff LightningModule?")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(
            f"{path} was written by {class_path}, which cannot be imported ({err}); put the folder that holds "
            f"its module on PYTHONPATH (PYTHONPATH=/path/to/your/code vdiff ...)"
        ) from err


def load_module(path: str, map_location: str | torch.device = "cpu", use_ema: bool = True) -> L.LightningModule:
    """Load any vdiff LightningModule from a checkpoint written by ``vdiff fit``.

    Adapters a :class:`~vdiff.callbacks.LoRA` callback injected (recorded in ``checkpoint["vdiff_lora"]``)
    are injected again before the state dict is loaded; the EMA weights (``ema_state_dict``) replace
    the trained ones when ``use_ema`` and the checkpoint has them. Nothing in the file runs: it is read with
    ``weights_only=True`` (:mod:`vdiff.lit.safe_loading`), and one that holds other Python objects than
    vdiff's configs is refused with an :class:`~vdiff.lit.safe_loading.UnsafeCheckpointError` naming it.
    ``path`` may also be a ``vdiff export`` file, which carries its module's config
    (:func:`~vdiff.callbacks.exported_module.load_exported_module`; its weights are those exported, EMA or not)."""
    from vdiff.callbacks.exported_module import is_export, load_exported_module

    if is_export(path):
        return load_exported_module(path, map_location=map_location)
    # mmap: only the entries read here are loaded; load_from_checkpoint reads the weights once.
    checkpoint = load_checkpoint(path, mmap=True)
    cls = checkpoint_module_class(checkpoint, path)
    with adapters_reapplied(cls, checkpoint.get(LORA_KEY)), refusing_code(path):
        module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    if use_ema:
        load_ema_weights(module, checkpoint)
    return module.eval()


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
            weights = "EMA weights" if self.use_ema and _has_ema(path) else "trained weights"
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


def _has_ema(path: str) -> bool:
    return bool(load_checkpoint(path, mmap=True).get("ema_state_dict"))
