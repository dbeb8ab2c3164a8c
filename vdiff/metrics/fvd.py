"""Fréchet Video Distance (Unterthiner et al. 2018) under a pinned, printed protocol.

Features are Kinetics-400 I3D logits (400 per clip, averaged over time). Two feature networks:

* ``i3d_torchscript`` (main path): StyleGAN-V's ``i3d_torchscript.pt``, called exactly as StyleGAN-V's
  ``compute_fvd`` calls it: uint8 clips ``(B, 3, T, H, W)`` with ``rescale=True, resize=True,
  return_features=True`` (the network maps [0, 255] to [-1, 1] and resizes to 224x224 itself, and
  returns the raw features before the softmax);
* ``vdiff_i3d``: vdiff's :class:`~vdiff.models.i3d.I3D` behind :class:`I3DFeatures`, which does the same
  preprocessing in the open: uint8 -> float, trilinear resize to ``(T, 224, 224)`` (align_corners=False),
  ``x / 127.5 - 1``.

Both take clips quantised to uint8 as StyleGAN-V does (:func:`~vdiff.metrics.frechet.to_uint8`), so real
clips decoded from video and generated clips in [-1, 1] go through the same steps.

:class:`FVDProtocol` pins everything a number depends on: the network and its file's sha256, frames per
clip and which frames, resize and method, quantisation, N real / N generated, the covariance divisor and
the sampling seed. It is logged, stored in checkpoints and printed with every result
(:meth:`FVDProtocol.describe`). FVD is strongly biased at small N (roughly 1/N): numbers are comparable
only at the same N, which the printed result states.

The weights are read by :mod:`vdiff.weights.i3d` (this layer reads no weight file); :class:`FVD` takes the
loaded network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.metrics.frechet import COV_DIVISORS, CovDivisor, FrechetMetric, to_uint8
from vdiff.models.i3d import I3D, INPUT_SIZE, MIN_FRAMES, NUM_CLASSES

FVDBackend = Literal["i3d_torchscript", "vdiff_i3d"]
FVD_BACKENDS: tuple[str, ...] = ("i3d_torchscript", "vdiff_i3d")
RESIZE_METHODS = {"i3d_torchscript": ("torchscript",), "vdiff_i3d": ("trilinear", "bicubic")}
FRAME_CHOICES = ("generated", "all")
STYLEGAN_V_KWARGS = {"rescale": True, "resize": True, "return_features": True}


@dataclass
class FVDProtocol:
    """How an FVD number is obtained; printed with it, stored in checkpoints.

    backend:         ``i3d_torchscript`` (StyleGAN-V's file) or ``vdiff_i3d`` (vdiff's I3D, converted weights).
    num_frames:      frames per clip entering I3D (the first ones of the selected frames); None = all of
                     them. At least 9 (I3D's minimum). StyleGAN-V: 16.
    frames:          which frames of a clip are selected: ``generated`` (predicted only) or ``all`` (given
                     frames included); set from the module's ``EvalProtocol.fvd_frames``.
    resize:          spatial size I3D sees (224).
    resize_method:   ``torchscript`` (inside the TorchScript network, ``resize=True``) for
                     ``i3d_torchscript``; ``trilinear`` or ``bicubic`` (per frame, align_corners=False) for
                     ``vdiff_i3d``.
    quantize:        ``uint8``: ``floor(127.5 x + 128)`` clamped to [0, 255], as StyleGAN-V quantises samples.
    num_real, num_generated: N of the protocol (StyleGAN-V's fvd2048_16f: 2048 / 2048). The counts
                     actually scored are printed beside them; a different count is not comparable.
    cov_divisor:     ``N`` (StyleGAN-V) or ``N-1`` (TATS / VideoGPT, ``np.cov``).
    seed:            seed of the generated samples (the module's ``EvalProtocol.seed``).
    weights:         file name of the I3D weights; ``weights_sha256`` its sha256.
    """

    backend: FVDBackend = "i3d_torchscript"
    num_frames: int | None = 16
    frames: Literal["generated", "all"] = "generated"
    resize: int = INPUT_SIZE
    resize_method: str = "torchscript"
    quantize: Literal["uint8"] = "uint8"
    num_real: int | None = 2048
    num_generated: int | None = 2048
    cov_divisor: CovDivisor = "N"
    seed: int = 0
    weights: str | None = None
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in FVD_BACKENDS:
            raise ValueError(f"FVDProtocol: backend must be one of {FVD_BACKENDS}, got {self.backend!r}")
        if self.resize_method not in RESIZE_METHODS[self.backend]:
            raise ValueError(
                f"FVDProtocol: resize_method for {self.backend} must be one of {RESIZE_METHODS[self.backend]}, "
                f"got {self.resize_method!r}"
            )
        if self.num_frames is not None and self.num_frames < MIN_FRAMES:
            raise ValueError(
                f"FVDProtocol: I3D needs at least {MIN_FRAMES} frames per clip, got num_frames={self.num_frames}"
            )
        if self.frames not in FRAME_CHOICES:
            raise ValueError(f"FVDProtocol: frames must be one of {FRAME_CHOICES}, got {self.frames!r}")
        if self.resize != INPUT_SIZE:
            raise ValueError(
                f"FVDProtocol: Kinetics I3D sees {INPUT_SIZE}x{INPUT_SIZE} frames, got resize={self.resize}"
            )
        if self.quantize != "uint8":
            raise ValueError(f"FVDProtocol: quantize must be 'uint8', got {self.quantize!r}")
        if self.cov_divisor not in COV_DIVISORS:
            raise ValueError(f"FVDProtocol: cov_divisor must be one of {COV_DIVISORS}, got {self.cov_divisor!r}")
        for name in ("num_real", "num_generated"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"FVDProtocol: {name} must be >= 2 or null, got {value}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FVDProtocol:
        """A named protocol (:data:`FVD_PRESETS`) with fields replaced."""
        if name not in FVD_PRESETS:
            raise ValueError(f"unknown FVD protocol {name!r}; known: {sorted(FVD_PRESETS)}")
        return replace(FVD_PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> FVDProtocol:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FVDProtocol:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FVDProtocol: unknown fields {unknown}")
        return cls(**d)

    def real_stats_fields(self) -> dict[str, Any]:
        """The fields real-data statistics depend on (the cache key): not ``num_generated``, ``seed`` or
        ``cov_divisor`` (statistics are raw sums; the divisor applies at the end)."""
        d = self.to_dict()
        for name in ("num_generated", "seed", "cov_divisor"):
            d.pop(name)
        return d

    def describe(self) -> str:
        frames = "all selected frames" if self.num_frames is None else f"the first {self.num_frames}"
        which = "generated frames only" if self.frames == "generated" else "all frames (given included)"
        if self.backend == "i3d_torchscript":
            net = "StyleGAN-V's I3D TorchScript (Kinetics-400), called with rescale=True, resize=True, return_features=True"
            resize = f"{self.resize}x{self.resize} inside the TorchScript"
        else:
            net = "vdiff I3D (Kinetics-400 logits averaged over time)"
            resize = f"{self.resize}x{self.resize} {self.resize_method}, align_corners=False; x/127.5-1"
        n = lambda v: "all" if v is None else str(v)  # noqa: E731
        sha = self.weights_sha256[:16] if self.weights_sha256 else "unknown"
        return (
            f"FVD: {net}; weights {self.weights or '?'} (sha256 {sha}...); clips: {frames} of the {which}; "
            f"resize {resize}; uint8 floor(127.5x+128); N real {n(self.num_real)} / generated "
            f"{n(self.num_generated)}; covariance / {self.cov_divisor}; seed {self.seed}"
        )


FVD_PRESETS: dict[str, FVDProtocol] = {
    # StyleGAN-V's fvd2048_16f: 2048 real and 2048 generated 16-frame clips, covariance / N.
    "stylegan-v": FVDProtocol(),
    # TATS / VideoGPT: 2048 samples, covariance / (N - 1).
    "tats": FVDProtocol(cov_divisor="N-1"),
}


# ------------------------------------------------------------------------------------------------ networks


class I3DTorchscriptFeatures(nn.Module):
    """StyleGAN-V's TorchScript I3D as a feature network: uint8 ``(B, 3, T, H, W)`` -> ``(B, 400)``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval()

    def forward(self, clips: Tensor) -> Tensor:
        return self.network(clips, **STYLEGAN_V_KWARGS)


class I3DFeatures(nn.Module):
    """vdiff's I3D as a feature network: uint8 ``(B, 3, T, H, W)`` -> resize to 224 -> [-1, 1] -> ``(B, 400)``."""

    def __init__(self, network: I3D, resize_method: str = "trilinear") -> None:
        super().__init__()
        if resize_method not in RESIZE_METHODS["vdiff_i3d"]:
            raise ValueError(
                f"I3DFeatures: resize_method must be one of {RESIZE_METHODS['vdiff_i3d']}, got {resize_method!r}"
            )
        self.network = network.eval()
        self.resize_method = resize_method

    def preprocess(self, clips: Tensor) -> Tensor:
        x = clips.float()  # (B, 3, T, H, W) in [0, 255]
        b, c, t, h, w = x.shape
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            if self.resize_method == "trilinear":
                x = F.interpolate(x, size=(t, INPUT_SIZE, INPUT_SIZE), mode="trilinear", align_corners=False)
            else:
                frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*T, 3, H, W)
                frames = F.interpolate(frames, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False)
                x = frames.clamp(0, 255).unflatten(0, (b, t)).permute(0, 2, 1, 3, 4)
        return x / 127.5 - 1.0

    def forward(self, clips: Tensor) -> Tensor:
        return self.network(self.preprocess(clips))


def fvd_feature_network(backend: str, network: nn.Module, protocol: FVDProtocol | None = None) -> nn.Module:
    """Wrap a loaded I3D (TorchScript or vdiff's) as the feature network of ``backend``."""
    if backend == "i3d_torchscript":
        return I3DTorchscriptFeatures(network)
    if backend == "vdiff_i3d":
        return I3DFeatures(network, protocol.resize_method if protocol is not None else "trilinear")
    raise ValueError(f"unknown FVD backend {backend!r}; known: {FVD_BACKENDS}")


# ------------------------------------------------------------------------------------------------ metric


def clips_for_i3d(video: Tensor, num_frames: int | None) -> Tensor:
    """Video ``(B, T, 3, H, W)`` (float in [-1, 1] or uint8) -> uint8 ``(B, 3, T', H, W)``: the first
    ``num_frames`` frames (None = all), at least :data:`MIN_FRAMES`."""
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"FVD: expected video (B, T, 3, H, W), got {tuple(video.shape)}")
    t = video.shape[1]
    need = MIN_FRAMES if num_frames is None else num_frames
    if t < need:
        raise ValueError(
            f"FVD: clips have {t} frames but the protocol needs {need} "
            f"(num_frames={num_frames}; I3D needs at least {MIN_FRAMES})"
        )
    if num_frames is not None:
        video = video[:, :num_frames]
    return to_uint8(video).permute(0, 2, 1, 3, 4).contiguous()


class FVD(FrechetMetric):
    """FVD as a torchmetrics ``Metric``: ``update(video (B, T, 3, H, W), real=...)``, ``compute()``.

    ``network`` maps uint8 clips ``(B, 3, T, H, W)`` to ``(B, num_features)`` (:class:`I3DTorchscriptFeatures`
    or :class:`I3DFeatures`); ``protocol`` is the :class:`FVDProtocol` the result is printed with.
    ``chunk`` bounds the clips per network call. States are float64 sums merged by ``sum`` across ranks.
    """

    def __init__(
        self, network: nn.Module, protocol: FVDProtocol | None = None, num_features: int = NUM_CLASSES,
        chunk: int = 8, **kwargs: Any,
    ) -> None:  # fmt: skip
        protocol = protocol if protocol is not None else FVDProtocol()
        super().__init__(num_features, protocol.cov_divisor, **kwargs)
        self.protocol = protocol
        self.network = network.eval().requires_grad_(False)
        self.chunk = max(1, int(chunk))

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        """I3D features ``(B, num_features)`` (float64) of video ``(B, T, 3, H, W)`` under the protocol."""
        clips = clips_for_i3d(video, self.protocol.num_frames).to(self.device)
        return torch.cat([self.network(part).double() for part in clips.split(self.chunk)])

    def update(self, video: Tensor, real: bool) -> None:
        self.update_features(self.features(video), real)

    def counts(self) -> dict[str, int]:
        """Clips added on this rank: ``{"real", "generated"}``."""
        return {"real": int(self.real_count), "generated": int(self.fake_count)}
