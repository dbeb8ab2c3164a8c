"""peft's adapter file format, and where the adapters of a weights file live: one writer, one path rule.

An **adapter folder** holds one LoRA adapter as peft saves it (``PeftModel.save_pretrained``), so that
``peft.PeftModel.from_pretrained`` and :func:`vdiff.lit.adapters.load_adapter` both read it:

* ``adapter_config.json``: the ``LoraConfig`` as JSON (:func:`config_dict`);
* ``adapter_model.safetensors``: the adapter's tensors under the names of a ``PeftModel`` wrapping the
  network, without the adapter's name: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``.

:func:`write_adapter` is the one writer (the ``LoRA`` callback, ``vdiff export`` and the Vista converter all
go through it); :func:`read_adapter_config` / :func:`read_adapter_weights` read a folder back.

**Where** (the one path rule, :func:`adapter_folder`): the adapters of a weights file ``X.<ext>`` (a training
checkpoint ``X.ckpt``, an export or a converted UNet ``X.safetensors``) lie beside it, one folder per adapter
name::

    X_lora/<adapter>/        adapter_config.json + adapter_model.safetensors
    X_lora_ema/<adapter>/    the same adapters from the checkpoint's EMA weights (checkpoints with EMA only)

The Vista converter's single adapter is named ``default`` (``OUT_lora/default/``). An adapter name comes from
a recipe or from a checkpoint (a stranger's file too), so only plain names (letters, digits, ``_``, ``-``)
may name a folder (:func:`named_adapter_folder`): ``../x`` or ``/abs`` would write or read outside it.

Beside a checkpoint the folders are replaced, not overwritten, so that a process killed at any instant leaves
a complete one (:func:`write_adapter_folders`, :func:`recover_adapter_folders`, :func:`adapter_source`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from torch import Tensor

from vdiff.weights.safetensors_io import read_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's saved names are those of a PeftModel wrapping the network
DEFAULT_ADAPTER = "default"  # peft's name of a single adapter
LORA_SUFFIX, EMA_SUFFIX = "_lora", "_ema"  # X.ckpt -> X_lora/ (X_lora_ema/ for the EMA weights)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # adapter names that may name a folder


# ---------------------------------------------------------------------------- the config


def _json_safe(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def config_dict(config: Any) -> dict[str, Any]:
    """A peft config as plain JSON types (what ``adapter_config.json`` holds)."""
    return _json_safe(config.to_dict())


def config_from_dict(data: Mapping[str, Any]):
    """A ``LoraConfig`` from :func:`config_dict`'s output (or an ``adapter_config.json``); other peft types are
    refused."""
    from peft import LoraConfig

    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters are supported, got peft_type {data.get('peft_type')!r}")
    fields = LoraConfig.__dataclass_fields__
    return LoraConfig(**{k: v for k, v in data.items() if k in fields and fields[k].init})


# ---------------------------------------------------------------------------- one adapter folder


def write_adapter(folder: str | os.PathLike, config: Any, state: Mapping[str, Tensor]) -> Path:
    """Write one adapter folder in peft's format: ``adapter_config.json`` (``config``, a ``LoraConfig``) and
    ``adapter_model.safetensors`` (``state``: peft's names, ``base_model.model.<module>.lora_A.weight``).
    Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def read_adapter_config(folder: str | os.PathLike):
    """The ``LoraConfig`` of an adapter folder (read through :func:`adapter_source`)."""
    path = adapter_source(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"no adapter config at {path} (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON adapter config ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an adapter config holds a JSON object, got {type(data).__name__}")
    return config_from_dict(data)


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of an adapter folder's ``adapter_model.safetensors`` (peft's names), read through
    :func:`adapter_source` (an interrupted replacement of the folder still reads a complete adapter)."""
    return read_safetensors(adapter_source(folder) / ADAPTER_WEIGHTS)


# ---------------------------------------------------------------------------- where: the path rule


def lora_folder(weights_file: str | os.PathLike, ema: bool = False) -> Path:
    """The folder of every adapter of ``X.<ext>``: ``X_lora`` beside it (``X_lora_ema`` for the EMA weights)."""
    path = Path(weights_file)
    return path.with_name(f"{path.stem}{LORA_SUFFIX}{EMA_SUFFIX if ema else ''}")


def named_adapter_folder(folder: str | os.PathLike, name: str) -> Path:
    """``folder/<name>``, the folder of adapter ``name`` in a :func:`lora_folder`. Only plain names (letters,
    digits, ``_``, ``-``) may name a folder: ``../x`` or ``/abs`` would write or read outside ``folder``."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"LoRA adapter name {name!r} cannot name a folder under {folder}: use letters, digits, '_' and '-' only"
        )
    return Path(folder) / name


