"""The ``LoRA`` callback: LoRA adapters (peft) injected through the network hook, trained with the base frozen.

:class:`LoRA` is a callback with ``configure_network(trainer, pl_module)``, the hook the base module's
``configure_model`` calls right after building the network (docs/architecture.md, section 5): so the
adapters exist before the strategy wraps (DDP) or shards (``fully_shard``) the network, before the
optimizer is built, and before :class:`~vdiff.callbacks.EMA` collects what it averages. The hook:

1. injects one or more named peft LoRA adapters into the modules of a preset the network declares
   (``LORA_PRESETS``, :mod:`vdiff.models.lora_targets`; default ``"attention"``: q/k/v/out of every attention,
   on VDT, UNet-SVD and Vista alike) or chosen by regex (``re.fullmatch`` on the module names of the network,
   e.g. ``r".*temporal_attn\\.(qkv|proj)"`` for VDT's temporal attention only: VDT fuses q, k and v into one
   ``qkv`` projection, so one rank-r update covers the three), with rank, alpha, dropout and initialisation
   from the recipe; every adapter is active (their updates add);
2. freezes every parameter of the LightningModule except the adapters marked trainable and the
   network parameters matching ``extra_trainable`` (e.g. ``r".*action.*"``), so only those reach the
   optimizer (the base module's parameter groups take trainable parameters only) and the EMA;
3. optionally initialises an adapter from a saved adapter folder (``path``).

Checkpoints. The adapter weights are in the state dict under the network's (injected) parameter names;
``checkpoint["vdiff_lora"]`` records how they were injected, which
:func:`vdiff.lit.module_loading.load_module` uses to inject them again before the state dict is loaded
(``load_from_checkpoint`` runs ``configure_model`` without a trainer, so without the hook). Beside every
checkpoint file ``X.ckpt`` the callback writes the adapters in peft's own format,
``X_lora/<adapter>/adapter_model.safetensors`` + ``adapter_config.json`` (and ``X_lora_ema/<adapter>/`` from
the EMA weights when the checkpoint has them; :func:`vdiff.weights.peft_files.adapter_folder`), loadable by
:func:`vdiff.lit.adapters.load_adapter` on a fresh network or by ``peft.PeftModel.from_pretrained``; a folder
is replaced so that a kill at any instant leaves a complete one
(:func:`vdiff.weights.peft_files.write_adapter_folders`).

The mechanics (inject, merge, unload, save, load, re-apply) are :mod:`vdiff.lit.adapters`; the file format and
the folders are :mod:`vdiff.weights.peft_files`. Their names stay importable from here for older code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from torch import Tensor, nn

from vdiff.lit.adapters import (  # noqa: F401 - the adapter library's names, re-exported for older code
    LORA_KEY,
    STRUCTURE_FIELDS,
    UNET_SVD_ATTENTION,
    VDT_ATTENTION,
    VDT_TEMPORAL_ATTENTION,
    LoRAAdapter,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    adapter_structure,
    adapters_reapplied,
    apply_lora_entry,
    ema_adapter_states,
    gathered_adapter_states,
    inject_adapters,
    load_adapter,
    load_adapter_weights,
    lora_entry,
    merge_adapters,
    save_adapter,
    set_trainable,
    tuner_layers,
    unload_adapters,
    unmerge_adapters,
)
from vdiff.lit.checkpointing import EMA_KEY
from vdiff.weights.peft_files import (  # noqa: F401 - the file format's names, re-exported for older code
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_ADAPTER,
    PEFT_PREFIX,
    adapter_source,
    config_dict,
    config_from_dict,
    lora_folder,
    named_adapter_folder,
    read_adapter_config,
    read_adapter_weights,
    recover_adapter_folders,
    remove_adapter_folders,
    write_adapter,
    write_adapter_folders,
)

# ---------------------------------------------------------------------------- the callback


class LoRA(L.Callback):
    """Inject LoRA adapters into the network through ``configure_network`` and train only them.

    Args:
        adapters: ``{name: LoRAAdapter}`` (several named adapters, all active). None: one adapter named
            ``default`` from the flat arguments below.
        target_modules, rank, alpha, dropout, init, preset: the single adapter's settings (see
            :class:`LoRAAdapter`). Neither ``target_modules`` nor ``preset``: the network's ``attention`` preset
            (q/k/v/out of every attention), so ``LoRA()`` works on every family.
        extra_trainable: regexes (``re.fullmatch``) of network parameter names that train too (e.g.
            ``[".*action.*"]``); names are those after injection (an adapted ``x.weight`` is ``x.base_layer.weight``).
        network: the LightningModule attribute holding the network (vdiff modules: ``net``).
        save_adapter_files: write peft-format adapter folders beside every checkpoint file.

    A recipe (or ``-c recipes/callbacks/lora.yaml``, which adds ``LoRA(preset: attention)`` to a recipe's callbacks)::

        trainer:
          callbacks:
            - class_path: vdiff.callbacks.LoRA
              init_args: {preset: attention+mlp, rank: 8}
            - class_path: vdiff.callbacks.LoRA
              init_args:
                adapters:
                  temporal: {target_modules: '.*temporal_attn\\.(qkv|proj)', rank: 16, alpha: 16}
                extra_trainable: ['.*action.*']
    """

    def __init__(
        self,
        adapters: dict[str, LoRAAdapter] | None = None,
        target_modules: str | list[str] | None = None,
        rank: int = 16,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: bool | str = True,
        extra_trainable: list[str] | None = None,
        network: str = "net",
        save_adapter_files: bool = True,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        if adapters is None:
            adapters = {DEFAULT_ADAPTER: LoRAAdapter(target_modules, rank, alpha, dropout, init, preset=preset)}
        elif target_modules is not None or preset is not None:
            raise ValueError("LoRA: give adapters or the flat target_modules/preset, not both")
        if not adapters:
            raise ValueError("LoRA: no adapters given")
        self.adapters = {name: a if isinstance(a, LoRAAdapter) else LoRAAdapter(**a) for name, a in adapters.items()}
        self.extra_trainable = list(extra_trainable or [])
        self.network = network
        self.save_adapter_files = save_adapter_files
        self.trainable: list[str] = []  # trainable parameter names (in the network) after the hook
        self._entry: dict[str, Any] | None = None
        self._pending: tuple[dict[str, Any], dict[str, dict[str, Tensor]]] | None = None

    # ------------------------------------------------------------------ the network hook

    def configure_network(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, self.network, None)
        if not isinstance(net, nn.Module):
            raise TypeError(f"LoRA: {type(pl_module).__name__}.{self.network} is not a network")
        inject_adapters(net, {name: spec.peft_config(net) for name, spec in self.adapters.items()})
        for name, spec in self.adapters.items():
            if spec.path is not None:
                load_adapter_weights(net, name, read_adapter_weights(spec.path), source=spec.path)
        trainable = [name for name, spec in self.adapters.items() if spec.trainable]
        extra = list(self.extra_trainable)  # plus what the adapters' presets train fully (Vista's action projections)
        for spec in self.adapters.values():
            if spec.path is None:
                extra += [p for p in spec.targets(net)[1] if p not in extra]
        self.trainable = set_trainable(pl_module, net, trainable, extra)
        self._entry = lora_entry(net, self.network, trainable, extra)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._entry is None:
            return
        checkpoint[LORA_KEY] = self._entry
        if not self.save_adapter_files:
            return
        # Full adapter tensors for the files beside the checkpoint: gathered here, on every rank (sharded
        # parameters need a collective), written by rank 0 once the checkpoint itself is written.
        net = getattr(pl_module, self.network)
        states = gathered_adapter_states(pl_module, net, list(self._entry["adapters"]))
        self._pending = ({n: net.peft_config[n] for n in states}, states) if trainer.is_global_zero else None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(LORA_KEY)
        if stored is None or self._entry is None:
            return
        have, saved = adapter_structure(self._entry), adapter_structure(stored)
        if have != saved:  # the state dict may still fit (same shapes) while computing something else
            raise ValueError(
                f"LoRA: the checkpoint's adapters were injected differently from this run's: {saved} vs {have}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every checkpoint the trainer writes (ModelCheckpoint's, trainer.save_checkpoint's, also after
        # fit) passes through strategy.save_checkpoint, which knows the path: wrap it (once per strategy;
        # the wrapper stays with the trainer) to write the adapter folders beside the file, and
        # remove_checkpoint to delete them with it.
        strategy = trainer.strategy
        if not self.save_adapter_files or getattr(strategy, "_vdiff_lora_files", None) is self:
            return
        save, remove = strategy.save_checkpoint, strategy.remove_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
            ema = checkpoint.get(EMA_KEY)  # read before the strategy may pop entries
            save(checkpoint, filepath, storage_options=storage_options)
            self._write_beside(trainer, filepath, ema)

        def remove_checkpoint(filepath) -> None:
            remove(filepath)
            if trainer.is_global_zero:
                remove_adapter_folders(filepath)

        strategy.save_checkpoint, strategy.remove_checkpoint = save_checkpoint, remove_checkpoint
        strategy._vdiff_lora_files = self

    def _write_beside(self, trainer: L.Trainer, filepath, ema: Mapping[str, Tensor] | None) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not trainer.is_global_zero:
            return
        configs, states = pending
        write_adapter_folders(lora_folder(filepath), configs, states)
        if ema:
            net = getattr(trainer.lightning_module, self.network)
            ema_states = ema_adapter_states(net, self.network, ema, list(states))
            if ema_states:
                write_adapter_folders(lora_folder(filepath, ema=True), configs, ema_states)
