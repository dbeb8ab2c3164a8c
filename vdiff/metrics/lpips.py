"""LPIPS (Zhang et al. 2018) through torchmetrics, with its torchvision backbone read from a LOCAL file.

torchmetrics ships LPIPS's linear heads inside the package but builds the backbone with torchvision's
pretrained weights, which torch.hub would fetch into ``$TORCH_HOME/hub/checkpoints/`` on its own. Here the
backbone is read from a file the caller names (``backbone=``; the layers above fetch it on first use through
:mod:`vdiff.weights.registry`, the ``lpips-alex|vgg|squeeze`` presets), or by default from where torchvision
keeps it (:func:`lpips_backbone_path`); this layer never downloads, and a missing file is an error naming it.

Videos are float ``(B, T, 3, H, W)`` in [-1, 1]; :class:`LPIPS` folds them to frames and returns one distance
per frame ``(B, T)`` (differentiable, so it serves as a training loss too).
"""

from __future__ import annotations

import os
import re
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
TORCHVISION_MODELS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
_SLICE = re.compile(r"^(slice\d+|slices\.\d+)\.")  # torchmetrics' slice prefix before torchvision's features index


def lpips_backbone_path(net: LpipsNet = "alex") -> Path:
    """Where torchvision looks for the backbone of LPIPS ``net``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def check_lpips_weights(net: LpipsNet = "alex", backbone: str | os.PathLike | None = None) -> Path:
    """Return the backbone file of LPIPS ``net`` (``backbone``, default :func:`lpips_backbone_path`); raise
    FileNotFoundError naming it when it is missing."""
    path = Path(backbone) if backbone is not None else lpips_backbone_path(net)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS ({net}) needs the torchvision ImageNet backbone weights {LPIPS_BACKBONE_FILES[net]}, expected at "
            f"{path}. Fetch it with `vdiff weights download lpips-{net}` (torchvision's "
            f"https://download.pytorch.org/models/{LPIPS_BACKBONE_FILES[net]}), or set TORCH_HOME to a folder whose "
            f"hub/checkpoints/ holds it, or set the LPIPS weight to 0."
        )
    return path


def build_lpips(net: LpipsNet = "alex", backbone: str | os.PathLike | None = None) -> nn.Module:
    """torchmetrics' LPIPS network (frozen, always in eval mode): its own linear heads, the torchvision backbone
    read from the local file ``backbone`` (default :func:`lpips_backbone_path`) with ``weights_only=True``.

    The returned module maps two image batches ``(N, 3, H, W)`` in [-1, 1] to distances ``(N, 1, 1, 1)``.
    """
    import torchvision
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    path = check_lpips_weights(net, backbone)
    features = getattr(torchvision.models, TORCHVISION_MODELS[net])(weights=None)
    try:
        features.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not torchvision's {TORCHVISION_MODELS[net]} state dict ({err})") from None
    source = features.features.state_dict()
    lpips = _NoTrainLpips(net=net, pnet_rand=True)  # the linear heads from torchmetrics, a random backbone to fill
    state = {name: source[_SLICE.sub("", name)] for name in lpips.net.state_dict()}
    lpips.net.load_state_dict(state, strict=True)
    return lpips

class LPIPS(nn.Module):
    """Per-frame LPIPS distance of two videos: ``(B, T, 3, H, W)`` x2 in [-1, 1] -> ``(B, T)``.

    Also accepts image batches ``(N, 3, H, W)`` (-> ``(N,)``). Differentiable in its inputs; its own weights
    are frozen. ``chunk`` bounds how many frames go through the backbone at once; ``backbone`` is the torchvision
    weights file (default: :func:`lpips_backbone_path`).
    """

    def __init__(self, net: LpipsNet = "alex", chunk: int | None = None, backbone: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.net_type = net
        self.chunk = chunk
        self.net = build_lpips(net, backbone)

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
