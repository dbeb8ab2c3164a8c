"""A ``vdiff export`` file that samples like the checkpoint it came from.

An export (``vdiff export CKPT OUT.safetensors``) holds the network's weights under their plain names, so
they load strictly into the network class. Beside them, in the file's metadata, :func:`module_entries` stores
what rebuilding the LightningModule needs and the network's weights do not hold (``vdiff_checkpoint``: the
base64 of a ``torch.save`` blob, read back with ``weights_only=True``):

* the module's ``hyper_parameters`` (process, sampler, guidance, conditioning, evaluation protocol ...);
* the checkpoint's ``vdiff_*`` entries: ``vdiff_module`` (class path), ``vdiff_clip`` (clip length and size
  trained on), ``vdiff_autoencoder`` / ``vdiff_image_encoder`` (their configs, and the files they were read
  from with their sha256), ``vdiff_lora`` when the adapters were kept separate;
* the weights of the module's parts outside the network that the checkpoint stores (e.g. a random tiny CLIP
  image encoder); parts read from weights files are recorded by path and sha256 instead, as in a checkpoint.

:func:`load_exported_module` rebuilds the module from an export exactly as
:func:`~vdiff.callbacks.checkpoint_eval.load_module` does from the checkpoint (Lightning's
``load_from_checkpoint`` with the same hyperparameters and entries), then loads the network's weights
strictly: the exported weights (EMA or trained, LoRA merged), plus the adapters from the
``<OUT stem>_lora/<adapter>/`` folders when the export kept them separate.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

ENTRIES_KEY = "vdiff_checkpoint"  # export metadata: base64 of torch.save(module entries)
NETWORK = "net"  # the LightningModule attribute holding the network (VideoDiffusionModule)
MAX_ENTRIES_BYTES = 64 * 2**20  # a safetensors header holds at most 100 MB; base64 adds a third
# Checkpoint entries an export leaves out: training state, and what the exported weights already hold.
_LEFT_OUT = ("state_dict", "ema_state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks",
             "vdiff_video_quality", "vdiff_lora")  # fmt: skip


def module_entries(checkpoint: Mapping[str, Any], state: Mapping[str, Tensor], lora: Mapping[str, Any] | None) -> str:
    """The ``vdiff_checkpoint`` metadata of an export of ``checkpoint`` (a training checkpoint's dict).

    state: the module's state dict (EMA weights swapped in where exported so); its entries outside the network
        that the checkpoint stores travel with the export. lora: the checkpoint's ``vdiff_lora`` entry when the
        adapters are written beside the export (separate), else None (merged into the weights, or none)."""
    entries = {k: v for k, v in checkpoint.items() if k not in _LEFT_OUT}
    if lora:
        entries["vdiff_lora"] = dict(lora)
    stored = checkpoint.get("state_dict") or {}
    prefix = f"{NETWORK}."
    entries["state_dict"] = {
        k: state[k].detach().cpu().contiguous() for k in stored if not k.startswith(prefix) and k in state
    }
    buffer = io.BytesIO()
    torch.save(entries, buffer)
    size = buffer.getbuffer().nbytes
    if size > MAX_ENTRIES_BYTES:
        raise ValueError(
            f"vdiff export: the module's parts outside the network that the checkpoint stores take {size / 2**20:.0f} "
            f"MB, more than an export's metadata carries ({MAX_ENTRIES_BYTES // 2**20} MB): read the autoencoder and "
            "image encoder from weights files (PretrainedAutoencoder, PretrainedCLIPImageEmbedder) or sample from "
            "the checkpoint"
        )
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file (as ``vdiff export`` writes) rather than a training checkpoint. A
    ``.safetensors`` file that cannot be read (truncated, empty) raises
    :class:`~vdiff.weights.safetensors_io.WeightsFileError` naming it, instead of being read as a checkpoint."""
    from vdiff.weights.safetensors_io import WeightsFileError, open_safetensors

    try:
        with open_safetensors(path):
            return True
    except WeightsFileError:
        if str(path).endswith(".safetensors"):
            raise
        return False
    except OSError:
        return False


def export_entries(path: str | os.PathLike) -> dict[str, Any]:
    """The module entries an export carries (:func:`module_entries`), read without running code: the
    hyperparameters, ``vdiff_*`` entries and the non-network ``state_dict``. An export without them (written by
    an older vdiff, or an autoencoder / other-layout export) is refused naming the file and the way out."""
    from vdiff.lit.safe_loading import refusing_code
    from vdiff.weights.safetensors_io import load_metadata

    metadata = load_metadata(path)
    encoded = metadata.get(ENTRIES_KEY)
    if not encoded:
        raise ValueError(
            f"{path} is a weights file without its module's config (metadata {ENTRIES_KEY!r}): export the "
            "checkpoint again with `vdiff export` (vdiff layout), or give the .ckpt file `vdiff fit` wrote"
        )
    blob = io.BytesIO(base64.b64decode(encoded))
    with refusing_code(path, file=blob):
        entries = torch.load(blob, map_location="cpu", weights_only=True)
    if not isinstance(entries, dict) or not isinstance(entries.get("vdiff_module"), str):
        raise ValueError(f"{path}: metadata {ENTRIES_KEY!r} holds no vdiff module entries")
    return entries


def load_exported_module(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """The LightningModule of a ``vdiff export`` file, built as from its checkpoint (Lightning's
    ``load_from_checkpoint`` of the exported entries, the network's weights added to the state dict right
    before its strict load), with separate LoRA adapters loaded from ``<stem>_lora/``; in eval mode."""
    from vdiff.callbacks.checkpoint_eval import checkpoint_module_class
    from vdiff.callbacks.lora import LORA_KEY, load_adapter, named_adapter_folder
    from vdiff.lit.load_hooks import after_on_load_checkpoint
    from vdiff.lit.safe_loading import refusing_code
    from vdiff.weights.safetensors_io import read_safetensors

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
        folder = path.with_name(f"{path.stem}_lora")
        for name in lora["adapters"]:
            adapter = named_adapter_folder(folder, name)
            if not adapter.is_dir():
                raise FileNotFoundError(f"{path}: its LoRA adapter {name!r} is missing (expected the folder {adapter})")
            load_adapter(getattr(module, NETWORK), adapter, name)
    return module.eval()
