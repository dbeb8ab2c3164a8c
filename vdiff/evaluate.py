"""``vdiff evaluate REAL GENERATED``: video-quality metrics between two sets of clips, with their protocol.

Each set is a folder of ``.mp4`` files or a shard set (anything :func:`vdiff.data.shards.expand_shard_spec`
takes: a folder of shards, a manifest, a brace pattern, a glob, a tar). Clips are decoded with
:mod:`vdiff.data.video_io` and named by file stem or sample key.

* FVD (``--fvd-weights``) and FID (``--fid-weights``) compare the two sets as distributions: the first
  ``--num-real`` / ``--num-generated`` clips of each (sorted by name), on the frames the protocol selects.
  Real statistics are cached on disk, keyed by the protocol and the real set (paths, sizes, times).
* PSNR, SSIM and LPIPS (``--lpips``) compare clips that share a name, frame by frame, on generated
  frames only: ``--given-frames K`` marks the first K frames of each clip as given (conditioning), which
  these metrics leave out, and which FVD/FID leave out too with ``--frames generated``.

Each pass over the clips shows a progress bar on stderr. The table is printed under the protocols
(:func:`vdiff.lit.quality_metrics.format_quality_report`), the same report as the
:class:`~vdiff.callbacks.video_quality.VideoQuality` callback prints in training.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vdiff.data.shards import expand_shard_spec, split_member_name
from vdiff.data.video_io import decode_all
from vdiff.lit.evaluation import ScoreTotals
from vdiff.lit.quality_metrics import (
    build_fid,
    build_fvd,
    build_lpips,
    format_quality_report,
    per_frame_scores,
    select_frames,
)
from vdiff.metrics.fid import FIDProtocol
from vdiff.metrics.frechet import FrechetMetric, StatsCache, stats_key
from vdiff.metrics.fvd import FVD_PRESETS, FVDProtocol
from vdiff.weights.safetensors_io import gather_missing_files

VIDEO_SUFFIXES = (".mp4",)


class VideoSet:
    """Clips by name from a folder of mp4s or a shard set; :meth:`read` decodes one to uint8 ``(T, 3, H, W)``."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._files: dict[str, Path] = {}
        self._members: dict[str, tuple[str, int, int]] = {}  # key -> (tar, data offset, size)
        folder = Path(spec)
        mp4s = sorted(p for p in folder.iterdir() if p.suffix in VIDEO_SUFFIXES) if folder.is_dir() else []
        if mp4s and not any(folder.glob("*.tar")):
            self.kind = "mp4 folder"
            self._files = {p.stem: p for p in mp4s}
        else:
            self.kind = "shard set"
            self.shards = expand_shard_spec(spec)
            for tar_path in self.shards:
                with tarfile.open(tar_path, mode="r:") as tar:
                    for member in tar:
                        key, ext = split_member_name(member.name)
                        if member.isfile() and ext == "mp4":
                            self._members[key] = (tar_path, member.offset_data, member.size)
            if not self._members:
                raise FileNotFoundError(f"{spec}: no .mp4 files and no shard samples with an mp4")
        if not self.keys():
            raise FileNotFoundError(f"{spec}: no clips found")

    def keys(self) -> list[str]:
        return sorted(self._files or self._members)

    def read(self, key: str, num_frames: int | None = None) -> Tensor:
        if self._files:
            source: str | bytes = str(self._files[key])
        else:
            tar_path, offset, size = self._members[key]
            with open(tar_path, "rb") as f:
                f.seek(offset)
                source = f.read(size)
        frames = torch.from_numpy(decode_all(source)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        if num_frames is not None:
            if frames.shape[0] < num_frames:
                raise ValueError(
                    f"{self.spec}: clip {key!r} has {frames.shape[0]} frames, fewer than --num-frames {num_frames}"
                )
            frames = frames[:num_frames]
        return frames

    def identity(self) -> list[list]:
        """Paths, sizes and modification times of the set's files (the cache key's data part)."""
        paths = [self._files[k] for k in self.keys()] if self._files else [Path(p) for p in self.shards]
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "real", help="real clips: a folder of .mp4 files or a shard set (folder, manifest, pattern, tar)"
    )
    parser.add_argument(
        "generated", help="generated clips, the same forms; clips with the same name as a real one are paired"
    )
    parser.add_argument(
        "--fvd-weights",
        default=None,
        help="I3D file for FVD: StyleGAN-V's i3d_torchscript.pt (that bare name: downloaded into $VDIFF_CACHE/weights "
        "on first use) or vdiff I3D weights (also looked up under $VDIFF_WEIGHTS)",
    )
    parser.add_argument(
        "--fid-weights",
        default=None,
        help="Inception file for FID: clean-fid's inception-2015-12-05.pt (or torch-fidelity's with --fid-backend "
        "torchmetrics); those bare names are downloaded into $VDIFF_CACHE/weights on first use",
    )
    parser.add_argument("--fid-backend", choices=("clean-fid", "torchmetrics"), default="clean-fid")
    parser.add_argument(
        "--lpips",
        default="none",
        help="LPIPS backbone: alex, vgg, squeeze (torchvision's file: $TORCH_HOME/hub/checkpoints', else downloaded "
        "into $VDIFF_CACHE/weights on first use) or none",
    )
    parser.add_argument(
        "--given-frames",
        type=int,
        default=0,
        help="the first K frames of each clip were given (left out of PSNR/SSIM/LPIPS, and of FVD/FID with --frames generated)",
    )
    parser.add_argument(
        "--num-frames", type=int, default=None, help="use the first N frames of every clip (default: all)"
    )
    parser.add_argument("--frames", choices=("generated", "all"), default="generated", help="frames entering FVD/FID")
    parser.add_argument(
        "--fvd-protocol",
        choices=sorted(FVD_PRESETS),
        default="stylegan-v",
        help="FVD protocol preset (fields below override it)",
    )
    parser.add_argument(
        "--fvd-num-frames", default=None, help="frames per clip entering I3D (>= 9), or 'all' (default: the preset's)"
    )
    parser.add_argument("--num-real", type=int, default=None, help="FVD: real clips to use (default: the preset's N)")
    parser.add_argument(
        "--num-generated", type=int, default=None, help="FVD: generated clips to use (default: the preset's N)"
    )
    parser.add_argument(
        "--cov-divisor", choices=("N", "N-1"), default=None, help="FVD covariance divisor (default: the preset's)"
    )
    parser.add_argument("--fid-cov-divisor", choices=("N", "N-1"), default="N-1")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per feature-network call")
    parser.add_argument(
        "--stats-cache", default=None, help="folder for cached real statistics (default: $VDIFF_CACHE/frechet_stats)"
    )
    parser.add_argument("--no-stats-cache", action="store_true", help="neither read nor write cached real statistics")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def fvd_protocol_from(args: argparse.Namespace) -> FVDProtocol:
    changes: dict = {"frames": args.frames}
    if args.fvd_num_frames is not None:
        changes["num_frames"] = None if str(args.fvd_num_frames) == "all" else int(args.fvd_num_frames)
    for name in ("num_real", "num_generated", "cov_divisor"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return FVDProtocol.preset(args.fvd_protocol, **changes)


def _batches(videos: VideoSet, keys: list[str], num_frames: int | None, batch_size: int) -> Iterator[Tensor]:
    """uint8 ``(B, T, 3, H, W)`` batches of same-shaped clips, in order."""
    pending: list[Tensor] = []
    for key in keys:
        clip = videos.read(key, num_frames)
        if pending and (clip.shape != pending[0].shape or len(pending) >= batch_size):
            yield torch.stack(pending)
            pending = []
        pending.append(clip)
    if pending:
        yield torch.stack(pending)


def _given_mask(video: Tensor, given_frames: int) -> Tensor:
    given = torch.zeros(video.shape[:2], dtype=torch.bool, device=video.device)
    given[:, :given_frames] = True
    return given


def _feed(metrics: dict[str, FrechetMetric], videos: VideoSet, keys: dict[str, list[str]], args, real: bool) -> None:
    for name, metric in metrics.items():
        side = "real" if real else "generated"
        with tqdm(total=len(keys[name]), desc=f"{name.upper()} features of the {side} clips", unit="clip") as bar:
            for batch in _batches(videos, keys[name], args.num_frames, args.batch_size):
                bar.update(len(batch))
                batch = batch.to(args.device)
                metric.update(
                    select_frames(batch, _given_mask(batch, args.given_frames), metric.protocol.frames), real=real
                )


def _limit(keys: list[str], n: int | None) -> list[str]:
    return keys if n is None else keys[:n]


def run(args: argparse.Namespace) -> int:
    lpips_net = None if str(args.lpips).lower() in ("none", "null", "") else args.lpips
    fid_protocol = FIDProtocol(backend=args.fid_backend, frames=args.frames, cov_divisor=args.fid_cov_divisor)
    # every missing input (the two sets, the I3D, Inception and LPIPS files) is named at once, not the first only
    real_set, generated_set, fvd, fid, lpips = gather_missing_files([
        lambda: VideoSet(args.real),
        lambda: VideoSet(args.generated),
        lambda: build_fvd(args.fvd_weights, fvd_protocol_from(args), chunk=args.batch_size) if args.fvd_weights else None,
        lambda: build_fid(args.fid_weights, fid_protocol) if args.fid_weights else None,
        lambda: build_lpips(lpips_net),
    ])  # fmt: skip
    metrics: dict[str, FrechetMetric] = {name: m for name, m in (("fvd", fvd), ("fid", fid)) if m is not None}
    for metric in metrics.values():
        metric.to(args.device)
    if lpips is not None:
        lpips.to(args.device)

    # Distributions: FVD caps clip counts at the protocol's N; FID uses every frame of the clips read.
    real_keys = {name: _limit(real_set.keys(), getattr(m.protocol, "num_real", None) if name == "fvd" else None)
                 for name, m in metrics.items()}  # fmt: skip
    generated_keys = {name: _limit(generated_set.keys(), m.protocol.num_generated if name == "fvd" else None)
                      for name, m in metrics.items()}  # fmt: skip
    cache = None if args.no_stats_cache else StatsCache(args.stats_cache)
    selection = {"given_frames": args.given_frames, "num_frames": args.num_frames}
    sources: dict[str, str] = {}
    for name, metric in metrics.items():
        key = None
        if cache is not None:
            data_id = json.dumps({"real": real_set.identity(), "clips": real_keys[name], **selection}, sort_keys=True)
            key = stats_key(metric.protocol.real_stats_fields(), data_id)
            metric.real_stats = cache.load(name, key)
        if metric.real_stats is not None:
            sources[name] = f"read from {cache.path(name, key)}"
            continue
        _feed({name: metric}, real_set, real_keys, args, real=True)
        metric.real_stats = metric.stats(real=True)
        sources[name] = "computed"
        if cache is not None and metric.real_stats.count >= 2:
            path = cache.save(
                name, key, metric.real_stats, {"protocol": metric.protocol.to_dict(), "real": args.real, **selection}
            )
            sources[name] = f"computed, saved to {path}"
    _feed(metrics, generated_set, generated_keys, args, real=False)

    # Pairs: per-frame metrics on generated frames of clips present in both sets.
    paired = sorted(set(real_set.keys()) & set(generated_set.keys()))
    totals = ScoreTotals()
    for key in tqdm(paired, desc="PSNR/SSIM" + ("/LPIPS" if lpips is not None else "") + " of clip pairs", unit="clip"):
        real = real_set.read(key, args.num_frames)[None].to(args.device)  # (1, T, 3, H, W) uint8
        fake = generated_set.read(key, args.num_frames)[None].to(args.device)
        if real.shape != fake.shape:
            raise ValueError(f"clip {key!r}: real {tuple(real.shape[1:])} and generated {tuple(fake.shape[1:])} differ")
        to_float = lambda v: v.float() / 127.5 - 1.0  # noqa: E731
        totals.add(per_frame_scores(to_float(fake), to_float(real), _given_mask(real, args.given_frames), lpips))

    results: dict = totals.means() if paired else {"clips": 0}
    for name, metric in metrics.items():
        real, generated = metric.real_stats, metric.stats(real=False)
        results[f"{name}_real"], results[f"{name}_generated"] = real.count, generated.count
        if real.count >= 2 and generated.count >= 2:
            results[name] = real.distance(generated, metric.protocol.cov_divisor)
        else:
            results[name] = float("nan")
    lines = [
        f"real: {args.real} ({real_set.kind}, {len(real_set.keys())} clips); generated: {args.generated} "
        f"({generated_set.kind}, {len(generated_set.keys())} clips); paired by name: {len(paired)}",
        f"frames per clip: {'all' if args.num_frames is None else f'the first {args.num_frames}'}; given frames: "
        f"the first {args.given_frames} of each clip",
        *[f"{name.upper()} real statistics: {source}" for name, source in sources.items()],
    ]
    protocols = {name: metric.protocol for name, metric in metrics.items()}
    print(format_quality_report("vdiff evaluate", results, lines, protocols.get("fvd"), protocols.get("fid"),
                                lpips_net if lpips is not None else None))  # fmt: skip
    if not paired and not metrics:
        print("nothing to score: no clip names in common (PSNR/SSIM/LPIPS) and no --fvd-weights / --fid-weights")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdiff evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