def adapter_folder(weights_file: str | os.PathLike, adapter: str = DEFAULT_ADAPTER, ema: bool = False) -> Path:
    """Where adapter ``adapter`` of weights file ``X.<ext>`` lives: ``X_lora/<adapter>/`` (``X_lora_ema/<adapter>/``
    for the EMA weights of a checkpoint). The one rule for checkpoints, exports and converted files."""
    return named_adapter_folder(lora_folder(weights_file, ema), adapter)


# ---------------------------------------------------------------------------- replacing folders beside a file


def _swap_names(folder: Path) -> tuple[Path, Path]:
    """``(X_lora.tmp, X_lora.old)``: the new folder being written and the replaced one, beside ``folder``."""
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def write_adapter_folders(
    folder: str | os.PathLike, configs: Mapping[str, Any], states: Mapping[str, Mapping[str, Tensor]]
) -> None:
    """``folder/<adapter>/`` for every adapter of ``states``, replacing an older ``folder`` so that a process
    killed at any instant leaves a complete one: the new folder is written as ``folder.tmp``; the old one is
    renamed to ``folder.old``, ``folder.tmp`` to ``folder``, then ``folder.old`` is deleted. Between the two
    renames (no ``folder``) :func:`adapter_source` reads the complete ``folder.tmp``, and the next write finishes
    the swap first (:func:`recover_adapter_folders`)."""
    folder = Path(folder)
    recover_adapter_folders(folder)
    tmp, old = _swap_names(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    for name, state in states.items():
        write_adapter(named_adapter_folder(tmp, name), configs[name], state)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_adapter_folders(folder: str | os.PathLike) -> None:
    """Finish a replacement of ``folder`` by :func:`write_adapter_folders` that a kill interrupted: with no
    ``folder`` but a ``folder.old``, the complete ``folder.tmp`` (renamed only when written) becomes ``folder``
    (``folder.old`` when there is no ``folder.tmp``); a leftover ``folder.old`` beside ``folder`` is deleted."""
    folder = Path(folder)
    tmp, old = _swap_names(folder)
    if not folder.exists() and old.exists():
        os.replace(tmp if tmp.exists() else old, folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)


def remove_adapter_folders(weights_file: str | os.PathLike) -> None:
    """Delete the adapter folders of ``X.<ext>`` (``X_lora``, ``X_lora_ema`` and their ``.tmp`` / ``.old``), as
    when the file itself is deleted."""
    for ema in (False, True):
        folder = lora_folder(weights_file, ema)
        for each in (folder, *_swap_names(folder)):
            shutil.rmtree(each, ignore_errors=True)


def adapter_source(folder: str | os.PathLike) -> Path:
    """Where to read the adapter folder ``folder`` (``X_lora/<adapter>``) from: itself, or, while a replacement
    of ``X_lora`` by :func:`write_adapter_folders` was interrupted between its renames (no ``X_lora``, an
    ``X_lora.old``), the complete copy in ``X_lora.tmp`` (else ``X_lora.old``). Reading changes no file."""
    folder = Path(folder)
    parent = folder.parent
    tmp, old = _swap_names(parent)
    if folder.exists() or parent.exists() or not old.exists():
        return folder
    for swapped in (tmp, old):
        if (swapped / folder.name).is_dir():
            return swapped / folder.name
    return folder
