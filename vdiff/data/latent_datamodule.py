"""``LatentDataModule``: clips of pre-encoded latents (``vdiff encode``) for diffusion training without an
autoencoder in the loop.

It is a :class:`~vdiff.data.datamodule.VideoDataModule` whose streams turn a raw *latent* sample into a clip
instead of decoding a video, so everything else is shared: resampled shards per (rank, worker), weighted
source mixing, shuffle buffers, the deterministic ``(seed, epoch, rank, worker, index)`` randomness, mid-epoch
resume through the stateful loader, exact-once evaluation across ranks and workers, and skip counting.

A clip is ``num_frames`` consecutive latent frames (or every ``frame_stride``-th / resampled to ``target_fps``)
from a random start (training; ``train_start="first"`` pins it to 0) or evenly spaced fixed starts
(evaluation). Batches follow :mod:`vdiff.data.batch`:

* ``latents`` ``(B, T, c, h, w)`` float32: a posterior sample ``mean + std * eps``, ``eps`` drawn per sample
  from the data pipeline's seeded generator (training: a function of (seed, epoch, rank, worker, index);
  evaluation: of (seed, key), so it does not depend on how samples were split between readers);
* ``latents_mean``, ``latents_std``: the stored posterior, float32;
* ``first_frame`` ``(B, 3, H, W)`` in [-1, 1]: the stored clean first frame of the *latent sample*, which is
  the first frame of the clip when the clip starts at latent frame 0 (``frame_indices[:, 0] == 0``; always
  true with ``train_start="first"`` or samples encoded with ``--clip-frames`` equal to ``num_frames``);
* ``fps`` (of the clip as sampled), ``motion_score`` (the curation score the encoded video clip carried, NaN
  where unknown), ``frame_indices`` (latent frame indices in the sample), ``key``, ``source``, ``actions`` with
  ``<key>_valid`` (as the video data module);
* ``image_embed`` ``(B, D)`` float32 when every sample of the batch stores one (``vdiff encode --image-encoder``:
  the embedding of exactly ``first_frame``).

The image encoder of stored embeddings is recorded in the latent set's manifest (``extra["image_embed"]``). At
``setup`` the sources of a stage must agree on it, and when the LightningModule being trained has an
``image_encoder`` whose weights file is known (``weights_sha256``, e.g.
``vdiff.weights.clip.PretrainedCLIPImageEmbedder``), a set embedded by another encoder is refused
(:meth:`LatentDataModule.check_image_encoder`), so stored embeddings never silently disagree with the model's
own.

Latents are *unscaled*; diffusion modules scale them (``VideoDiffusionModule.batch_latents``).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from vdiff.data import batch as B
from vdiff.data import sampling
from vdiff.data.clips import (
    ClipSpec,
    Skip,
    clip_actions_of,
    clip_fps,
    clip_indices,
    clip_item,
    last_clip_start,
    parse_meta,
)
from vdiff.data.datamodule import SKIP_REASONS, STAGE_SPLITS, VideoDataModule
from vdiff.data.eval_stream import EvalClipStream
from vdiff.data.options import LoaderOptions
from vdiff.data.sampling import ReaderSlot
from vdiff.data.schema import (
    FIRST_FRAME_EXT,
    IMAGE_EMBED_EXT,
    IMAGE_EMBED_INFO_KEY,
    LATENTS_EXT,
    SampleType,
    SchemaError,
    VideoMeta,
    check_image_embed_info,
    image_encoder_identity,
)
from vdiff.data.shards import load_manifests
from vdiff.data.sources import DataSource
from vdiff.data.stream_base import STAGES
from vdiff.data.train_stream import TrainClipStream
from vdiff.data.transforms import motion_scores, normalize_video

MISSING_LATENTS = "missing_latents"  # the sample has no <key>.latents.safetensors or no first frame
BAD_LATENTS = "bad_latents"  # unreadable safetensors / PNG, or shapes that disagree
LATENT_SKIP_REASONS: tuple[str, ...] = (*SKIP_REASONS, MISSING_LATENTS, BAD_LATENTS)
LATENT_NOISE = 11  # sampling purpose: posterior noise (distinct from the VideoDataModule's purposes)


# ----------------------------------------------------------------------------------------------
# One raw latent sample -> one clip
# ----------------------------------------------------------------------------------------------


def _parse_latent(key: str, files: dict[str, bytes], where: str) -> tuple[VideoMeta, dict[str, torch.Tensor]]:
    """The json and the stored tensors (``mean``, ``std``, ``first_frame``, optional ``embed``) of a sample."""
    meta = parse_meta(key, files, where, SampleType.LATENT, hint=" (encode video shards with `vdiff encode`)")
    for ext in (LATENTS_EXT, FIRST_FRAME_EXT):
        if ext not in files:
            raise Skip(MISSING_LATENTS, f"{where}: sample {key!r} has no .{ext} (files: {sorted(files)})")
    try:
        tensors = load_safetensors(files[LATENTS_EXT])
        frame = np.asarray(Image.open(io.BytesIO(files[FIRST_FRAME_EXT])).convert("RGB"))  # (H, W, 3) uint8
        embed = load_safetensors(files[IMAGE_EMBED_EXT])["embed"] if IMAGE_EMBED_EXT in files else None
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise Skip(BAD_LATENTS, f"{where}: sample {key!r}: unreadable latents or first frame ({err})") from None
    mean, std = tensors.get("mean"), tensors.get("std")
    if mean is None or std is None or mean.ndim != 4 or mean.shape != std.shape:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise Skip(
            BAD_LATENTS, f"{where}: sample {key!r}: need tensors mean and std of equal (T, c, h, w), got {shapes}"
        )
    out = {"mean": mean, "std": std, "first_frame": torch.from_numpy(frame.copy()).permute(2, 0, 1)}
    if embed is not None:
        width = meta.extra.get(IMAGE_EMBED_INFO_KEY, {}).get("embed_dim")
        if embed.numel() == 0 or (embed.ndim > 1 and embed.shape[0] != 1) or (width and embed.numel() != width):
            raise Skip(
                BAD_LATENTS,
                f"{where}: sample {key!r}: image_embed of shape {tuple(embed.shape)}, expected ({width or 'D'},)",
            )
        out["embed"] = embed.reshape(-1)
    return meta, out


def _latent_timing(meta: VideoMeta, tensors: dict[str, torch.Tensor]) -> tuple[int, float, int]:
    """(latent frames, latent frame rate, temporal downsampling) of a sample."""
    down = int(meta.extra.get("latent", {}).get("temporal_downsample", 1) or 1)
    return int(tensors["mean"].shape[0]), meta.fps / down, down


def _last_start(key: str, meta: VideoMeta, tensors: dict[str, torch.Tensor], spec: ClipSpec, where: str) -> int:
    frames, fps, _ = _latent_timing(meta, tensors)
    return last_clip_start(key, frames, fps, spec, where, unit="latent frames")


def _latent_clip(
    key: str,
    meta: VideoMeta,
    tensors: dict[str, torch.Tensor],
    start: int,
    spec: ClipSpec,
    noise: np.random.Generator,
    source: str | None,
    where: str,
) -> dict[str, Any]:
    """One clip's item: latents (a posterior sample), the stored posterior, first frame, actions..."""
    frames, fps, down = _latent_timing(meta, tensors)
    indices = clip_indices(frames, fps, spec, start)
    video_indices = [i * down for i in indices]  # actions are per video frame
    if video_indices[-1] >= meta.num_frames:
        raise Skip(
            BAD_LATENTS,
            f"{where}: sample {key!r}: {frames} latent frames x {down} exceed the json's num_frames {meta.num_frames}",
        )
    actions = clip_actions_of(meta, video_indices, key, where)
    index = torch.as_tensor(indices)
    mean = tensors["mean"][index].float()  # (T, c, h, w)
    std = tensors["std"][index].float()
    eps = torch.from_numpy(noise.standard_normal(mean.shape, dtype=np.float32))
    item = {
        "latents": mean + std * eps,
        "latents_mean": mean,
        "latents_std": std,
        "first_frame": tensors["first_frame"],
        **clip_item(key, meta, indices, actions, clip_fps(spec, fps), source),
    }
    if "embed" in tensors:
        item["image_embed"] = tensors["embed"].float()
    return item


