"""The optimizer settings every vdiff module takes as one group, ``optimizer:``, and the learning-rate schedule.

A recipe reads::

    model:
      class_path: vdiff.lit.svd.SVDModule
      init_args:
        optimizer: {lr: 1.0e-05, weight_decay: 0.01, warmup_steps: 1000, lr_decay: cosine}

and a command line ``--model.init_args.optimizer.lr 3e-5``. Fields a recipe leaves out keep the module's
defaults (:attr:`~vdiff.lit.base.VideoDiffusionModule.DEFAULT_OPTIMIZER`: VDT lr 1e-4; SVD and Vista 1e-5;
the autoencoder 4.5e-6 with betas 0.5/0.9). The modules build AdamW from it (weight decay on matrices
only, see their ``parameter_groups``); another optimizer class is ``optimizer_class:`` (``class_path`` /
``init_args``), which receives the parameter groups, while ``warmup_steps`` and ``lr_decay`` still apply.

Migration from the flat arguments (``lr``, ``betas``, ``weight_decay``, ``warmup_steps``, ``lr_decay`` beside
the module's other arguments, and ``optimizer:`` naming a class): write them under ``optimizer:`` and name a
class with ``optimizer_class:``. A checkpoint written with the flat arguments still loads, and a run resumed
from it keeps its settings: :func:`migrate_flat_optimizer_arguments` moves them into the group, with a warning
naming the new form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Literal

import torch

LrDecay = Literal["constant", "cosine"]
LR_DECAYS: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its learning-rate schedule. A field left None (null) takes the module's default
    (:attr:`~vdiff.lit.base.VideoDiffusionModule.DEFAULT_OPTIMIZER`); a module holds its settings complete
    (:meth:`of`).

    lr:           learning rate (SVD's spatial layers: x ``spatial_lr_scale``).
    betas:        AdamW's ``(beta1, beta2)`` (torch: 0.9, 0.999).
    eps:          AdamW's epsilon (torch: 1e-8).
    weight_decay: AdamW weight decay (the diffusion modules: on matrices only, not on norms, biases, 1-D embeddings).
    warmup_steps: linear warm-up from 0 over this many optimizer steps (the autoencoder: batches).
    lr_decay:     ``constant`` after warm-up, or ``cosine``: decay to 0 at the trainer's last step
                  (``trainer.estimated_stepping_batches``: ``max_steps`` when set).
    """

    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    lr_decay: LrDecay | None = None

    def __post_init__(self) -> None:
        if self.betas is not None:
            object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            problems.append(f"lr must be >= 0, got {self.lr}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas)):
            problems.append(f"betas must be two values in [0, 1), got {list(self.betas)}")
        if self.eps is not None and not self.eps > 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        steps = self.warmup_steps
        if steps is not None and (int(steps) != steps or steps < 0):
            problems.append(f"warmup_steps must be an integer >= 0, got {steps}")
        if self.lr_decay is not None and self.lr_decay not in LR_DECAYS:
            problems.append(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if problems:
            raise ValueError(f"optimizer: {'; '.join(problems)}")

    @classmethod
    def complete(cls, **fields_: Any) -> OptimizerSettings:
        """Settings with every field set: ``fields_`` over torch's AdamW defaults, no warm-up, constant lr (a module's
        :attr:`DEFAULT_OPTIMIZER`)."""
        return cls(**{**_COMPLETE, **fields_})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def given(self) -> dict[str, Any]:
        """The fields that are set (not None)."""
        return {name: getattr(self, name) for name in self.field_names() if getattr(self, name) is not None}

    @classmethod
    def of(cls, value: OptimizerSettings | Mapping[str, Any] | None, default: OptimizerSettings) -> OptimizerSettings:
        """The complete settings of a module given ``value``: its fields that are set, over ``default`` (the module's
        :attr:`DEFAULT_OPTIMIZER`); None is ``default``; a mapping of fields (as YAML and checkpoints written by the
        CLI give it) is accepted, an unknown field is an error naming it."""
        if value is None:
            return default
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.field_names()))
            if unknown:
                raise ValueError(f"optimizer: unknown field(s) {unknown}; the fields are {list(cls.field_names())}")
            value = cls(**value)
        if not isinstance(value, cls):
            raise TypeError(f"optimizer: expected OptimizerSettings or a mapping of its fields, got {type(value).__name__}")
        return replace(default, **value.given())

    def adamw(self, params: Any, **options: Any) -> torch.optim.AdamW:
        """AdamW over ``params`` (tensors or parameter groups, which may carry their own ``lr``/``weight_decay``)
        with these settings' ``lr``, ``betas``, ``eps`` and ``weight_decay``; ``options`` adds e.g. ``fused``."""
        return torch.optim.AdamW(params, **{**self.adamw_options(), **options})

    def adamw_options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`adamw` (a ``functools.partial(torch.optim.AdamW, ...)`` takes them)."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: float | None) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up and decay (:func:`lr_factor`) of ``optimizer``, stepped once per optimizer step; ``total_steps``:
        the training length in steps, where ``lr_decay: cosine`` reaches 0 (None: no trainer, no decay)."""
        total = None
        if self.lr_decay == "cosine" and total_steps is not None:
            if not math.isfinite(total_steps):
                raise ValueError("optimizer.lr_decay='cosine' needs a finite training length: set trainer.max_steps "
                                 "or max_epochs")
            total = float(total_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=int(self.warmup_steps), total=total))


def lr_factor(step: int, warmup: int, total: float | None) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then constant (``total``
    None) or cosine decay reaching 0 at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


_COMPLETE: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 0,
                             "lr_decay": "constant"}

# The flat arguments that became fields of the group (the field of the same name).
FLAT_OPTIMIZER_ARGUMENTS: tuple[str, ...] = ("lr", "betas", "weight_decay", "warmup_steps", "lr_decay")


def migrate_flat_optimizer_arguments(hparams: dict[str, Any], owner: str) -> bool:
    """Move the flat optimizer arguments of hyperparameters written before the ``optimizer:`` group (a checkpoint's
    ``hyper_parameters``) into ``hparams["optimizer"]`` (a mapping of fields), in place, with a warning naming the new
    form. Returns whether there were any. ``owner`` names the module in the warning."""
    flat = {name: hparams.pop(name) for name in FLAT_OPTIMIZER_ARGUMENTS if name in hparams}
    if not flat:
        return False
    group = hparams.get("optimizer")
    if isinstance(group, OptimizerSettings):
        group = group.given()
    elif not isinstance(group, Mapping) or "class_path" in group:
        group = {}  # None, or the class the old ``optimizer`` argument named (``optimizer_class`` now)
    hparams["optimizer"] = {**flat, **group}
    warnings.warn(
        f"{owner}: the checkpoint holds the flat optimizer arguments {sorted(flat)}, written before the optimizer "
        f"group; read as optimizer: {hparams['optimizer']} (recipes now write model.init_args.optimizer.lr etc.)",
        FutureWarning,
        stacklevel=2,
    )
    return True


def settings_in_old_checkpoint(checkpoint: dict[str, Any], default: OptimizerSettings, owner: str) -> OptimizerSettings | None:
    """The optimizer settings of a checkpoint whose hyperparameters hold the flat arguments (migrated in place by
    :func:`migrate_flat_optimizer_arguments`, fields it lacks from ``default``), or None for a checkpoint without."""
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and migrate_flat_optimizer_arguments(hparams, owner):
        return OptimizerSettings.of(hparams["optimizer"], default)
    return None
