"""``VideoDataModule``: clips from webdataset video shards (:mod:`vdiff.data.schema`) for any vdiff model.

Training reads *resampled* shards: every reader (one DataLoader worker on one rank) draws shards
with replacement from each source, shuffles samples in a buffer, picks for every output sample a
source by weight (Vista's phase 2: half YouTube driving without actions, half nuScenes with them),
a random clip start, a random or center crop, and optionally a flip. Every one of these choices is
drawn from :func:`vdiff.data.sampling.rng` with ``(seed, epoch, rank, worker, ...)``, so the data of
an epoch is a pure function of the configuration, and a run resumes mid-epoch exactly: the train
loader is *stateful* (Lightning stores its ``state_dict`` in checkpoints), and on resume each worker
replays its stream up to the batch where the run stopped (replayed samples are decoded again, so
bad ones are skipped identically, but not counted twice).

Each rank's training epoch has ``epoch_length`` batches (default: the samples of all train sources
in their manifests / (``batch_size`` x world size)); every worker produces its share of those
batches exactly, so all ranks step in lockstep.

Validation, test and predict read every sample exactly once across ranks and workers, in a fixed
order, with deterministic clips (``val_clips_per_video`` evenly spaced starts, the first at frame 0)
and center crops, and no padding: **ranks may get different numbers of batches**. Log evaluation
metrics with torchmetrics or ``self.log(..., sync_dist=True)`` on epoch level, never with a
per-step collective. With fewer shards than readers (world size x workers) every reader scans all
shards and keeps every ``readers``-th sample (see :func:`vdiff.data.sampling.assign_eval_shards`).

Bad input (undecodable or too short videos, missing or malformed json, odd frame sizes, unreadable
shards, shards with fewer samples than their manifest lists) is skipped and counted in
:attr:`VideoDataModule.skips` (see :mod:`vdiff.data.skips`); training never stops for it.

Why not webdataset's pipeline stages: ``ResampledShards``/``shuffle`` seed from worker info and
their own state, which cannot be replayed from (seed, epoch, rank, worker, index), and
``split_by_node``/``split_by_worker`` hang a reader that gets no shard. Shards are still webdataset
tars, read by :func:`vdiff.data.shards.iter_raw_samples`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vdiff.data import batch as B
from vdiff.data import sampling
from vdiff.data.sampling import ReaderSlot
from vdiff.data.schema import META_EXT, VIDEO_EXT, SampleType, SchemaError, VideoMeta
from vdiff.data.shards import count_samples, expand_shard_spec, iter_raw_samples, manifest_sample_counts
from vdiff.data.skips import SkipCounter
from vdiff.data.transforms import (
    CropPlan,
    clip_actions,
    collate_clips,
    cover_size,
    crop_frames,
    flip_actions,
    move_goal,
    normalize_video,
    plan_crop,
)
from vdiff.data.video_io import (
    DECODE_ERROR_REASONS,
    TOO_SHORT,
    VideoDecodeError,
    clip_frame_indices,
    decode_frames,
    max_clip_start,
)

# Why a sample was skipped: the decoder's reasons plus the pipeline's own.
MISSING_VIDEO = "missing_video"  # the sample has no <key>.mp4
MISSING_JSON = "missing_json"  # the sample has no <key>.json
BAD_JSON = "bad_json"  # json unparsable or not following the schema (SchemaError)
TOO_SMALL = "too_small"  # frames smaller than the crop and resize=False
BAD_SHARD = "bad_shard"  # a tar that cannot be read (or is truncated) from some point on
TRUNCATED_SHARD = "truncated_shard"  # per read, each sample a manifest lists but a cleanly ending tar lacks
SKIP_REASONS: tuple[str, ...] = (
    *DECODE_ERROR_REASONS, MISSING_VIDEO, MISSING_JSON, BAD_JSON, TOO_SMALL, BAD_SHARD, TRUNCATED_SHARD
)

STAGES: tuple[str, ...] = ("train", "val", "test", "predict")
MAX_CONSECUTIVE_SKIPS = 1000  # a training source this bad is a configuration error, not bad luck


@dataclass
class DataSource:
    """A set of shards and its share of the training mix.

    ``path``: a folder of shards (with or without ``manifest.json``), a manifest, a brace pattern
    (``data/shard-{000000..000099}.tar``), a glob or a single tar. ``weight``: relative probability
    that a training sample comes from this source (ignored in evaluation, which reads every
    sample). ``name``: the ``source`` reported in batches; None reports each sample's json ``source``.
    """

    path: str
    weight: float = 1.0
    name: str | None = None


SourceSpec = str | list[DataSource] | None


class Skip(Exception):
    """Raised by a stream's raw sample -> clip step (:meth:`TrainClipStream.train_clip`,
    :meth:`EvalClipStream.eval_clips`): the sample is dropped and counted under ``reason``."""

    def __init__(self, reason: str, message: str, count: int = 1):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.count = count


def _as_sources(spec: Any, field: str) -> list[DataSource]:
    if spec is None:
        return []
    if isinstance(spec, (str, DataSource, dict)):
        spec = [spec]
    sources = []
    for item in spec:
        if isinstance(item, str):
            item = DataSource(path=item)
        elif isinstance(item, dict):
            item = DataSource(**item)
        elif not isinstance(item, DataSource):
            raise TypeError(f"{field}: expected a shard path or DataSource, got {type(item).__name__}")
        sources.append(item)
    if not sources:
        raise ValueError(f"{field}: empty list of sources")
    return sources


# ----------------------------------------------------------------------------------------------
# Turning one raw sample into a clip
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """What clip to cut: frames, sampling (stride or target fps), output size and crop."""

    num_frames: int
    frame_stride: int | None
    target_fps: float | None
    out_hw: tuple[int, int]
    resize: bool
    decode_threads: int


def parse_meta(
    key: str, files: dict[str, bytes], where: str, sample_type: SampleType = SampleType.VIDEO, hint: str = ""
) -> VideoMeta:
    """The json of raw sample ``key`` (read from ``where``), which must be a ``sample_type`` sample.

    Raises :class:`Skip` (``missing_json``, or ``bad_json`` with ``hint`` appended when the type is wrong).
    """
    if META_EXT not in files:
        raise Skip(MISSING_JSON, f"{where}: sample {key!r} has no .{META_EXT} (files: {sorted(files)})")
    try:
        meta = VideoMeta.from_json(files[META_EXT])
    except SchemaError as err:
        raise Skip(BAD_JSON, f"{where}: sample {key!r}: {err}") from None
    if meta.sample_type != sample_type.value:
        raise Skip(BAD_JSON, f"{where}: sample {key!r} is a {meta.sample_type!r} sample, not a {sample_type.value} "
                             f"sample{hint}")
    return meta


def _parse_video_meta(key: str, files: dict[str, bytes], where: str) -> VideoMeta:
    if VIDEO_EXT not in files:
        raise Skip(MISSING_VIDEO, f"{where}: sample {key!r} has no .{VIDEO_EXT} (files: {sorted(files)})")
    return parse_meta(key, files, where)


def _clip_starts(meta: VideoMeta, spec: ClipSpec, key: str, where: str) -> int:
    last = max_clip_start(meta.num_frames, meta.fps, spec.num_frames, spec.frame_stride, spec.target_fps)
    if last < 0:
        raise Skip(
            TOO_SHORT,
            f"{where}: sample {key!r} has {meta.num_frames} frames at {meta.fps} fps, too few for a clip of "
            f"{spec.num_frames} frames (stride {spec.frame_stride}, target fps {spec.target_fps})",
        )
    return last


def _decode_clip(
    key: str,
    files: dict[str, bytes],
    meta: VideoMeta,
    start: int,
    spec: ClipSpec,
    crop: str,
    generator: np.random.Generator | None,
    flip: bool,
    source: str | None,
    where: str,
) -> dict[str, Any]:
    """Decode one clip of a sample and build its item (see :func:`collate_clips`)."""
    indices = clip_frame_indices(meta.num_frames, meta.fps, spec.num_frames, start, spec.frame_stride, spec.target_fps)
    try:
        actions = clip_actions(meta.actions, indices)
    except SchemaError as err:
        raise Skip(BAD_JSON, f"{where}: sample {key!r}: {err}") from None
    decode_hw = cover_size((meta.height, meta.width), spec.out_hw) if spec.resize else None
    try:
        frames = decode_frames(files[VIDEO_EXT], indices, size=decode_hw, thread_count=spec.decode_threads)
    except VideoDecodeError as err:
        raise Skip(err.reason, f"{where}: sample {key!r}: {err}") from None
    frame_hw = frames.shape[1:3]
    if frame_hw[0] < spec.out_hw[0] or frame_hw[1] < spec.out_hw[1]:
        raise Skip(TOO_SMALL, f"{where}: sample {key!r} has {frame_hw[0]}x{frame_hw[1]} frames, smaller than "
                    f"the crop {spec.out_hw[0]}x{spec.out_hw[1]} (set resize=True to scale it up)")
    plan: CropPlan = plan_crop(frame_hw, spec.out_hw, crop, generator, flip)
    actions["goal"], actions[B.valid_key("goal")] = move_goal(actions["goal"], actions[B.valid_key("goal")], plan)
    if flip:
        flip_actions(actions)
    fps = spec.target_fps if spec.target_fps is not None else meta.fps / (spec.frame_stride or 1)
    return {
        "video": crop_frames(frames, plan),
        "flip": flip,
        "fps": float(fps),
        "frame_indices": np.asarray(indices, dtype=np.int64),
        "key": key,
        "source": source if source is not None else meta.source,
        "actions": actions,
    }


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class _StreamBase(IterableDataset):
    """Shared parts of the train and eval streams: skip counting in this stage's counter rows, and
    reading shards (``expected_samples``: samples per shard path from the manifests, see
    :func:`vdiff.data.shards.manifest_sample_counts`)."""

    def __init__(
        self, counter: SkipCounter, stage: str, workers_per_stage: int, expected_samples: Mapping[str, int] | None
    ):
        self.counter = counter
        self.expected_samples = dict(expected_samples or {})
        self.stage_row = STAGES.index(stage) * (workers_per_stage + 1)
        self.count_skips = True
        self._row = self.stage_row

    def _bind_worker(self) -> tuple[int, int]:
        worker, num_workers = sampling.current_worker()
        self._row = self.stage_row + (0 if get_worker_info() is None else worker + 1)
        return worker, num_workers

    def _skip(self, skip: Skip) -> None:
        if self.count_skips:
            self.counter.add(self._row, skip.reason, skip.message, skip.count)

    def _raw_samples(self, shard: str, first_count: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Samples of one shard; counted (if ``first_count``) when it falls short: a damaged tar ends early
        (``bad_shard``, once), and a tar that ends cleanly with fewer samples than its manifest lists (cut at
        a file boundary, which tarfile reads as the end) counts each missing sample as ``truncated_shard``."""
        read = 0
        try:
            for sample in iter_raw_samples(shard):
                read += 1
                yield sample
        except ValueError as err:
            if first_count:
                self._skip(Skip(BAD_SHARD, str(err)))
            return
        expected = self.expected_samples.get(shard)
        if first_count and expected is not None and read < expected:
            message = f"shard {shard} ended after {read} samples, its manifest lists {expected} (truncated tar?)"
            self._skip(Skip(TRUNCATED_SHARD, message, count=expected - read))


