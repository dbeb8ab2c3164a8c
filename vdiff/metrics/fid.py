"""Fréchet Inception Distance on video frames, through clean-fid, under a pinned, printed protocol.

Each selected frame is an image. Two feature networks, both 2048-d Inception pool features:

* ``clean-fid`` (default): clean-fid's "clean" mode (Parmar et al. 2022) exactly: each uint8 frame is
  resized to 299x299 by clean-fid's own resizer (``cleanfid.resize.build_resizer("clean")``: PIL bicubic
  on float32 channels, clipped to [0, 255], no quantisation after) and goes through clean-fid's
  ``InceptionV3W`` forward (``(x - 128) / 128`` into the TorchScript ``inception-2015-12-05.pt``'s layers).
  clean-fid's own constructor downloads the file when it is not in its folder; :class:`CleanFIDInception`
  never does: it takes the network already loaded from a local file (by :mod:`vdiff.weights.i3d`).
* ``torchmetrics``: torchmetrics' ``NoTrainInceptionV3`` ("inception-v3-compat", torch-fidelity's port,
  its own TF1-compatible bilinear resize), built with ``feature_extractor_weights_path`` pointing at a
  local ``weights-inception-2015-12-05-6726825d.pth`` (needs the ``torch-fidelity`` package).

Torchmetrics compatibility: :class:`CleanFIDInception` has ``num_features`` and takes uint8 ``(N, 3, H, W)``,
so it can be passed as ``torchmetrics.image.fid.FrechetInceptionDistance(feature=...)`` too; and
:func:`torchmetrics_fid` builds torchmetrics' own metric from a local weights file.

:class:`FID` keeps float64 sums like :class:`~vdiff.metrics.fvd.FVD`; :class:`FIDProtocol` is printed
with every result. Frames come as video ``(B, T, 3, H, W)`` (float in [-1, 1] or uint8), quantised to
uint8 as StyleGAN-V does.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from vdiff.metrics.frechet import COV_DIVISORS, CovDivisor, FrechetMetric, to_uint8

INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
FIDBackend = Literal["clean-fid", "torchmetrics"]
FID_BACKENDS: tuple[str, ...] = ("clean-fid", "torchmetrics")
RESIZE_DESCRIPTIONS = {
    "clean-fid": "clean-fid 'clean': PIL bicubic on float32 channels to 299x299, clipped, not re-quantised",
    "torchmetrics": "torch-fidelity's TF1-compatible bilinear resize to 299x299 inside the network",
}


@dataclass
class FIDProtocol:
    """How an FID number is obtained; printed with it, stored in checkpoints.

    backend:        ``clean-fid`` (clean-fid's resizer + TorchScript Inception) or ``torchmetrics``.
    frames:         which frames of each clip are images: ``generated`` or ``all`` (from ``EvalProtocol.fvd_frames``).
    quantize:       ``uint8`` (``floor(127.5 x + 128)`` clamped, as for FVD).
    num_real, num_generated: N (frames) of the protocol; None = whatever is scored (printed beside it).
    cov_divisor:    ``N-1`` (``np.cov``: clean-fid and torchmetrics) or ``N``.
    seed:           seed of the generated samples.
    weights, weights_sha256: the Inception file name and sha256.
    """

    backend: FIDBackend = "clean-fid"
    frames: Literal["generated", "all"] = "generated"
    quantize: Literal["uint8"] = "uint8"
    num_real: int | None = None
    num_generated: int | None = None
    cov_divisor: CovDivisor = "N-1"
    seed: int = 0
    weights: str | None = None
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in FID_BACKENDS:
            raise ValueError(f"FIDProtocol: backend must be one of {FID_BACKENDS}, got {self.backend!r}")
        if self.frames not in ("generated", "all"):
            raise ValueError(f"FIDProtocol: frames must be 'generated' or 'all', got {self.frames!r}")
        if self.quantize != "uint8":
            raise ValueError(f"FIDProtocol: quantize must be 'uint8', got {self.quantize!r}")
        if self.cov_divisor not in COV_DIVISORS:
            raise ValueError(f"FIDProtocol: cov_divisor must be one of {COV_DIVISORS}, got {self.cov_divisor!r}")

    def replace(self, **changes: Any) -> FIDProtocol:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FIDProtocol:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"FIDProtocol: unknown fields {unknown}")
        return cls(**d)

    def real_stats_fields(self) -> dict[str, Any]:
        d = self.to_dict()
        for name in ("num_generated", "seed", "cov_divisor"):
            d.pop(name)
        return d

    def describe(self) -> str:
        which = "generated frames only" if self.frames == "generated" else "all frames (given included)"
        n = lambda v: "all" if v is None else str(v)  # noqa: E731
        sha = self.weights_sha256[:16] if self.weights_sha256 else "unknown"
        return (
            f"FID ({self.backend}): Inception pool3 (2048) of every frame of the {which}; weights "
            f"{self.weights or '?'} (sha256 {sha}...); resize {RESIZE_DESCRIPTIONS[self.backend]}; uint8 "
            f"floor(127.5x+128); N real {n(self.num_real)} / generated {n(self.num_generated)} frames; "
            f"covariance / {self.cov_divisor}; seed {self.seed}"
        )


# ------------------------------------------------------------------------------------------------ networks


def _clean_fid_classes():
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    return InceptionV3W, build_resizer


class CleanFIDInception(nn.Module):
    """clean-fid's feature extractor around an Inception TorchScript loaded from a local file.

    uint8 images ``(N, 3, H, W)`` -> clean resize -> clean-fid's ``InceptionV3W.forward`` -> ``(N, 2048)``.
    ``base`` is the loaded ``inception-2015-12-05.pt`` (see :func:`vdiff.weights.i3d.load_torchscript`).
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        inception_cls, build_resizer = _clean_fid_classes()
        # clean-fid's InceptionV3W loads (and downloads when absent) the file from a fixed folder in its
        # constructor; build the instance without that constructor and give it the local network.
        # forward() is clean-fid's own: (x - 128) / 128 into base.layers, then view (N, 2048).
        inception = inception_cls.__new__(inception_cls)
        nn.Module.__init__(inception)
        inception.base = base.eval()
        inception.layers = inception.base.layers
        inception.resize_inside = False
        self.inception = inception
        self.resizer = build_resizer("clean")

    def resize(self, images: Tensor) -> Tensor:
        """uint8 ``(N, 3, H, W)`` -> float32 ``(N, 3, 299, 299)`` in [0, 255], clean-fid's way (CPU, per image)."""
        array = images.detach().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
        out = np.stack([self.resizer(image) for image in array])  # (N, 299, 299, 3) float32
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CleanFIDInception: expected images (N, 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise TypeError(f"CleanFIDInception: expected uint8 images in [0, 255], got {images.dtype}")
        device = next(iter(self.inception.base.parameters()), images).device
        return self.inception(self.resize(images).to(device))


def torchmetrics_inception(weights_path: str | os.PathLike) -> nn.Module:
    """torchmetrics' Inception ("inception-v3-compat", 2048 features) from a LOCAL torch-fidelity weights file.

    Takes uint8 ``(N, 3, H, W)`` and resizes inside. Needs the ``torch-fidelity`` package."""
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"torchmetrics Inception weights not found: {weights_path}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:  # pragma: no cover - torchmetrics is a dependency
        raise ModuleNotFoundError("FID backend 'torchmetrics' needs torchmetrics[image]") from err
    try:
        network = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=str(weights_path),
        )  # fmt: skip
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "FID backend 'torchmetrics' needs the torch-fidelity package (pip install torch-fidelity); "
            "the default backend 'clean-fid' does not"
        ) from err
    network.num_features = INCEPTION_FEATURES
    return network


