"""``vdiff encode``: video shards -> latent shards, so diffusion training runs with no autoencoder in the loop.

Every video (or every ``--clip-frames`` window of it) becomes one latent sample (:mod:`vdiff.data.schema`):
the posterior mean and std in *unscaled* latent space (fp16), the clean first frame of the clip as PNG, and the
video's json with ``sample_type: "latent"``, the clip's actions, and autoencoder details in
``extra["latent"]`` (config, weights, scale/shift factors, downsampling, source key and frames).

With ``--image-encoder PATH`` (a CLIP image embedder read from a LOCAL file or folder by
:mod:`vdiff.weights.clip`) every sample also stores the embedding of exactly its stored first frame,
``<key>.image_embed.safetensors`` (tensor ``embed``, fp16 ``(D,)``), and the encoder (class, file path, sha256,
layout, config, width) is recorded in every sample's ``extra["image_embed"]`` and in the manifest, so
:class:`~vdiff.data.latent_datamodule.LatentDataModule` can refuse the set for a model with another encoder.

Resumable: each input shard is encoded into its own output shard(s) ``OUT/<input stem>-NNNNNN.tar``, written in
a hidden partial folder and moved in when complete; ``OUT/manifest.json`` lists the finished input shards under
``extra["encode"]["done"]``, and a rerun skips them. A rerun with a different autoencoder or clip settings is
refused (one latent set, one autoencoder, one image encoder or none). Throughput (clips/s, frames/s) is printed per shard and in total.

    vdiff encode --input data/train --out latents/train --ckpt runs/vae/last.ckpt --size 256
    vdiff encode --input data/train --out latents/train --weights stable-video-diffusion-img2vid/vae --clip-frames 14 \
        --image-encoder stable-video-diffusion-img2vid/image_encoder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vdiff.data.frame_size import add_size_argument
from vdiff.data.schema import (
    IMAGE_EMBED_INFO_KEY,
    MANIFEST_NAME,
    META_EXT,
    VIDEO_EXT,
    Manifest,
    SampleType,
    SchemaError,
    ShardInfo,
    VideoMeta,
    image_encoder_identity,
)
from vdiff.data.shards import ShardWriter, check_key, expand_shard_spec, iter_raw_samples
from vdiff.data.transforms import cover_size, crop_frames, move_goal, normalize_video, plan_crop
from vdiff.data.video_io import VideoDecodeError, decode_frames
from vdiff.weights.safetensors_io import gather_missing_files

PARTIAL_PREFIX = ".partial-"


def autoencoder_info(autoencoder: nn.Module, weights: str | None) -> dict[str, Any]:
    """What a latent set records about its autoencoder (``extra["latent"]`` of samples and manifest)."""
    config = getattr(autoencoder, "config", None)
    info = {
        "autoencoder": f"{type(autoencoder).__module__}.{type(autoencoder).__qualname__}",
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "weights": weights,
        "scale_factor": float(autoencoder.scale_factor),
        "shift_factor": float(autoencoder.shift_factor),
        "latent_channels": int(autoencoder.latent_channels),
        "spatial_downsample": int(autoencoder.spatial_downsample),
        "temporal_downsample": int(autoencoder.temporal_downsample),
    }
    return json.loads(json.dumps(info))  # as read back from json (tuples -> lists), so resumes compare equal


def image_encoder_info(
    encoder: nn.Module,
    weights_path: str | os.PathLike | None = None,
    sha256: str | None = None,
    layout: str | None = None,
    config_source: str | None = None,
) -> dict[str, Any]:
    """What a latent set records about the image encoder of its embeddings (``extra["image_embed"]`` of samples
    and manifest; keys :data:`vdiff.data.schema.IMAGE_EMBED_INFO_KEYS`). ``encoder`` has a ``config`` with
    ``to_dict()`` and ``embed_dim`` (:class:`~vdiff.models.conditioners.CLIPImageEmbedder`); the file fields are
    None for an encoder not read from a file."""
    config = encoder.config
    info = {
        "encoder": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "path": None if weights_path is None else os.fspath(weights_path),
        "sha256": sha256,
        "layout": layout,
        "config": config.to_dict(),
        "config_source": config_source,
        "embed_dim": int(config.embed_dim),
        "frame": "first_frame",
    }
    return json.loads(json.dumps(info))


def load_image_encoder(
    path: str | os.PathLike, layout: str = "auto", config: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A frozen CLIP image embedder from a LOCAL file or folder and its :func:`image_encoder_info`.

    Built as :func:`vdiff.weights.clip.load_clip_image_embedder` builds it (meta device, tensors assigned, fp32),
    from the same reader, so the recorded file and sha256 are those ``PretrainedCLIPImageEmbedder`` reports for
    the same path (what ``SVDModule`` compares at training time). Missing files raise FileNotFoundError naming
    the path (and ``$VDIFF_WEIGHTS``).
    """
    from vdiff.models.conditioners import CLIPImageEmbedder
    from vdiff.weights.clip import read_clip_image_embedder
    from vdiff.weights.safetensors_io import file_sha256

    weights = read_clip_image_embedder(path, layout=layout, config=config)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = CLIPImageEmbedder(weights.config)
    model.load_state_dict({k: v.float() for k, v in weights.state_dict.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    info = image_encoder_info(
        model, weights.weights_path, file_sha256(weights.weights_path), weights.layout, weights.config_source
    )
    return model, info


@dataclass
class EncodeStats:
    """Counts and timing of one ``encode_shards`` call (skipped shards excluded)."""

    shards_done: int = 0
    shards_skipped: int = 0
    videos: int = 0
    clips: int = 0
    frames: int = 0
    bad_samples: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    bad: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        rate = lambda n, s: n / s if s > 0 else float("nan")  # noqa: E731
        return (
            f"{self.clips} clips ({self.frames} frames) from {self.videos} videos in {self.seconds:.2f} s: "
            f"{rate(self.clips, self.seconds):.2f} clips/s, {rate(self.frames, self.seconds):.1f} frames/s "
            f"(autoencoder alone {rate(self.frames, self.encode_seconds):.1f} frames/s); "
            f"{self.bad_samples} bad samples skipped"
        )


@dataclass
class _Clip:
    key: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    meta: VideoMeta


def _slice_actions(actions: dict[str, list], start: int, stop: int, plan) -> dict[str, list]:
    """Per-frame actions of frames ``[start, stop)``; goal points moved into the crop (``None`` outside)."""
    out = {name: list(values[start:stop]) for name, values in actions.items()}
    if "goal" in out and plan is not None:
        entries = out["goal"]
        goal = np.zeros((len(entries), 2), dtype=np.float64)
        valid = np.zeros(len(entries), dtype=bool)
        for i, entry in enumerate(entries):
            if entry is not None and np.all(np.isfinite(np.asarray(entry, dtype=np.float64))):
                goal[i], valid[i] = entry, True
        moved, inside = move_goal(goal, valid, plan)
        out["goal"] = [[float(v) for v in moved[i]] if inside[i] else None for i in range(len(entries))]
    return out


class ShardEncoder:
    """Cuts clips out of video samples, encodes them in batches and writes latent samples.

    Args:
        autoencoder: keeps the autoencoder contract (docs/architecture.md, "Contracts") (``encode(video) -> posterior`` with mean and std).
        info: :func:`autoencoder_info` of it (stored in every sample's json).
        clip_frames: frames per clip; None = the whole video as one sample.
        clip_stride: frames between clip starts (default ``clip_frames``: non-overlapping); the tail shorter
            than a clip is dropped.
        size: output ``(H, W)``: frames are scaled to cover it and center-cropped; None = native size.
        batch_size: clips per autoencoder call (only clips of the same shape share a call).
        device: where the autoencoder (and the image encoder) runs.
        autocast: ``None`` (fp32) or a dtype for ``torch.autocast`` on ``device`` (both encoders).
        image_encoder: a CLIP image embedder (``frames (B, 3, H, W) in [-1, 1] -> (B, 1, D)``) whose embedding of
            each clip's stored first frame is written beside the latents (fp16 ``(D,)``); None: no embeddings.
        image_info: :func:`image_encoder_info` of it (recorded in every sample's json and the manifest);
            required with ``image_encoder``.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        info: dict[str, Any],
        clip_frames: int | None = None,
        clip_stride: int | None = None,
        size: tuple[int, int] | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        autocast: torch.dtype | None = None,
        image_encoder: nn.Module | None = None,
        image_info: dict[str, Any] | None = None,
    ) -> None:
        if (image_encoder is None) != (image_info is None):
            raise ValueError("ShardEncoder: give image_info (image_encoder_info) with image_encoder, and only then")
        if clip_frames is not None and clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
        if clip_stride is not None and (clip_stride < 1 or clip_frames is None):
            raise ValueError("clip_stride needs clip_frames and must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        f = int(autoencoder.spatial_downsample)
        if size is not None and (size[0] % f or size[1] % f):
            raise ValueError(f"size {size} must be a multiple of the autoencoder's downsampling {f}")
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.info = info
        self.clip_frames = clip_frames
        self.clip_stride = clip_stride or clip_frames
        self.size = size
        self.batch_size = batch_size
        self.autocast = autocast
        self.image_encoder = None if image_encoder is None else image_encoder.to(self.device).eval()
        self.image_info = image_info

    def params(self) -> dict[str, Any]:
        """The settings that define the latent set (a resume must use the same)."""
        return {
            "clip_frames": self.clip_frames,
            "clip_stride": self.clip_stride,
            "size": list(self.size) if self.size else None,
        }

    # ---------------------------------------------------------------- reading

    def clips(self, key: str, files: dict[str, bytes]) -> list[_Clip]:
        """The clips of one video sample; raises VideoDecodeError / SchemaError / ValueError on bad input (a key the
        output shards cannot hold, such as ``../x``, before anything is decoded)."""
        check_key(key)
        if VIDEO_EXT not in files or META_EXT not in files:
            raise SchemaError(f"sample {key!r} needs .{VIDEO_EXT} and .{META_EXT}, has {sorted(files)}")
        meta = VideoMeta.from_json(files[META_EXT])
        if meta.sample_type != SampleType.VIDEO.value:
            raise SchemaError(f"sample {key!r} is a {meta.sample_type!r} sample, not a video sample")
        length = self.clip_frames or meta.num_frames
        if meta.num_frames < length:
            raise ValueError(f"sample {key!r} has {meta.num_frames} frames, fewer than --clip-frames {length}")
        decode_hw = cover_size((meta.height, meta.width), self.size) if self.size else None
        frames = decode_frames(files[VIDEO_EXT], list(range(meta.num_frames)), size=decode_hw)  # (T, H, W, 3)
        plan = None
        if self.size is not None:
            plan = plan_crop(frames.shape[1:3], self.size, "center")
            frames = crop_frames(frames, plan)
        f = int(self.autoencoder.spatial_downsample)
        if frames.shape[1] % f or frames.shape[2] % f:
            raise ValueError(
                f"sample {key!r}: frames {frames.shape[1]}x{frames.shape[2]} are not multiples of {f}; pass --size"
            )
        starts = range(0, meta.num_frames - length + 1, self.clip_stride or length)
        clips = []
        for j, start in enumerate(starts):
            stop = start + length
            clip_meta = dataclasses.replace(
                meta,
                width=int(frames.shape[2]),
                height=int(frames.shape[1]),
                num_frames=length,
                actions=_slice_actions(meta.actions, start, stop, plan),
                extra={
                    **meta.extra,
                    "latent": {**self.info, "source_key": key, "source_frames": [start, stop]},
                    **({IMAGE_EMBED_INFO_KEY: self.image_info} if self.image_info is not None else {}),
                },
                sample_type=SampleType.LATENT.value,
            )
            clip_key = key if self.clip_frames is None else f"{key}/clip{j}"
            clips.append(_Clip(clip_key, np.ascontiguousarray(frames[start:stop]), clip_meta))
        return clips

    # ---------------------------------------------------------------- encoding

    @torch.no_grad()
    def encode_batch(self, clips: Sequence[_Clip]) -> tuple[Tensor, Tensor]:
        """Posterior ``(mean, std)`` ``(B, T, c, h, w)`` float32 on the CPU for same-shaped clips."""
        video = torch.from_numpy(np.stack([c.frames for c in clips])).to(self.device)  # (B, T, H, W, 3) uint8
        video = normalize_video(video.permute(0, 1, 4, 2, 3))  # (B, T, 3, H, W) in [-1, 1]
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            posterior = self.autoencoder.encode(video)
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    @torch.no_grad()
    def embed_first_frames(self, clips: Sequence[_Clip]) -> Tensor:
        """``(B, D)`` float32 image embeddings (CPU) of the clips' first frames exactly as stored (the uint8 frame
        the PNG holds, mapped to [-1, 1] as the data modules' ``first_frame``)."""
        assert self.image_encoder is not None
        frames = torch.from_numpy(np.stack([c.frames[0] for c in clips])).to(self.device)  # (B, H, W, 3) uint8
        frames = normalize_video(frames.permute(0, 3, 1, 2))  # (B, 3, H, W) in [-1, 1]
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            tokens = self.image_encoder(frames)  # (B, 1, D)
        return tokens.reshape(len(clips), -1).float().cpu()

    def _batches(self, clips: Iterator[_Clip]) -> Iterator[list[_Clip]]:
        pending: list[_Clip] = []
        for clip in clips:
            if pending and (len(pending) == self.batch_size or clip.frames.shape != pending[0].frames.shape):
                yield pending
                pending = []
            pending.append(clip)
        if pending:
            yield pending

    def encode_shard(self, shard: str, writer: ShardWriter, stats: EncodeStats) -> None:
        """Encode every sample of one input shard into ``writer`` (bad samples are counted and skipped)."""

        def all_clips() -> Iterator[_Clip]:
            for key, files in iter_raw_samples(shard):
                try:
                    clips = self.clips(key, files)
                except (VideoDecodeError, SchemaError, ValueError) as err:
                    reason = getattr(err, "reason", type(err).__name__)
                    stats.bad_samples += 1
                    stats.bad[reason] = stats.bad.get(reason, 0) + 1
                    print(f"vdiff encode: skipped {shard}:{key}: {err}")
                    continue
                stats.videos += 1
                yield from clips

        for batch in self._batches(all_clips()):
            start = time.perf_counter()
            mean, std = self.encode_batch(batch)
            embeds = self.embed_first_frames(batch) if self.image_encoder is not None else [None] * len(batch)
            stats.encode_seconds += time.perf_counter() - start
            for clip, m, s, e in zip(batch, mean, std, embeds):
                writer.write_latent(clip.key, m, s, clip.frames[0], clip.meta, image_embed=e)
                stats.clips += 1
                stats.frames += clip.meta.num_frames


# ----------------------------------------------------------------------------------------------
# Shard sets, resumable
# ----------------------------------------------------------------------------------------------


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def _load_output_manifest(out: Path, expected: dict[str, Any]) -> Manifest:
    """The output manifest (a fresh one if none); raise if it was made with other settings."""
    if (out / MANIFEST_NAME).is_file():
        manifest = Manifest.load(out)
        if manifest.sample_type != SampleType.LATENT.value:
            raise ValueError(f"{out} holds {manifest.sample_type!r} shards, not a latent set")
        for name in ("latent", "params"):
            have = manifest.extra.get("encode", {}).get(name) if name == "params" else manifest.extra.get(name)
            want = expected[name]
            if have != want:
                diff = sorted(k for k in set(have or {}) | set(want) if (have or {}).get(k) != want.get(k))
                raise ValueError(
                    f"{out} was encoded with other {name} settings (differing: {diff}); use another --out folder "
                    "or the same autoencoder and clip settings to resume"
                )
        have_image = manifest.extra.get(IMAGE_EMBED_INFO_KEY)
        want_image = expected[IMAGE_EMBED_INFO_KEY]
        if image_encoder_identity(have_image) != image_encoder_identity(want_image):

            def said(info: dict[str, Any] | None) -> str:
                return (
                    "no image encoder"
                    if info is None
                    else f"image encoder {info.get('path')} (sha256 {info.get('sha256')})"
                )

            raise ValueError(
                f"{out} was encoded with {said(have_image)}, this run has {said(want_image)}; use another --out folder "
                "or the same --image-encoder to resume"
            )
        if want_image is not None:
            manifest.extra[IMAGE_EMBED_INFO_KEY] = want_image  # the file's current path, if it moved
        return manifest
    extra: dict[str, Any] = {"latent": expected["latent"], "encode": {"params": expected["params"], "done": {}}}
    if expected[IMAGE_EMBED_INFO_KEY] is not None:
        extra[IMAGE_EMBED_INFO_KEY] = expected[IMAGE_EMBED_INFO_KEY]
    return Manifest(shards=[], sample_type=SampleType.LATENT.value, extra=extra)


def _save_manifest(manifest: Manifest, out: Path) -> None:
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out / MANIFEST_NAME)


def encode_shards(
    input_spec: str | Sequence[str],
    out: str | os.PathLike,
    encoder: ShardEncoder,
    max_count: int = 1000,
    log: bool = True,
) -> EncodeStats:
    """Encode every shard of ``input_spec`` into the latent set ``out``, skipping shards already done.

    Each input shard ``<stem>.tar`` gives ``<stem>-000000.tar`` (more when over ``max_count`` samples); the
    manifest is rewritten after every finished shard, so an interrupted run resumes where it stopped.
    """
    shards = expand_shard_spec(input_spec)
    stems = [_stem(s) for s in shards]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"input shards share file names {dup[:3]}: encode each shard set into its own --out")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(PARTIAL_PREFIX + "*"):  # a crashed run's unfinished shard
        shutil.rmtree(leftover)
    manifest = _load_output_manifest(
        out, {"latent": encoder.info, "params": encoder.params(), IMAGE_EMBED_INFO_KEY: encoder.image_info}
    )
    done: dict[str, list[str]] = manifest.extra["encode"].setdefault("done", {})
    total = EncodeStats()
    begin = time.perf_counter()
    for shard, stem in zip(shards, stems):
        if stem in done:
            total.shards_skipped += 1
            continue
        stats = EncodeStats()
        start = time.perf_counter()
        partial = out / f"{PARTIAL_PREFIX}{stem}"
        with ShardWriter(partial, prefix=stem, max_count=max_count, sample_type=SampleType.LATENT.value) as writer:
            encoder.encode_shard(shard, writer, stats)
        written = writer.close()
        stats.seconds = time.perf_counter() - start
        for info in written.shards:
            os.replace(partial / info.path, out / info.path)
            manifest.shards.append(ShardInfo(path=info.path, num_samples=info.num_samples, num_frames=info.num_frames))
        shutil.rmtree(partial)
        done[stem] = [info.path for info in written.shards]
        _save_manifest(manifest, out)
        if log:
            print(f"{shard}: {stats.line()}")
        total.shards_done += 1
        for name in ("videos", "clips", "frames", "bad_samples", "encode_seconds"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        for reason, count in stats.bad.items():
            total.bad[reason] = total.bad.get(reason, 0) + count
    if not (out / MANIFEST_NAME).is_file():
        _save_manifest(manifest, out)
    total.seconds = time.perf_counter() - begin
    if log:
        print(f"encoded {total.shards_done} shard(s), skipped {total.shards_skipped} already done: {total.line()}")
    return total


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def load_autoencoder(
    ckpt: str | None, weights: str | None, layout: str = "auto", use_ema: bool = True
) -> tuple[nn.Module, str]:
    """The autoencoder from an AutoencoderModule checkpoint or local weights (a file or a diffusers folder,
    read by :func:`vdiff.weights.autoencoder.load_autoencoder`), and the path given."""
    if (ckpt is None) == (weights is None):
        raise ValueError("vdiff encode: give exactly one of --ckpt (AutoencoderModule checkpoint) or --weights")
    if ckpt is not None:
        from vdiff.lit.autoencoder import load_autoencoder_from_checkpoint

        return load_autoencoder_from_checkpoint(ckpt, use_ema=use_ema), str(ckpt)
    from vdiff.weights.autoencoder import load_autoencoder as load_weights

    return load_weights(weights, layout=layout).eval(), str(weights)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vdiff encode``."""
    parser.add_argument(
        "--input", required=True, nargs="+", help="video shards: folder, manifest, brace pattern, glob or tar"
    )
    parser.add_argument("--out", required=True, help="output folder of the latent shard set")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="an AutoencoderModule checkpoint (vdiff fit -c recipes/vae_kl.yaml)")
    source.add_argument(
        "--weights",
        help="local autoencoder weights: a diffusers model folder (config.json + "
        "weights; recommended for diffusers models) or a file (.safetensors/.pt/.ckpt)",
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=("auto", "vdiff", "diffusers", "sgm"),
        help="key layout of --weights (default: detected)",
    )
    parser.add_argument(
        "--no-ema", action="store_true", help="use the raw weights of --ckpt even if it holds EMA weights"
    )
    parser.add_argument(
        "--clip-frames",
        type=int,
        default=None,
        help="frames per latent sample (default: each whole video is one sample)",
    )
    parser.add_argument(
        "--clip-stride", type=int, default=None, help="frames between clip starts (default --clip-frames)"
    )
    add_size_argument(parser, None, "output frame size, scaled to cover and center-cropped (default: native size)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per autoencoder call (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--autocast", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype (default fp32)"
    )
    parser.add_argument("--max-count", type=int, default=1000, help="samples per output shard at most (default 1000)")
    parser.add_argument(
        "--image-encoder",
        default=None,
        help="also store the CLIP image embedding of each sample's first frame: a LOCAL transformers "
        "CLIPVisionModelWithProjection folder (e.g. stable-video-diffusion-img2vid/image_encoder) or an "
        "open_clip / SVD file; its path, sha256 and config are recorded",
    )
    parser.add_argument(
        "--image-encoder-layout",
        default="auto",
        choices=("auto", "transformers", "open_clip"),
        help="key layout of --image-encoder (default: detected)",
    )
    parser.add_argument(
        "--image-encoder-config",
        default=None,
        help="architecture of --image-encoder when its files hold none (open_clip files): a "
        "CLIP_IMAGE_CONFIGS name such as vit-h-14 (default: the file's config.json)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``vdiff encode``."""
    size = args.size  # (H, W) or None (vdiff.data.frame_size)
    if args.image_encoder is None and (args.image_encoder_layout != "auto" or args.image_encoder_config is not None):
        raise ValueError("vdiff encode: --image-encoder-layout / --image-encoder-config need --image-encoder")
    # a missing autoencoder and a missing image encoder file are named together (gather_missing_files)
    (autoencoder, weights), (image_encoder, image_info) = gather_missing_files([
        lambda: load_autoencoder(args.ckpt, args.weights, args.layout, use_ema=not args.no_ema),
        lambda: (None, None) if args.image_encoder is None else load_image_encoder(
            args.image_encoder, args.image_encoder_layout, args.image_encoder_config
        ),
    ])  # fmt: skip
    if image_encoder is not None:
        print(
            f"vdiff encode: image embeddings ({image_info['embed_dim']}-d) by {image_info['path']} "
            f"(sha256 {image_info['sha256']})"
        )
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    encoder = ShardEncoder(
        autoencoder,
        autoencoder_info(autoencoder, weights),
        args.clip_frames,
        args.clip_stride,
        size,
        args.batch_size,
        args.device,
        dtype,
        image_encoder=image_encoder,
        image_info=image_info,
    )
    encode_shards(args.input, args.out, encoder, max_count=args.max_count)
    return 0