def _describe(info: dict[str, Any]) -> str:
    """An image-encoder record (``extra["image_embed"]``) in a few words: file and sha256."""
    sha = info.get("sha256")
    return f"{info.get('path') or 'not read from a file'} (sha256 {sha[:12] + '...' if sha else None})"


def collate_latent_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latent clips into a batch of :mod:`vdiff.data.batch` (``first_frame`` to float in [-1, 1])."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch: dict[str, Any] = {
        B.LATENTS: torch.stack([s["latents"] for s in samples]),
        B.LATENTS_MEAN: torch.stack([s["latents_mean"] for s in samples]),
        B.LATENTS_STD: torch.stack([s["latents_std"] for s in samples]),
        B.FIRST_FRAME: normalize_video(torch.stack([s["first_frame"] for s in samples])),
        B.FPS: torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        B.MOTION_SCORE: motion_scores(samples),
        B.FRAME_INDICES: torch.tensor(np.stack([s["frame_indices"] for s in samples]), dtype=torch.long),
        B.KEY: [s["key"] for s in samples],
        B.SOURCE: [s["source"] for s in samples],
        B.ACTIONS: {
            name: torch.from_numpy(np.stack([s["actions"][name] for s in samples])) for name in samples[0]["actions"]
        },
    }
    if all("image_embed" in s for s in samples):
        batch[B.IMAGE_EMBED] = torch.stack([s["image_embed"] for s in samples])
    return batch