def torchmetrics_fid(weights_path: str | os.PathLike, **kwargs: Any):
    """torchmetrics' own ``FrechetInceptionDistance`` (2048 features) from a LOCAL torch-fidelity weights file."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=torchmetrics_inception(weights_path), **kwargs)


# ------------------------------------------------------------------------------------------------ metric


def frames_of(video: Tensor) -> Tensor:
    """Video ``(B, T, 3, H, W)`` (float in [-1, 1] or uint8) or images ``(N, 3, H, W)`` -> uint8 ``(N, 3, H, W)``."""
    if video.ndim == 5:
        video = video.flatten(0, 1)
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"FID: expected video (B, T, 3, H, W) or images (N, 3, H, W), got {tuple(video.shape)}")
    return to_uint8(video)


class FID(FrechetMetric):
    """FID over frames as a torchmetrics ``Metric``: ``update(video or images, real=...)``, ``compute()``.

    ``network`` maps uint8 images ``(N, 3, H, W)`` to ``(N, 2048)`` (:class:`CleanFIDInception` or
    :func:`torchmetrics_inception`). ``chunk`` bounds the images per network call.
    """

    def __init__(
        self, network: nn.Module, protocol: FIDProtocol | None = None, num_features: int = INCEPTION_FEATURES,
        chunk: int = 32, **kwargs: Any,
    ) -> None:  # fmt: skip
        protocol = protocol if protocol is not None else FIDProtocol()
        super().__init__(num_features, protocol.cov_divisor, **kwargs)
        self.protocol = protocol
        self.network = network.eval().requires_grad_(False)
        self.chunk = max(1, int(chunk))

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        images = frames_of(video)
        return torch.cat([self.network(part).double() for part in images.split(self.chunk)])

    def update(self, video: Tensor, real: bool) -> None:
        self.update_features(self.features(video), real)

    def counts(self) -> dict[str, int]:
        return {"real": int(self.real_count), "generated": int(self.fake_count)}
