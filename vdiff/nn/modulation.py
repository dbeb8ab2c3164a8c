"""adaLN helpers (DiT): a conditioning vector predicts per-channel shift, scale and gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift``; ``shift``/``scale`` broadcast to ``x`` (e.g. ``(B, 1, 1, D)``).
    One fused ``addcmul`` over ``x`` instead of a multiply and an add (``1 + scale`` is per clip, tiny)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """``x + gate * update`` in one fused ``addcmul``; ``gate`` broadcasts to ``x``."""
    return torch.addcmul(x, gate, update)


def adaln_modulation(hidden_size: int, num_chunks: int) -> nn.Sequential:
    """``SiLU -> Linear(hidden, num_chunks * hidden)``, named ``adaLN_modulation.1`` when stored as DiT does.
    Zero-initialise the Linear for adaLN-Zero (done by the model's weight init)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size, bias=True))