def eval_noise(seed: int, key: str) -> np.random.Generator:
    """Posterior noise of an evaluation clip: a function of (seed, key) only."""
    return sampling.rng(seed, 0, 0, 0, LATENT_NOISE, zlib.crc32(key.encode()))


# ----------------------------------------------------------------------------------------------
# Streams: the VideoDataModule's, with a latent sample -> clip step
# ----------------------------------------------------------------------------------------------


class LatentTrainStream(TrainClipStream):
    """:class:`TrainClipStream` over latent samples (``crop``/``flip`` unused; ``train_start`` as the module)."""

    def __init__(self, *args: Any, train_start: str = "random", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_start = train_start

    def train_clip(
        self,
        shard: str,
        key: str,
        files: dict[str, bytes],
        name: str | None,
        generator: np.random.Generator,
        index: int,
        slot: ReaderSlot,
    ) -> dict[str, Any]:
        noise = sampling.rng(self.seed, self.epoch, slot.rank, slot.worker, LATENT_NOISE, index)
        meta, tensors = _parse_latent(key, files, shard)
        last = _last_start(key, meta, tensors, self.spec, shard)
        start = 0 if self.train_start == "first" else int(generator.integers(last + 1))
        return _latent_clip(key, meta, tensors, start, self.spec, noise, name, shard)


class LatentEvalStream(EvalClipStream):
    """:class:`EvalClipStream` over latent samples: fixed starts, noise seeded by (seed, key)."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed

    def eval_clips(self, shard: str, key: str, files: dict[str, bytes], name: str | None) -> list[dict[str, Any]]:
        meta, tensors = _parse_latent(key, files, shard)
        last = _last_start(key, meta, tensors, self.spec, shard)
        return self.clips_at_starts(
            key,
            last,
            lambda start, clip_key: _latent_clip(
                key, meta, tensors, start, self.spec, eval_noise(self.seed, clip_key), name, shard
            ),
        )


# ----------------------------------------------------------------------------------------------
# The data module
# ----------------------------------------------------------------------------------------------


class LatentDataModule(VideoDataModule):
    """Latent clips from ``vdiff encode`` shards, mixed from weighted sources (see the module docstring).

    Args:
        train, val, test, predict: latent shard specs or lists of :class:`DataSource` (as VideoDataModule).
        num_frames: latent frames per clip.
        frame_stride: take every ``frame_stride``-th latent frame. Exclusive with ``target_fps``.
        target_fps: resample clips to this frame rate (nearest latent frame).
        train_start: ``"random"`` clip starts in training, or ``"first"`` (always latent frame 0, so that
            ``first_frame`` is the clip's first frame).
        batch_size, val_batch_size, num_workers, shuffle_buffer, seed, epoch_length, val_clips_per_video,
            eval_num_frames, pin_memory: as :class:`~vdiff.data.datamodule.VideoDataModule`.
    """

    train_stream_class = LatentTrainStream
    eval_stream_class = LatentEvalStream
    skip_reasons = LATENT_SKIP_REASONS

    def __init__(
        self,
        train: str | list[DataSource] | None = None,
        val: str | list[DataSource] | None = None,
        test: str | list[DataSource] | None = None,
        predict: str | list[DataSource] | None = None,
        num_frames: int = 14,
        frame_stride: int | None = None,
        target_fps: float | None = None,
        train_start: Literal["random", "first"] = "random",
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 64,
        seed: int = 0,
        epoch_length: int | None = None,
        val_clips_per_video: int = 1,
        eval_num_frames: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        if train_start not in ("random", "first"):
            raise ValueError(f"train_start must be 'random' or 'first', got {train_start!r}")
        super().__init__(
            train=train,
            val=val,
            test=test,
            predict=predict,
            num_frames=num_frames,
            frame_stride=frame_stride,
            target_fps=target_fps,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            epoch_length=epoch_length,
            val_clips_per_video=val_clips_per_video,
            eval_num_frames=eval_num_frames,
            loader=LoaderOptions(pin_memory=pin_memory, float_on_device=False),
        )
        self.train_start = train_start

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_latent_clips

    # -- stored image embeddings ---------------------------------------------------------------

    def image_embed_info(self, stage: str) -> dict[str, Any] | None:
        """The image encoder that embedded the first frames of ``stage``'s latent sets, as their manifests record
        it (``extra["image_embed"]``: encoder, path, sha256, layout, config, embed_dim), or None when no set of
        the stage stores embeddings (or none has a manifest). Raises ValueError when two sets were embedded by
        different encoders (different weights or config), naming both."""
        found: tuple[str, dict[str, Any]] | None = None
        for source in self.sources[stage]:
            for manifest in load_manifests(source.path) or []:
                info = manifest.extra.get(IMAGE_EMBED_INFO_KEY)
                if info is None:
                    continue
                try:
                    check_image_embed_info(info, f"{source.path}: manifest extra.image_embed")
                except SchemaError as err:
                    raise ValueError(str(err)) from None
                if found is None:
                    found = (str(source.path), info)
                elif image_encoder_identity(info) != image_encoder_identity(found[1]):
                    raise ValueError(
                        f"{type(self).__name__}: the {stage} sets {found[0]} and {source.path} store image embeddings "
                        f"of different encoders ({_describe(found[1])} vs {_describe(info)}); re-encode one with "
                        "`vdiff encode --image-encoder` and the other's file"
                    )
        return None if found is None else found[1]

    def check_image_encoder(self, encoder: Any, stages: tuple[str, ...] = STAGES) -> None:
        """Refuse latent sets whose stored embeddings come from another image encoder than ``encoder`` (the
        model's: an object with ``config`` and, when read from a file, ``weights_sha256``, as
        ``vdiff.weights.clip.PretrainedCLIPImageEmbedder``). ``encoder`` None: the model has no encoder of its own
        and uses the stored embeddings, nothing to compare. Raises ValueError naming the set's encoder file and
        the model's."""
        if encoder is None:
            return
        config = getattr(encoder, "config", None)
        ours = {
            "sha256": getattr(encoder, "weights_sha256", None),
            "config": config.to_dict() if hasattr(config, "to_dict") else None,
        }
        for stage in stages:
            info = self.image_embed_info(stage)
            if info is None:
                continue
            theirs = image_encoder_identity(info)
            differs = [k for k in ("sha256", "config") if theirs[k] is not None and theirs[k] != ours[k]]
            if theirs["sha256"] is None and ours["sha256"] is not None:
                differs.append("sha256")  # embedded by an encoder not read from a file; the model's is a file
            if differs:
                model_file = getattr(encoder, "weights_path", None) or "not read from a file"
                raise ValueError(
                    f"{type(self).__name__}: the {stage} latent set stores image embeddings of another image encoder "
                    f"than the model's (differing: {', '.join(sorted(set(differs)))}): set encoder "
                    f"{_describe(info)}; model encoder {model_file} (sha256 {ours['sha256']}). Re-encode with "
                    "`vdiff encode --image-encoder <the model's file>`, or give the model the set's encoder"
                )

    def setup(self, stage: str | None = None) -> None:
        """As :meth:`VideoDataModule.setup`, then :meth:`check_image_encoder` against the image encoder of the
        LightningModule being run (its ``image_encoder`` attribute, when it has one)."""
        super().setup(stage)
        model = None
        if self.trainer is not None:
            try:
                model = self.trainer.lightning_module
            except (AttributeError, RuntimeError):
                model = None
        self.check_image_encoder(getattr(model, "image_encoder", None), STAGE_SPLITS.get(stage or "", STAGES))

    def train_stream_kwargs(self) -> dict[str, Any]:
        return {"crop": "center", "flip": False, "train_start": self.train_start}

    def eval_stream_kwargs(self, stage: str) -> dict[str, Any]:
        return {"seed": self.seed}
