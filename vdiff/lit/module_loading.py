"""Any vdiff LightningModule back from a file: a training checkpoint (``vdiff fit``) or a ``vdiff export``.

:func:`load_module` is what the tools (``vdiff sample``, ``vdiff export``), the ``EvaluateCheckpoint`` and
``SteeringTest`` callbacks and user code call. It reads the file without running code
(:mod:`vdiff.lit.safe_loading`), imports the class that wrote it (:func:`checkpoint_module_class`, from the
checkpoint's ``vdiff_module`` entry), injects again the LoRA adapters a run injected
(``checkpoint["vdiff_lora"]``, :func:`vdiff.lit.adapters.adapters_reapplied`) and puts the EMA weights in
place when asked and present (:func:`vdiff.lit.checkpointing.load_ema_weights`). An export is rebuilt from the module entries in
its metadata (:mod:`vdiff.lit.exported_module`) by :func:`load_exported_module`.
"""

from __future__ import annotations

import importlib
import io
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vdiff.lit.adapters import LORA_KEY, adapters_reapplied, load_adapter
from vdiff.lit.checkpointing import load_ema_weights
from vdiff.lit.exported_module import NETWORK, export_entries, is_export
from vdiff.lit.load_hooks import after_on_load_checkpoint
from vdiff.lit.safe_loading import load_checkpoint, refusing_code
from vdiff.weights.peft_files import adapter_folder
from vdiff.weights.safetensors_io import read_safetensors

# ---------------------------------------------------------------------------- the class and entries of a file


def checkpoint_entries(path: str | os.PathLike) -> dict[str, Any]:
    """The entries of a training checkpoint (tensors mapped, not read) or of a ``vdiff export`` file (what it
    carries of its checkpoint: hyperparameters, ``vdiff_module``, ``vdiff_clip`` ...), read without running code."""
    return export_entries(path) if is_export(path) else load_checkpoint(path, mmap=True)


def checkpoint_module_class(checkpoint: Any, path: str | os.PathLike) -> type[L.LightningModule]:
    """The LightningModule class that wrote a training checkpoint (its ``vdiff_module`` entry), imported.

    Raises ValueError when the file is no vdiff training checkpoint (naming a safetensors weights file, as
    ``vdiff export`` writes, as such), and ImportError naming the class and the fix (its module on
    ``PYTHONPATH``) when the class cannot be imported."""
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


# ---------------------------------------------------------------------------- loading


def load_module(path: str, map_location: str | torch.device = "cpu", use_ema: bool = True) -> L.LightningModule:
    """Load any vdiff LightningModule from a checkpoint written by ``vdiff fit``, in eval mode.

    Adapters a :class:`~vdiff.callbacks.LoRA` callback injected (recorded in ``checkpoint["vdiff_lora"]``)
    are injected again before the state dict is loaded; the EMA weights (``ema_state_dict``) replace
    the trained ones when ``use_ema`` and the checkpoint has them. Nothing in the file runs: it is read with
    ``weights_only=True`` (:mod:`vdiff.lit.safe_loading`), and one that holds other Python objects than
    vdiff's configs is refused with an :class:`~vdiff.lit.safe_loading.UnsafeCheckpointError` naming it.
    ``path`` may also be a ``vdiff export`` file, which carries its module's config
    (:func:`load_exported_module`; its weights are those exported, EMA or not)."""
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


def load_exported_module(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """The LightningModule of a ``vdiff export`` file, built as from its checkpoint (Lightning's
    ``load_from_checkpoint`` of the exported entries, the network's weights added to the state dict right
    before its strict load), with separate LoRA adapters loaded from ``<stem>_lora/<adapter>/``
    (:func:`vdiff.weights.peft_files.adapter_folder`); in eval mode."""
    path = Path(path)
    entries = export_entries(path)
    cls = checkpoint_module_class(entries, path)
    lora = entries.pop(LORA_KEY, None)
    buffer = io.BytesIO()
    torch.save(entries, buffer)  # the checkpoint without the network's weights (small)
    buffer.seek(0)
    prefix = f"{NETWORK}."

    def add_network_weights(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update({prefix + k: v for k, v in read_safetensors(path, map_location).items()})

    try:
        with after_on_load_checkpoint(cls, add_network_weights), refusing_code(path, file=buffer):
            module = cls.load_from_checkpoint(buffer, map_location=map_location, weights_only=True, strict=True)
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        raise ValueError(f"{path}: the export does not fit {cls.__name__}: {' '.join(str(err).split())[:600]}") from err
    if lora:  # kept separate: the base network in the file, the adapters in peft folders beside it
        for name in lora["adapters"]:
            adapter = adapter_folder(path, name)
            if not adapter.is_dir():
                raise FileNotFoundError(f"{path}: its LoRA adapter {name!r} is missing (expected the folder {adapter})")
            load_adapter(getattr(module, NETWORK), adapter, name)
    return module.eval()
