"""LPIPS (Zhang et al. 2018) through torchmetrics, with its torchvision backbone read from a LOCAL file.

torchmetrics ships LPIPS's linear heads inside the package but builds the backbone with torchvision's
pretrained weights, which torch.hub would download into ``$TORCH_HOME/hub/checkpoints/`` when the file is
missing. vdiff never downloads: :func:`lpips_backbone_path` names the file, :func:`build_lpips` refuses to
construct the network unless it is there, and the error says which file to put where.

Videos are float ``(B, T, 3, H, W)`` in [-1, 1]; :class:`LPIPS` folds them to frames and returns one distance
per frame ``(B, T)`` (differentiable, so it serves as a training loss too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

LpipsNet = Literal["alex", "vgg", "squeeze"]

# torchvision's ImageNet weights that torchmetrics' LPIPS backbones load (torch.hub cache names).
LPIPS_BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_backbone_path(net: LpipsNet = "alex") -> Path:
    """Where torchvision looks for the backbone of LPIPS ``net``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def check_lpips_weights(net: LpipsNet = "alex") -> Path:
    """Return the backbone file of LPIPS ``net``; raise FileNotFoundError naming it when it is missing."""
    path = lpips_backbone_path(net)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS ({net}) needs the torchvision ImageNet backbone weights {path.name}, expected at {path}. "
            f"vdiff does not download: copy the file there (it is torchvision's "
            f"https://download.pytorch.org/models/{path.name}), or set TORCH_HOME to a folder whose "
            f"hub/checkpoints/ holds it, or set the LPIPS weight to 0."
        )
    return path


def build_lpips(net: LpipsNet = "alex") -> nn.Module:
    """torchmetrics' LPIPS network (frozen, always in eval mode) after checking its backbone file is local.

    The returned module maps two image batches ``(N, 3, H, W)`` in [-1, 1] to distances ``(N, 1, 1, 1)``.
    """
    check_lpips_weights(net)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none").net


class LPIPS(nn.Module):
    """Per-frame LPIPS distance of two videos: ``(B, T, 3, H, W)`` x2 in [-1, 1] -> ``(B, T)``.

    Also accepts image batches ``(N, 3, H, W)`` (-> ``(N,)``). Differentiable in its inputs; its own weights
    are frozen. ``chunk`` bounds how many frames go through the backbone at once.
    """

    def __init__(self, net: LpipsNet = "alex", chunk: int | None = None) -> None:
        super().__init__()
        self.net_type = net
        self.chunk = chunk
        self.net = build_lpips(net)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"LPIPS: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.ndim not in (4, 5) or pred.shape[-3] != 3:
            raise ValueError(f"LPIPS: expected (B, T, 3, H, W) or (N, 3, H, W), got {tuple(pred.shape)}")
        lead = pred.shape[:-3]
        a, b = pred.reshape(-1, *pred.shape[-3:]), target.reshape(-1, *target.shape[-3:])  # (N, 3, H, W)
        step = self.chunk or a.shape[0]
        dist = torch.cat([self.net(x, y).flatten() for x, y in zip(a.split(step), b.split(step))])  # (N,)
        return dist.reshape(lead)
