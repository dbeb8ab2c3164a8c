"""Exponential moving average of a module's weights, swapped in for validation and sampling.

Lightning 2.6's ``EMAWeightAveraging`` deep-copies the whole LightningModule (autoencoder and
all) and does not support sharded models; this callback keeps fp32 shadows of only
``pl_module.ema_parameters()`` (DTensor shards stay shards), so it costs one copy of the trained
network and works under DDP and ``ModelParallelStrategy``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn


def _tracked(pl_module: L.LightningModule) -> list[nn.Parameter]:
    if hasattr(pl_module, "ema_parameters"):
        return list(pl_module.ema_parameters())
    return [p for p in pl_module.parameters() if p.requires_grad]


class EMA(L.Callback):
    """Keep ``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    Args:
        decay: the EMA decay (Vista: 0.9999).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so that short runs are not
            dominated by the random initialisation.
        start_step: first global step that updates the average (copies the weights then).
        update_every: update every this many optimizer steps.
        use_for_validation: evaluate (validation, test, predict, sampling) with the EMA weights.

    The shadows are saved in the checkpoint under ``callbacks`` and restored on resume.
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
        self.shadow: list[Tensor] | None = None
        self.num_updates = 0
        self._backup: list[Tensor] | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ updates

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = _tracked(pl_module)
        if self._pending_state is not None:
            stored = self._pending_state["shadow"]
            if len(stored) != len(params):
                raise RuntimeError(f"EMA checkpoint tracks {len(stored)} tensors, the model has {len(params)}")
            self.shadow = [s.to(device=p.device, dtype=torch.float32) for s, p in zip(stored, params)]
            self.num_updates = int(self._pending_state["num_updates"])
            self._pending_state = None
        elif self.shadow is None:
            self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.shadow is None or step < self.start_step or step % self.update_every:
            return
        params = _tracked(pl_module)
        if step == self.start_step and self.num_updates == 0:
            for s, p in zip(self.shadow, params):
                s.copy_(p.detach().float())
        decay = self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1.0 - decay)
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping

    @torch.no_grad()
    def swap_in(self, pl_module: L.LightningModule) -> None:
        """Put the EMA weights into the module (keeping the trained weights aside)."""
        if self.shadow is None or self._backup is not None:
            return
        params = _tracked(pl_module)
        self._backup = [p.detach().clone() for p in params]
        for p, s in zip(params, self.shadow):
            p.copy_(s.to(p.dtype))

    @torch.no_grad()
    def swap_out(self, pl_module: L.LightningModule) -> None:
        """Restore the trained weights after :meth:`swap_in`."""
        if self._backup is None:
            return
        for p, b in zip(_tracked(pl_module), self._backup):
            p.copy_(b)
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
        # The model weights in the checkpoint are the trained ones (swap_out ran before saving),
        # and `ema_state_dict` holds the averaged weights under the module's own names, so a
        # checkpoint can be loaded for sampling with EMA weights: see `load_ema_weights`.
        if self.shadow is None:
            return
        tracked = {id(p) for p in _tracked(pl_module)}
        names = [n for n, p in pl_module.named_parameters() if id(p) in tracked]
        checkpoint["ema_state_dict"] = {n: s.detach().cpu() for n, s in zip(names, self.shadow)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": [s.detach().cpu() for s in self.shadow] if self.shadow is not None else None,
            "num_updates": self.num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("shadow") is not None:
            self._pending_state = state_dict


def load_ema_weights(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Copy ``checkpoint["ema_state_dict"]`` into ``module`` if present; return whether it was."""
    ema = checkpoint.get("ema_state_dict")
    if not ema:
        return False
    missing = [n for n in ema if n not in dict(module.named_parameters())]
    if missing:
        raise KeyError(f"EMA weights name parameters the module lacks: {missing[:5]}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value.to(params[name].dtype))
    return True
