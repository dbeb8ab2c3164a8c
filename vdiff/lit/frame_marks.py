"""Given and generated frames told apart at a glance: a coloured border on every frame.

Green where the frame was given (conditioning), red where it was generated. The ``SampleVideos`` callback's
TensorBoard panels and ``vdiff sample``'s PNG grids both draw it.
"""

from __future__ import annotations

import torch
from torch import Tensor

GIVEN_COLOUR = (0.0, 1.0, 0.0)
GENERATED_COLOUR = (1.0, 0.0, 0.0)


def mark_frames(video: Tensor, given_frames: Tensor, width: int = 1) -> Tensor:
    """Paint a border on every frame: green where given, red where generated.

    video ``(B, T, 3, H, W)`` in [0, 1]; given_frames bool ``(B, T)``. Returns a new tensor.
    """
    out = video.clone()
    given = torch.tensor(GIVEN_COLOUR, device=video.device).view(1, 1, 3, 1, 1)
    generated = torch.tensor(GENERATED_COLOUR, device=video.device).view(1, 1, 3, 1, 1)
    colour = torch.where(given_frames.view(*given_frames.shape, 1, 1, 1), given, generated)  # (B, T, 3, 1, 1)
    border = torch.zeros(video.shape[-2:], dtype=torch.bool, device=video.device)
    border[:width, :] = border[-width:, :] = True
    border[:, :width] = border[:, -width:] = True
    return torch.where(border, colour.expand_as(out), out)
