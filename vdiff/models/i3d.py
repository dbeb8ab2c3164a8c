"""I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?"): the Inflated Inception-v1 behind FVD.

A plain ``nn.Module`` for Kinetics-400: video ``(B, 3, T, 224, 224)`` in [-1, 1] -> ``(B, 400)`` logits,
the per-time-step logits averaged over time (what FVD uses as features). It follows DeepMind's
kinetics-i3d graph as the PyTorch ports (piergiaj/pytorch-i3d, hassony2/kinetics_i3d_pytorch) rebuild
it: TensorFlow "SAME" padding computed from the input size at run time (pools pad with zeros, which
equals TF's padding because their inputs come out of a ReLU), batch norm with eps 1e-3, no dropout
(inference only), a final ``2 x 7 x 7`` average pool and a ``1 x 1 x 1`` logits convolution with bias.

Time shrinks 8x (strides 2 in ``conv1a``, ``pool4a`` and ``pool5a``, each rounding up), and the final
pool needs 2 time steps, so a clip needs at least :data:`MIN_FRAMES` = 9 frames; fewer are refused.

Weights come from files through :mod:`vdiff.weights.i3d` (strict conversion from the PyTorch ports'
layouts); this module knows no file format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_FRAMES = 9  # 8x temporal downsampling (rounding up) must leave the final 2-frame pool 2 steps
INPUT_SIZE = 224
NUM_CLASSES = 400
BN_EPS = 1e-3

# Inception modules: name -> (input channels, (b0, b1a, b1b, b2a, b2b, b3)) output channels per branch.
MIXED: dict[str, tuple[int, tuple[int, int, int, int, int, int]]] = {
    "mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
MIXED_BRANCHES = ("branch0", "branch1a", "branch1b", "branch2a", "branch2b", "branch3")


def same_padding(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """Zero-pad ``x (B, C, T, H, W)`` as TensorFlow's "SAME" does for this kernel and stride."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # W, H, T (F.pad order)
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d (no bias, "SAME") + BatchNorm3d + ReLU; the logits unit has a bias and neither norm nor ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, int, int] = 1, stride: int | tuple[int, int, int] = 1,
        logits: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=logits)
        self.bn = None if logits else nn.BatchNorm3d(cout, eps=BN_EPS, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(same_padding(x, self.kernel, self.stride))
        return x if self.bn is None else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    """Max pool with TF "SAME" padding (zeros: inputs are non-negative, after a ReLU)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(same_padding(x, self.kernel, self.stride), self.kernel, self.stride)


class Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated."""

    def __init__(self, cin: int, out: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.branch0 = Unit3D(cin, out[0])
        self.branch1a = Unit3D(cin, out[1])
        self.branch1b = Unit3D(out[1], out[2], kernel=3)
        self.branch2a = Unit3D(cin, out[3])
        self.branch2b = Unit3D(out[3], out[4], kernel=3)
        self.pool3 = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.branch3 = Unit3D(cin, out[5])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch0(x),
                self.branch1b(self.branch1a(x)),
                self.branch2b(self.branch2a(x)),
                self.branch3(self.pool3(x)),
            ],
            dim=1,
        )


class I3D(nn.Module):
    """Kinetics-400 I3D (RGB): ``(B, 3, T >= 9, 224, 224)`` in [-1, 1] -> ``(B, num_classes)`` logits.

    :meth:`time_logits` returns the logits per remaining time step ``(B, num_classes, T')``; ``forward``
    averages them over time. Build, load weights (:func:`vdiff.weights.i3d.load_i3d`) and call ``.eval()``:
    batch norm uses its running statistics only in eval mode.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.conv1a = Unit3D(in_channels, 64, kernel=7, stride=2)
        self.pool2a = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.conv2b = Unit3D(64, 64)
        self.conv2c = Unit3D(64, 192, kernel=3)
        self.pool3a = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.mixed_3b = Mixed(*MIXED["mixed_3b"])
        self.mixed_3c = Mixed(*MIXED["mixed_3c"])
        self.pool4a = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.mixed_4b = Mixed(*MIXED["mixed_4b"])
        self.mixed_4c = Mixed(*MIXED["mixed_4c"])
        self.mixed_4d = Mixed(*MIXED["mixed_4d"])
        self.mixed_4e = Mixed(*MIXED["mixed_4e"])
        self.mixed_4f = Mixed(*MIXED["mixed_4f"])
        self.pool5a = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.mixed_5b = Mixed(*MIXED["mixed_5b"])
        self.mixed_5c = Mixed(*MIXED["mixed_5c"])
        self.logits = Unit3D(1024, num_classes, logits=True)

    @staticmethod
    def check_input(x: Tensor, in_channels: int = 3) -> None:
        if x.ndim != 5 or x.shape[1] != in_channels:
            raise ValueError(f"I3D: expected video (B, {in_channels}, T, 224, 224), got {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if t < MIN_FRAMES:
            raise ValueError(
                f"I3D needs at least {MIN_FRAMES} frames per clip, got {t}: time shrinks 8x (rounding up) "
                f"before the final 2x7x7 average pool, which needs 2 time steps"
            )
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"I3D: frames must be {INPUT_SIZE}x{INPUT_SIZE} (resize first), got {h}x{w}")

    def time_logits(self, x: Tensor) -> Tensor:
        """Per-time-step logits ``(B, num_classes, T')`` with ``T' = ceil(T / 8) - 1``."""
        self.check_input(x, self.in_channels)
        x = self.pool2a(self.conv1a(x))  # (B, 64, T/2, 56, 56)
        x = self.pool3a(self.conv2c(self.conv2b(x)))  # (B, 192, T/2, 28, 28)
        x = self.pool4a(self.mixed_3c(self.mixed_3b(x)))  # (B, 480, T/4, 14, 14)
        for name in ("mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f"):
            x = getattr(self, name)(x)  # (B, 832, T/4, 14, 14) after 4f
        x = self.mixed_5c(self.mixed_5b(self.pool5a(x)))  # (B, 1024, T/8, 7, 7)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (B, 1024, T/8 - 1, 1, 1)
        return self.logits(x).flatten(3).squeeze(3)  # (B, num_classes, T')

    def forward(self, x: Tensor) -> Tensor:
        return self.time_logits(x).mean(dim=2)  # (B, num_classes)


def output_frames(num_frames: int) -> int:
    """Time steps left after I3D's temporal downsampling and final pool (``T'`` of :meth:`I3D.time_logits`)."""
    t = num_frames
    for _ in range(3):
        t = math.ceil(t / 2)
    return t - 1
