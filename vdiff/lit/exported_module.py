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

:func:`vdiff.lit.module_loading.load_exported_module` rebuilds the module from an export exactly as
:func:`~vdiff.lit.module_loading.load_module` does from the checkpoint (Lightning's
``load_from_checkpoint`` with the same hyperparameters and entries), then loads the network's weights
strictly: the exported weights (EMA or trained, LoRA merged), plus the adapters from the
``<OUT stem>_lora/<adapter>/`` folders (:func:`vdiff.weights.peft_files.adapter_folder`) when the export kept
them separate.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping
from typing import Any

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
