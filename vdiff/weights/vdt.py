"""Reading RERV/VDT (and vdiff) VDT checkpoints into :class:`vdiff.models.vdt.VDT`.

vdiff's VDT keeps the reference's parameter names and shapes, so a reference checkpoint loads
strictly, with no renaming. What this module adds: the reference's file layouts (DiT-style training
checkpoints ``{"model", "ema", "opt", "args"}``, plain state dicts, safetensors, DDP ``module.``
prefixes) and an error naming every missing, unexpected and mis-shaped key instead of a partial load.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from vdiff.models.vdt import VDT
from vdiff.weights.safetensors_io import read_safetensors, resolve_weights_path
from vdiff.weights.template import Rule, Wording, map_keys

WORDING = Wording(missing="{name}", mismatch="{name}: checkpoint {got} vs model {want}")  # the keys are ours


def read_vdt_state_dict(path: str | Path, prefer: Literal["ema", "model"] = "ema") -> dict[str, Tensor]:
    """Read a VDT state dict from ``.safetensors`` or a torch ``.pt/.pth`` file. Training checkpoints of
    the reference (DiT's ``{"model", "ema", "opt", "args"}``) give their ``prefer`` entry (or the other
    one when it is absent); a ``module.`` prefix (DDP) is removed."""
    path = resolve_weights_path(path, what="VDT checkpoint")  # also looked up under $VDIFF_WEIGHTS
    if path.suffix == ".safetensors":
        obj: object = read_safetensors(path)
    else:
        # DiT-style checkpoints pickle their argparse.Namespace; allow exactly that class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    other = "model" if prefer == "ema" else "ema"
    for key in (prefer, other, "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_vdt_checkpoint(model: VDT, path: str | Path, prefer: Literal["ema", "model"] = "ema") -> VDT:
    """Load a RERV/VDT (or vdiff) checkpoint into ``model`` strictly. Raises a ValueError
    (:class:`~vdiff.weights.errors.KeyMappingError`) naming the file and every missing and unexpected key and every
    shape mismatch. A model on the meta device gets the tensors assigned (``assign=True``). Returns ``model``."""
    state = read_vdt_state_dict(path, prefer)
    expected = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    hint = ("build the model with the checkpoint's config (the released Physion checkpoint: "
            'VDTConfig.from_name("VDT-L/2", input_size=16, num_classes=1, in_channels=4, learn_sigma=True))')  # fmt: skip
    state = map_keys(state, shapes, lambda k, s: Rule((k,), (s,)), str(path), "this VDT", WORDING, hint=hint,
                     compact=True)  # fmt: skip
    assign = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=True, assign=assign)
    return model
