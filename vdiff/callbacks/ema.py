"""Exponential moving average of a module's weights, swapped in for validation and sampling.

Lightning 2.6's ``EMAWeightAveraging`` deep-copies the whole LightningModule (autoencoder and
all) and does not support sharded models; this callback keeps fp32 shadows of only the parameters
``pl_module.ema_named_parameters()`` names (the trainable network; a frozen autoencoder is never
copied; DTensor shards stay shards), keyed by parameter name, so it costs one fp32 copy of the
trained network and works under DDP and ``ModelParallelStrategy``.

Checkpoints hold the shadows once, by name, under ``checkpoint["ema_state_dict"]`` (so a checkpoint
can be sampled with EMA weights: :func:`load_ema_weights`); the callback's own state holds only its
counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

EMA_KEY = "ema_state_dict"


def tracked_parameters(pl_module: L.LightningModule) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs an EMA tracks: the module's ``ema_named_parameters()`` when it has
    one (vdiff modules: the trainable network), else every trainable parameter."""
    if hasattr(pl_module, "ema_named_parameters"):
        return iter(list(pl_module.ema_named_parameters()))
    return ((n, p) for n, p in pl_module.named_parameters() if p.requires_grad)


class EMA(L.Callback):
    """Keep ``shadow = decay * shadow + (1 - decay) * weights`` after optimizer steps.

    Args:
        decay: the EMA decay (Vista: 0.9999).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so that short runs are not
            dominated by the random initialisation.
        start_step: first optimizer step that updates the average (copies the weights then).
        update_every: update every this many optimizer steps.
        use_for_validation: evaluate (validation, test, predict, sampling) with the EMA weights.

    Exactly one update per optimizer step, also under gradient accumulation. The shadows are saved
    in the checkpoint (``ema_state_dict``, by parameter name) and restored on resume.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        start_step: int = 0,
        update_every: int = 1,
        use_for_validation: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.start_step = start_step
        self.update_every = max(1, update_every)
        self.use_for_validation = use_for_validation
        self.shadow: dict[str, Tensor] | None = None
        self.num_updates = 0
        self._last_step = -1
        self._backup: dict[str, Tensor] | None = None
        self._pending_shadow: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ updates

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(tracked_parameters(pl_module))
        if self._pending_shadow is not None:
            stored = self._pending_shadow
            missing, unexpected = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
            if missing or unexpected:
                raise RuntimeError(
                    f"EMA: the checkpoint's shadows do not match the model's trainable parameters "
                    f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
                )
            self.shadow = {n: stored[n].to(device=p.device, dtype=torch.float32) for n, p in params.items()}
            self._pending_shadow = None
        elif self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if self.shadow is None or step == self._last_step:  # no optimizer step in this batch (accumulation)
            return
        self._last_step = step
        if step < self.start_step or step % self.update_every:
            return
        params = dict(tracked_parameters(pl_module))
        names = list(self.shadow)
        if step == self.start_step and self.num_updates == 0:
            for n in names:
                self.shadow[n].copy_(params[n].detach().float())
        decay = self.current_decay()
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - decay)
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping

    @torch.no_grad()
    def swap_in(self, pl_module: L.LightningModule) -> None:
        """Put the EMA weights into the module (keeping the trained weights aside)."""
        if self.shadow is None or self._backup is not None:
            return
        params = dict(tracked_parameters(pl_module))
        self._backup = {n: params[n].detach().clone() for n in self.shadow}
        for n, s in self.shadow.items():
            params[n].copy_(s.to(params[n].dtype))

    @torch.no_grad()
    def swap_out(self, pl_module: L.LightningModule) -> None:
        """Restore the trained weights after :meth:`swap_in`."""
        if self._backup is None:
            return
        params = dict(tracked_parameters(pl_module))
        for n, b in self._backup.items():
            params[n].copy_(b)
        self._backup = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.use_for_validation and not trainer.sanity_checking:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.use_for_validation:
            self.swap_in(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.use_for_validation:
            self.swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    # ------------------------------------------------------------------ checkpointing

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # The model weights in the checkpoint are the trained ones (swap_out ran before saving);
        # the averaged weights are stored once, under the module's own parameter names.
        if self.shadow is not None:
            checkpoint[EMA_KEY] = {n: s.detach().cpu() for n, s in self.shadow.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(EMA_KEY)
        if stored:
            self._pending_shadow = dict(stored)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_step": self._last_step, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._last_step = int(state_dict.get("last_step", -1))


def load_ema_weights(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Copy ``checkpoint["ema_state_dict"]`` into ``module`` if present; return whether it was."""
    ema = checkpoint.get(EMA_KEY)
    if not ema:
        return False
    params = dict(module.named_parameters())
    missing = [n for n in ema if n not in params]
    if missing:
        raise KeyError(f"EMA weights name parameters the module lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value.to(params[name].dtype))
    return True
