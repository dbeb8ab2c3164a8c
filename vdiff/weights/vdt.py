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


def _listing(items: list[str]) -> str:
    return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")


def load_vdt_checkpoint(model: VDT, path: str | Path, prefer: Literal["ema", "model"] = "ema") -> VDT:
    """Load a RERV/VDT (or vdiff) checkpoint into ``model`` strictly. Raises ValueError naming every
    missing and unexpected key and every shape mismatch. A model on the meta device gets the tensors
    assigned (``assign=True``). Returns ``model``."""
    state = read_vdt_state_dict(path, prefer)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        problems = [f"{label} ({len(items)}): {_listing(items)}" for label, items in groups if items]
        raise ValueError(
            f"{path}: checkpoint does not fit this VDT; "
            + "; ".join(problems)
            + ". Build the model with the checkpoint's config (the released Physion checkpoint: "
            'VDTConfig.from_name("VDT-L/2", input_size=16, num_classes=1, in_channels=4, learn_sigma=True)).'
        )
    assign = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=True, assign=assign)
    return model
