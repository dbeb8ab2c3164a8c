"""Score the saved checkpoint at the end of training: samples vs the copy-last-frame baseline.

After ``fit``, :class:`EvaluateCheckpoint` reloads the checkpoint Lightning just wrote (so what is
scored is what a user gets from disk, EMA weights included when present), samples the held-out
validation clips with the module's evaluation task, and prints PSNR/SSIM on generated frames
beside copying the last given frame. The protocol (task, given frames, sampler, steps, number of
clips) is printed with every result.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from vdiff.callbacks.ema import load_ema_weights


def load_module(path: str, map_location: str | torch.device = "cpu", use_ema: bool = True) -> L.LightningModule:
    """Load any vdiff LightningModule from a checkpoint written by ``vdiff fit``."""
    import importlib

    # mmap: only the entries read here are loaded; load_from_checkpoint reads the weights once.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    class_path = checkpoint.get("vdiff_module")
    if class_path is None:
        raise KeyError(f"{path}: no 'vdiff_module' entry; was it written by a vdiff LightningModule?")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls.load_from_checkpoint(path, map_location=map_location)
    if use_ema:
        load_ema_weights(module, checkpoint)
    return module.eval()


class EvaluateCheckpoint(L.Callback):
    """At the end of ``fit``, print checkpoint sample quality beside copy-last-frame.

    Args:
        max_batches: validation batches to score (None = all held-out clips).
        use_ema: score the EMA weights when the checkpoint has them.
        min_gain_db: if set, fail (raise) when the model beats copy-last by less than this.
        generate_options: passed to the module's ``evaluate_batch``/``generate`` (e.g. steps).
    """

    def __init__(
        self,
        max_batches: int | None = None,
        use_ema: bool = True,
        min_gain_db: float | None = None,
    ) -> None:
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
        loader = datamodule.val_dataloader()
        sums: dict[str, float] = {}
        count = 0
        for index, batch in enumerate(loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            batch = datamodule.transfer_batch_to_device(batch, pl_module.device, 0)
            batch = datamodule.on_after_batch_transfer(batch, 0)
            generator = torch.Generator(device=pl_module.device).manual_seed(module.hparams.get("val_seed", 0) + index)
            scores = module.evaluate_batch(batch, generator)
            for name, values in scores.items():
                sums[name] = sums.get(name, 0.0) + float(values.double().sum())
            count += int(next(iter(scores.values())).numel())
        totals = torch.tensor([count] + [sums[k] for k in sorted(sums)], dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        count = int(totals[0])
        if count == 0:
            raise RuntimeError("EvaluateCheckpoint: the validation loader gave no clips")
        self.results = {k: float(v) / count for k, v in zip(sorted(sums), totals[1:].tolist())}
        self.results["clips"] = count
        if trainer.is_global_zero:
            print(self.report(module, path))
        gain = self.results["psnr"] - self.results["psnr_copy_last"]
        if self.min_gain_db is not None and gain < self.min_gain_db:
            raise RuntimeError(f"checkpoint beats copy-last-frame by {gain:.2f} dB, less than {self.min_gain_db} dB")

    def report(self, module: L.LightningModule, path: str) -> str:
        hp: dict[str, Any] = dict(module.hparams)
        r = self.results
        protocol = (
            f"task={hp.get('val_task')} given_frames={hp.get('val_given_frames')} "
            f"sampler={hp.get('val_sampler')} steps={hp.get('val_steps')} eta={hp.get('val_eta')} "
            f"held-out clips={r['clips']} ema={'yes' if self.use_ema else 'no'}"
        )
        lines = [
            "",
            f"Checkpoint evaluation: {path}",
            f"protocol: {protocol} (metrics on generated frames only)",
            f"{'':<24}{'PSNR (dB)':>12}{'SSIM':>10}",
            f"{'samples (model)':<24}{r['psnr']:>12.2f}{r['ssim']:>10.4f}",
            f"{'copy last given frame':<24}{r['psnr_copy_last']:>12.2f}{r['ssim_copy_last']:>10.4f}",
            f"{'gain':<24}{r['psnr'] - r['psnr_copy_last']:>+12.2f}{r['ssim'] - r['ssim_copy_last']:>+10.4f}",
            "",
        ]
        return "\n".join(lines)
