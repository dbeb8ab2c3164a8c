"""Video-quality metrics built from local weight files, scored on generated frames, and their report.

What the :class:`~vdiff.callbacks.video_quality.VideoQuality` callback (during training) and ``vdiff evaluate``
(between two sets of clips) share:

* :func:`build_fvd`, :func:`build_fid`, :func:`build_lpips` - FVD (:mod:`vdiff.metrics.fvd`), FID
  (:mod:`vdiff.metrics.fid`) and LPIPS (:mod:`vdiff.metrics.lpips`) with their networks read by
  :mod:`vdiff.weights.i3d` / :mod:`vdiff.weights.registry`, the protocols recording which file (name, sha256);
* :func:`select_frames` (the frames that enter FVD/FID) and :func:`per_frame_scores` (PSNR, SSIM, LPIPS per
  clip over generated frames only);
* :func:`format_quality_report` - the result table under the protocols that produced it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vdiff.metrics.fid import FID, CleanFIDInception, FIDProtocol, torchmetrics_inception
from vdiff.metrics.frames import frame_psnr, frame_ssim, masked_frame_mean
from vdiff.metrics.fvd import FVD, FVDProtocol, fvd_feature_network
from vdiff.weights.i3d import find_feature_weights, load_fvd_network, load_torchscript
from vdiff.weights.safetensors_io import file_sha256

# ------------------------------------------------------------------------------------------------ building


def build_fvd(weights: str | os.PathLike | None, protocol: FVDProtocol | None = None, chunk: int = 4) -> FVD:
    """An :class:`FVD` metric with the I3D in local file ``weights`` (TorchScript or a state dict); the
    protocol's backend, resize method, file name and sha256 are set from the file."""
    backend, network = load_fvd_network(weights)
    protocol = protocol if protocol is not None else FVDProtocol()
    method = protocol.resize_method
    if backend == "i3d_torchscript":
        method = "torchscript"
    elif method == "torchscript":
        method = "trilinear"
    protocol = protocol.replace(
        backend=backend, resize_method=method, weights=Path(network.weights_path).name,
        weights_sha256=network.weights_sha256,
    )  # fmt: skip
    return FVD(fvd_feature_network(backend, network, protocol), protocol, chunk=chunk)


def build_fid(weights: str | os.PathLike | None, protocol: FIDProtocol | None = None, chunk: int = 32) -> FID:
    """An :class:`FID` metric with the Inception in local file ``weights`` for the protocol's backend."""
    protocol = protocol if protocol is not None else FIDProtocol()
    if protocol.backend == "clean-fid":
        base = load_torchscript(weights, "clean_fid")
        network, name, sha = CleanFIDInception(base), Path(base.weights_path).name, base.weights_sha256
    else:
        path = find_feature_weights("torchmetrics", weights)
        network, name, sha = torchmetrics_inception(path), path.name, file_sha256(path)
    return FID(network, protocol.replace(weights=name, weights_sha256=sha), chunk=chunk)


def build_lpips(net: str | None):
    """vdiff's LPIPS with its torchvision backbone (``$TORCH_HOME``'s, else downloaded into the weights cache on
    first use: :func:`vdiff.weights.registry.lpips_backbone`), or None; the error says how to switch it off."""
    if net is None:
        return None
    from vdiff.metrics.lpips import LPIPS
    from vdiff.weights.registry import lpips_backbone

    try:
        return LPIPS(net, backbone=lpips_backbone(net))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} VideoQuality: pass lpips: null to skip LPIPS.") from None


# ------------------------------------------------------------------------------------------------ frames


def select_frames(video: Tensor, given_frames: Tensor, which: str) -> Tensor:
    """The frames of ``video (B, T, ...)`` that enter FVD/FID: every frame (``all``) or the generated ones
    (``generated``: where ``given_frames (B, T)`` is false, in order), ``(B, T', ...)``."""
    if which == "all":
        return video
    if which != "generated":
        raise ValueError(f"frames must be 'generated' or 'all', got {which!r}")
    keep = ~given_frames.to(torch.bool)
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"clips of one batch generate different numbers of frames: {counts.tolist()}")
    return video[keep].unflatten(0, (video.shape[0], int(counts[0])))


def per_frame_scores(video: Tensor, target: Tensor, given_frames: Tensor, lpips=None) -> dict[str, Tensor]:
    """Per-clip ``(B,)`` PSNR, SSIM (and LPIPS) over the generated frames of ``video`` against ``target``."""
    generated = ~given_frames.to(torch.bool)
    scores = {
        "psnr": masked_frame_mean(frame_psnr(video, target), generated),
        "ssim": masked_frame_mean(frame_ssim(video, target), generated),
    }
    if lpips is not None:
        scores["lpips"] = masked_frame_mean(lpips(video.float(), target.float()), generated)
    return scores


# ------------------------------------------------------------------------------------------------ report


def format_quality_report(
    title: str,
    results: dict[str, Any],
    protocol_lines: list[str],
    fvd: FVDProtocol | None = None,
    fid: FIDProtocol | None = None,
    lpips_net: str | None = None,
) -> str:
    """A result table under the protocols that produced it (``results`` as :attr:`VideoQuality.results`)."""
    clips = int(results.get("clips", 0))
    lines = ["", f"{title} ({clips} clips)", "protocol:", *protocol_lines,
             "PSNR/SSIM" + ("/LPIPS" if lpips_net else "") + ": per frame on generated frames only, mean per clip, "
             "then over clips"]  # fmt: skip
    if fvd is not None:
        lines.append(fvd.describe())
    if fid is not None:
        lines.append(fid.describe())
    lines.append(f"{'metric':<16}{'value':>12}  scored on")
    if "psnr" in results:
        lines.append(f"{'PSNR (dB)':<16}{results['psnr']:>12.2f}  {clips} clips")
        lines.append(f"{'SSIM':<16}{results['ssim']:>12.4f}  {clips} clips")
    if "lpips" in results:
        lines.append(f"{f'LPIPS ({lpips_net})':<16}{results['lpips']:>12.4f}  {clips} clips")
    for name, protocol, unit in (("fvd", fvd, "clips"), ("fid", fid, "frames")):
        if protocol is None or name not in results:
            continue
        real, gen = int(results[f"{name}_real"]), int(results[f"{name}_generated"])
        note = ""
        if (protocol.num_real is not None and real != protocol.num_real) or (
            protocol.num_generated is not None and gen != protocol.num_generated
        ):
            note = (f" (the protocol's N is {protocol.num_real or 'all'} / {protocol.num_generated or 'all'}: "
                    f"not comparable with numbers at that N)")  # fmt: skip
        lines.append(f"{name.upper():<16}{results[name]:>12.2f}  {real} real / {gen} generated {unit}{note}")
    return "\n".join(lines + [""])