class TrainClipStream(_StreamBase):
    """Endless, resampled, shuffled, mixed training clips; one rank's epoch is ``num_batches`` batches.

    Iterating yields, in each worker, exactly that worker's share of ``num_batches * batch_size``
    samples (see :func:`vdiff.data.sampling.split_batches`) for epoch ``epoch``, after silently
    replaying the first ``start_batch`` batches of the epoch (resume).

    Subclasses for other sample kinds override :meth:`train_clip` (one raw sample -> one clip) only.
    """

    def __init__(
        self,
        sources: Sequence[tuple[list[str], str | None]],
        weights: Sequence[float],
        spec: ClipSpec,
        crop: str,
        flip: bool,
        shuffle_buffer: int,
        batch_size: int,
        num_batches: int,
        seed: int,
        rank: int,
        world_size: int,
        counter: SkipCounter,
        workers_per_stage: int,
        expected_samples: Mapping[str, int] | None = None,
    ):
        super().__init__(counter, "train", workers_per_stage, expected_samples)
        self.sources = [(list(shards), name) for shards, name in sources]
        self.probabilities = sampling.normalized_weights(weights)
        self.spec = spec
        self.crop = crop
        self.flip = flip
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def _source_stream(self, s: int, slot: ReaderSlot) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """Source ``s``'s samples for this reader: shards drawn with replacement, then shuffled."""
        shards, _ = self.sources[s]
        seed, epoch = self.seed, self.epoch

        def draw(j: int) -> np.random.Generator:
            return sampling.rng(seed, epoch, slot.rank, slot.worker, sampling.SHARD_ORDER, s, j)

        def samples() -> Iterator[tuple[str, str, dict[str, bytes]]]:
            fruitless = 0  # consecutive shard draws that gave no sample
            for shard in sampling.resampled(shards, draw):
                got = False
                for key, files in self._raw_samples(shard):
                    got = True
                    yield shard, key, files
                fruitless = 0 if got else fruitless + 1
                if fruitless >= 4 * len(shards) + 16:
                    raise RuntimeError(
                        f"training source {shards[0]}{' ...' if len(shards) > 1 else ''}: {fruitless} shard reads "
                        "in a row gave no sample (empty or unreadable shards)"
                    )

        shuffler = sampling.rng(seed, epoch, slot.rank, slot.worker, sampling.SHUFFLE, s)
        return sampling.shuffled(samples(), self.shuffle_buffer, shuffler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._bind_worker()
        # A DataLoader asks worker 0 first, but after a resume the next batch (``start_batch``) belongs
        # to worker ``start_batch % num_workers`` of the original run: rotate the workers' identities.
        worker = (worker + self.start_batch) % num_workers
        slot = ReaderSlot(self.rank, self.world_size, worker, num_workers)
        done, todo = sampling.split_batches(self.num_batches, worker, num_workers, self.start_batch)
        replay, total = done * self.batch_size, (done + todo) * self.batch_size
        streams = [self._source_stream(s, slot) for s in range(len(self.sources))]
        for index in range(total):
            self.count_skips = index >= replay
            item = self._next_clip(index, streams, slot)
            if index >= replay:
                yield item
        self.count_skips = True

    def _next_clip(self, index: int, streams: list[Iterator], slot: ReaderSlot) -> dict[str, Any]:
        """Output sample ``index`` of this reader: source by weight, then the next good sample of it."""
        choice = sampling.rng(self.seed, self.epoch, slot.rank, slot.worker, sampling.SAMPLE, index)
        s = sampling.choose_source(self.probabilities, choice)
        shards, name = self.sources[s]
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            shard, key, files = next(streams[s])
            # Clip start, crop and flip depend on the output index only, not on how many bad
            # samples came before: a fresh generator per attempt.
            generator = sampling.rng(self.seed, self.epoch, slot.rank, slot.worker, sampling.SAMPLE, index, 1)
            try:
                return self.train_clip(shard, key, files, name, generator, index, slot)
            except Skip as skip:
                self._skip(skip)
        raise RuntimeError(
            f"training source with shards {shards[:3]}{'...' if len(shards) > 3 else ''}: "
            f"{MAX_CONSECUTIVE_SKIPS} consecutive samples were bad; see the skip counts and warnings"
        )

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
        """One raw sample (``key``, ``{ext: bytes}`` read from ``shard``, source ``name``) -> the item of
        output sample ``index`` of reader ``slot``; raises :class:`Skip` for a bad sample. Draw every
        random choice from ``generator`` (or from :func:`vdiff.data.sampling.rng` with ``index`` and
        ``slot``): the output must be a function of ``(seed, epoch, slot, index)`` for resumes."""
        meta = _parse_video_meta(key, files, shard)
        last = _clip_starts(meta, self.spec, key, shard)
        start = int(generator.integers(last + 1))
        flip = bool(generator.random() < 0.5) if self.flip else False
        return _decode_clip(key, files, meta, start, self.spec, self.crop, generator, flip, name, shard)


def eval_clip_starts(last_start: int, clips_per_video: int) -> list[int]:
    """Starts of the evaluation clips of a video whose last possible clip start is ``last_start``:
    ``clips_per_video`` evenly spaced starts from 0 to ``last_start`` (duplicates dropped)."""
    if clips_per_video == 1 or last_start == 0:
        return [0]
    return sorted({int(round(j * last_start / (clips_per_video - 1))) for j in range(clips_per_video)})


class EvalClipStream(_StreamBase):
    """Every sample of a shard set exactly once over all readers, with deterministic clips.

    ``shards`` are ``(path, source name)`` pairs in a fixed order. With ``clips_per_video`` > 1 each
    video gives several clips, keyed ``<key>/clip<j>``. Center crop, no flip.

    Subclasses for other sample kinds override :meth:`eval_clips` (one raw sample -> its clips) only.
    """

    def __init__(
        self,
        shards: Sequence[tuple[str, str | None]],
        spec: ClipSpec,
        clips_per_video: int,
        rank: int,
        world_size: int,
        counter: SkipCounter,
        stage: str,
        workers_per_stage: int,
        expected_samples: Mapping[str, int] | None = None,
    ):
        super().__init__(counter, stage, workers_per_stage, expected_samples)
        self.shards = list(shards)
        self.spec = spec
        self.clips_per_video = clips_per_video
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._bind_worker()
        slot = ReaderSlot(self.rank, self.world_size, worker, num_workers)
        paths = [path for path, _ in self.shards]
        names = dict(self.shards)
        mine, every, offset = sampling.assign_eval_shards(paths, slot)
        counter = itertools.count()
        for shard in mine:
            # In the fallback every reader scans every shard: only reader 0 counts a damaged tar.
            for key, files in self._raw_samples(shard, first_count=every == 1 or slot.index == 0):
                if next(counter) % every != offset:
                    continue
                try:
                    clips = self.eval_clips(shard, key, files, names[shard])
                except Skip as skip:  # one bad clip drops the whole sample, counted once
                    self._skip(skip)
                    continue
                yield from clips

    def clip_key(self, key: str, j: int) -> str:
        """Key of clip ``j`` of sample ``key``: ``<key>/clip<j>`` with several clips per video, else ``key``."""
        return f"{key}/clip{j}" if self.clips_per_video > 1 else key

    def eval_clips(self, shard: str, key: str, files: dict[str, bytes], name: str | None) -> list[dict[str, Any]]:
        """One raw sample (``key``, ``{ext: bytes}`` read from ``shard``, source ``name``) -> its evaluation
        clips (starts from :func:`eval_clip_starts`, keys from :meth:`clip_key`), deterministic; raises
        :class:`Skip` for a bad sample."""
        meta = _parse_video_meta(key, files, shard)
        starts = eval_clip_starts(_clip_starts(meta, self.spec, key, shard), self.clips_per_video)
        clips = [_decode_clip(key, files, meta, start, self.spec, "center", None, False, name, shard) for start in starts]
        for j, clip in enumerate(clips):
            clip["key"] = self.clip_key(key, j)
        return clips


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


class VideoLoader(DataLoader):
    """A DataLoader over a clip stream that sets the stream's epoch before its workers start, and
    (for training) is *stateful*: ``state_dict()`` records the epoch and the batches consumed, and
    after ``load_state_dict()`` the next iteration resumes at that batch. Lightning saves and
    restores this state in its checkpoints."""

    def __init__(
        self,
        dataset: IterableDataset,
        epoch_fn: Callable[[], int],
        consumed_fn: Callable[["VideoLoader"], int] | None = None,
        **kwargs: Any,
    ):
        super().__init__(dataset, **kwargs)
        self._epoch_fn = epoch_fn
        self._consumed_fn = consumed_fn
        self._resume: dict[str, int] | None = None
        self.epoch = 0
        self.start_batch = 0
        self.batches_yielded = 0

    def __iter__(self):
        epoch, start = self._epoch_fn(), 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:  # a resume point of an earlier epoch is spent
                start = self._resume["batches"]
            self._resume = None
        self.epoch, self.start_batch, self.batches_yielded = epoch, start, 0
        if isinstance(self.dataset, TrainClipStream):
            self.dataset.epoch, self.dataset.start_batch = epoch, start
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        consumed = self._consumed_fn(self) if self._consumed_fn is not None else None
        if consumed is None:
            consumed = self.start_batch + self.batches_yielded
        return {"epoch": int(self.epoch), "batches": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


# ----------------------------------------------------------------------------------------------
# The data module
# ----------------------------------------------------------------------------------------------


class VideoDataModule(LightningDataModule):
    """Video clips from webdataset shards, mixed from weighted sources, for any vdiff model.

    Batches follow :mod:`vdiff.data.batch`: ``video`` float ``(B, T, 3, H, W)`` in [-1, 1], ``fps``
    ``(B,)``, ``frame_indices`` ``(B, T)``, ``key``, ``source``, and ``actions`` with every action
    key and its ``<key>_valid`` mask (zeros and False where a source has no actions).

    Args:
        train: training shards: a shard spec (folder, manifest, brace pattern, glob, tar) or a list
            of :class:`DataSource` (path, weight, name) mixed by weight. None: no training data.
        val: validation shards, same forms (weights ignored: every sample is read once).
        test: test shards, same forms.
        predict: prediction shards, same forms.
        num_frames: frames per clip (T).
        frame_stride: take every ``frame_stride``-th source frame (default 1). Exclusive with
            ``target_fps``.
        target_fps: resample clips to this frame rate (nearest source frame per output time).
        size: output frame size, an int (square) or ``(H, W)``.
        resize: scale frames (keeping aspect) to the smallest size covering ``size``, then crop;
            False crops from the source resolution (smaller frames are skipped as ``too_small``).
        crop: training crop, ``"random"`` or ``"center"`` (evaluation always crops the center).
            Crops move ``goal`` points; a goal outside the crop becomes invalid.
        flip: randomly mirror training clips left-right, mirroring the actions too (off by default:
            driving is not mirror-symmetric, e.g. which side of the road traffic keeps to).
        batch_size: training clips per batch and rank.
        val_batch_size: clips per batch in validation, test and predict (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: training samples (compressed, per source and worker) held for shuffling;
            memory is about ``shuffle_buffer`` x mean sample size per source and worker.
        seed: seed of every random choice of the training pipeline.
        epoch_length: training batches per rank and epoch; default: the samples of all training
            sources (from their manifests, else by reading the shards) / (``batch_size`` x world size).
        decode_threads: PyAV decoding threads per reader (keep small: workers decode in parallel).
        val_clips_per_video: evaluation clips per video, evenly spaced from the first frame to the
            last possible start; with more than one, keys become ``<key>/clip<j>``.
        eval_num_frames: frames per clip in validation, test and predict (default: ``num_frames``);
            e.g. train on 16-frame clips and evaluate 2 -> 28 on 30-frame clips (MCVD's protocol).
        float_on_device: keep ``video`` uint8 through the DataLoader (4x less to copy between
            processes and to the accelerator) and convert it to float in ``on_after_batch_transfer``;
            False converts in the workers, so the loaders alone yield contract batches.
        pin_memory: pin batches for faster host-to-GPU copies (default: when CUDA is available).
        worker_start_method: how DataLoader workers start (default: the platform's, fork on Linux);
            ``spawn``/``forkserver`` where forking is unsafe, at the cost of workers importing torch.

    Extending it to another kind of sample (see :class:`~vdiff.data.latent_datamodule.LatentDataModule`):
    set :attr:`train_stream_class` / :attr:`eval_stream_class` to subclasses of :class:`TrainClipStream` /
    :class:`EvalClipStream` that override their raw sample -> clip step, pass their extra arguments with
    :meth:`train_stream_kwargs` / :meth:`eval_stream_kwargs`, and set :attr:`skip_reasons` and
    :meth:`collate_fn` where they differ. Everything else (sources, resume, workers, skips) is shared.
    """

    train_stream_class: type[TrainClipStream] = TrainClipStream
    eval_stream_class: type[EvalClipStream] = EvalClipStream
    skip_reasons: tuple[str, ...] = SKIP_REASONS  # the columns of :attr:`skips`

    def __init__(
        self,
        train: str | list[DataSource] | None = None,
        val: str | list[DataSource] | None = None,
        test: str | list[DataSource] | None = None,
        predict: str | list[DataSource] | None = None,
        num_frames: int = 16,
        frame_stride: int | None = None,
        target_fps: float | None = None,
        size: int | tuple[int, int] = 256,
        resize: bool = True,
        crop: Literal["random", "center"] = "random",
        flip: bool = False,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 64,
        seed: int = 0,
        epoch_length: int | None = None,
        decode_threads: int = 1,
        val_clips_per_video: int = 1,
        eval_num_frames: int | None = None,
        float_on_device: bool = True,
        pin_memory: bool | None = None,
        worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None,
    ):
        super().__init__()
        self.sources = {
            "train": _as_sources(train, "train"),
            "val": _as_sources(val, "val"),
            "test": _as_sources(test, "test"),
            "predict": _as_sources(predict, "predict"),
        }
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if frame_stride is not None and target_fps is not None:
            raise ValueError("give either frame_stride or target_fps, not both")
        if frame_stride is not None and frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        out_hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if len(out_hw) != 2 or min(out_hw) < 1:
            raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("seed", seed, 0),
            ("decode_threads", decode_threads, 1),
            ("val_clips_per_video", val_clips_per_video, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
        for source in self.sources["train"]:
            if not (np.isfinite(source.weight) and source.weight >= 0):
                raise ValueError(f"train source {source.path!r}: weight must be finite and >= 0, got {source.weight}")
        if self.sources["train"]:
            sampling.normalized_weights([s.weight for s in self.sources["train"]])
        self.spec = ClipSpec(
            num_frames=num_frames,
            frame_stride=frame_stride,
            target_fps=target_fps,
            out_hw=out_hw,  # type: ignore[arg-type]
            resize=resize,
            decode_threads=decode_threads,
        )
        if eval_num_frames is not None and eval_num_frames < 1:
            raise ValueError(f"eval_num_frames must be >= 1, got {eval_num_frames}")
        self.eval_spec = replace(self.spec, num_frames=eval_num_frames) if eval_num_frames else self.spec
        self.crop = crop
        self.flip = flip
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_length = epoch_length
        self.val_clips_per_video = val_clips_per_video
        self.float_on_device = float_on_device
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.worker_start_method = worker_start_method
        # Rows: per stage, the main process and each worker (see _StreamBase).
        self.skips = SkipCounter(self.skip_reasons, num_slots=len(STAGES) * (num_workers + 1))
        self._epoch = 0
        self._shards: dict[str, list[tuple[str, str | None]]] = {}
        self._train_loader: VideoLoader | None = None
        self._pending_loader_state: dict[str, int] | None = None

    # -- distributed context -------------------------------------------------------------------

    def rank_and_world_size(self) -> tuple[int, int]:
        """This process's rank and the world size: from the Trainer, else torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next training iteration when no Trainer drives this module (a Trainer's
        ``current_epoch`` takes precedence). Like ``DistributedSampler.set_epoch``: without it every
        iteration repeats epoch 0."""
        self._epoch = int(epoch)

    def current_epoch(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.current_epoch)
        return self._epoch

    # -- shards --------------------------------------------------------------------------------

    def shards(self, stage: str) -> list[tuple[str, str | None]]:
        """``(tar path, source name)`` of a stage's shards, in a fixed order (resolved once)."""
        if stage not in self._shards:
            found = []
            for source in self.sources[stage]:
                found.extend((path, source.name) for path in expand_shard_spec(source.path))
            self._shards[stage] = found
        return self._shards[stage]

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard specs of the stage (errors name a spec that matches nothing)."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in wanted.get(stage or "", STAGES):
            self.shards(name)

    def train_num_batches(self) -> int:
        """Training batches per rank and epoch (``epoch_length``, or from the manifests)."""
        if self.epoch_length is not None:
            return self.epoch_length
        _, world = self.rank_and_world_size()
        samples = sum(count_samples(source.path)[0] for source in self.sources["train"])
        return max(1, samples // (self.batch_size * world))

    # -- loaders -------------------------------------------------------------------------------

    def _batches_consumed(self, loader: VideoLoader) -> int | None:
        """Batches the training loop has taken this epoch (prefetched batches excluded), while fitting.

        Lightning's count, not the loader's: batches a fetcher or a DataLoader iterator has taken
        ahead of the loop are not consumed. It holds during the validation runs inside ``fit`` too
        (checkpoints written at the end of validation).
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """What turns a list of stream items into a batch (a top-level function or partial: cheap to
        pickle into workers)."""
        return functools.partial(collate_clips, normalize=not self.float_on_device)

    def train_stream_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`train_stream_class` beyond those every train stream takes."""
        return {"crop": self.crop, "flip": self.flip}

    def eval_stream_kwargs(self, stage: str) -> dict[str, Any]:
        """Keyword arguments of :attr:`eval_stream_class` for ``stage`` beyond those every eval stream takes."""
        return {}

    def _loader(self, dataset: IterableDataset, batch_size: int, stateful: bool) -> VideoLoader:
        loader = VideoLoader(
            dataset,
            epoch_fn=self.current_epoch,
            consumed_fn=self._batches_consumed if stateful else None,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
            pin_memory=self.pin_memory,
            drop_last=False,
            multiprocessing_context=self.worker_start_method if self.num_workers > 0 else None,
        )
        return loader

    def train_dataloader(self) -> VideoLoader:
        if not self.sources["train"]:
            raise ValueError(f"{type(self).__name__} has no train shards: set `train`")
        rank, world = self.rank_and_world_size()
        by_source = []
        for source in self.sources["train"]:
            by_source.append((expand_shard_spec(source.path), source.name))
        dataset = self.train_stream_class(
            by_source,
            [s.weight for s in self.sources["train"]],
            self.spec,
            shuffle_buffer=self.shuffle_buffer,
            batch_size=self.batch_size,
            num_batches=self.train_num_batches(),
            seed=self.seed,
            rank=rank,
            world_size=world,
            counter=self.skips,
            workers_per_stage=self.num_workers,
            expected_samples=manifest_sample_counts([path for shards, _ in by_source for path in shards]),
            **self.train_stream_kwargs(),
        )
        loader = self._loader(dataset, self.batch_size, stateful=True)
        if self._pending_loader_state is not None:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def _eval_loader(self, stage: str) -> VideoLoader | list:
        if not self.sources[stage]:
            return []
        rank, world = self.rank_and_world_size()
        dataset = self.eval_stream_class(
            self.shards(stage),
            self.eval_spec,
            self.val_clips_per_video,
            rank=rank,
            world_size=world,
            counter=self.skips,
            stage=stage,
            workers_per_stage=self.num_workers,
            expected_samples=manifest_sample_counts([path for path, _ in self.shards(stage)]),
            **self.eval_stream_kwargs(stage),
        )
        return self._loader(dataset, self.val_batch_size, stateful=False)

    def val_dataloader(self) -> VideoLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> VideoLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> VideoLoader | list:
        return self._eval_loader("predict")

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Turn a uint8 ``video`` into float in [-1, 1] on the device (see ``float_on_device``)."""
        if isinstance(batch, dict) and B.VIDEO in batch:
            batch[B.VIDEO] = normalize_video(batch[B.VIDEO])
        return batch

    # -- bad input and state -------------------------------------------------------------------

    def skipped_counts(self) -> dict[str, int]:
        """Samples skipped so far in this process (all stages, all workers), by reason."""
        return self.skips.totals()

    def skipped_counts_by_stage(self) -> dict[str, dict[str, int]]:
        """Like :meth:`skipped_counts`, per stage (train, val, test, predict)."""
        rows = self.num_workers + 1
        return {stage: self.skips.slot_totals(range(i * rows, (i + 1) * rows)) for i, stage in enumerate(STAGES)}

    def state_dict(self) -> dict[str, Any]:
        """Skip counts and the training position (epoch, batches consumed), for checkpoints."""
        state: dict[str, Any] = {"skips": self.skips.state_dict(), "epoch": self.current_epoch()}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next training iteration resumes at the saved batch."""
        self.skips.load_state_dict(state_dict["skips"])
        self._epoch = int(state_dict.get("epoch", 0))
        loader_state = state_dict.get("train_loader")
        if loader_state is not None:
            if self._train_loader is not None:
                self._train_loader.load_state_dict(loader_state)
            else:
                self._pending_loader_state = loader_state
