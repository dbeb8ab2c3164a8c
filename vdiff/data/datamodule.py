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

The parts live in modules of their own: :mod:`vdiff.data.sources` (``DataSource``),
:mod:`vdiff.data.clips` (one raw sample -> one clip, ``Skip``), :mod:`vdiff.data.stream_base`,
:mod:`vdiff.data.train_stream` and :mod:`vdiff.data.eval_stream` (the datasets) and
:mod:`vdiff.data.loader` (``VideoLoader``); this module assembles them into the LightningDataModule.

Why not webdataset's pipeline stages: ``ResampledShards``/``shuffle`` seed from worker info and
their own state, which cannot be replayed from (seed, epoch, rank, worker, index), and
``split_by_node``/``split_by_worker`` hang a reader that gets no shard. Shards are still webdataset
tars, read by :func:`vdiff.data.shards.iter_raw_samples`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import IterableDataset

from vdiff.data import batch as B
from vdiff.data import sampling
from vdiff.data.clips import BAD_JSON, MISSING_JSON, MISSING_VIDEO, TOO_SMALL, ClipSpec
from vdiff.data.eval_stream import EvalClipStream
from vdiff.data.frame_size import frame_size
from vdiff.data.loader import VideoLoader
from vdiff.data.options import Augmentation, Decoding, LoaderOptions, option_group
from vdiff.data.shards import NoShardsError, count_samples, expand_shard_spec, manifest_sample_counts
from vdiff.data.skips import SkipCounter
from vdiff.data.sources import DataSource, as_sources
from vdiff.data.stream_base import BAD_SHARD, STAGES, TRUNCATED_SHARD
from vdiff.data.train_stream import TrainClipStream
from vdiff.data.transforms import collate_clips, normalize_video
from vdiff.data.video_io import DECODE_ERROR_REASONS

# Why a sample was skipped, the columns of VideoDataModule.skips: the decoder's reasons plus the pipeline's own.
SKIP_REASONS: tuple[str, ...] = (
    *DECODE_ERROR_REASONS,
    MISSING_VIDEO,
    MISSING_JSON,
    BAD_JSON,
    TOO_SMALL,
    BAD_SHARD,
    TRUNCATED_SHARD,
)


MAX_AUTO_WORKERS = 8


# The data module's splits each Trainer stage reads.
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)
}


class DataPathError(FileNotFoundError):
    """A stage's shard spec names no shards: the path is missing, or holds no ``.tar`` shards. ``argument``:
    the data module's argument (``train``, ``val``...); ``detail``: what is wrong and the ``vdiff data``
    command that makes the shards. ``str()`` is ``"{argument}: {detail}"`` (``vdiff fit`` prints
    ``data.init_args.{argument}: {detail}``)."""

    def __init__(self, argument: str, detail: str) -> None:
        super().__init__(f"{argument}: {detail}")
        self.argument = argument
        self.detail = detail


def _missing_shards_detail(err: NoShardsError) -> str:
    """What :class:`DataPathError` says about a spec that matched nothing, with the command that makes shards."""
    spec = err.spec
    if not err.missing and not os.path.isdir(spec):
        return str(err)  # a glob that matched nothing
    if os.path.isdir(spec) and "subfolders" in str(err):
        return str(err)  # a folder of shard sets: name one
    what = "does not exist" if err.missing else "holds no shards (.tar files)"
    parent, name = os.path.split(os.path.normpath(spec))
    if name in ("train", "val"):  # the layout `--val-fraction` writes
        make = f"`vdiff data shards VIDEO_FOLDER --out {parent or '.'} --val-fraction 0.1` writes its train/ and val/"
    else:
        make = f"`vdiff data shards VIDEO_FOLDER --out {spec}`"
    return f"{spec} {what}; make shards from a folder of videos: {make} (`vdiff data --help` lists other sources)"


def auto_num_workers() -> int:
    """``num_workers: auto``: 0 without a CUDA device; else the CPU cores this process may use divided by the
    GPUs of the node (one rank per GPU), less one for the rank itself, between 1 and :data:`MAX_AUTO_WORKERS`."""
    if not torch.cuda.is_available():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    per_rank = cores // max(1, torch.cuda.device_count())
    return max(1, min(MAX_AUTO_WORKERS, per_rank - 1))


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
        decoding: how frames are decoded to ``size`` (:class:`~vdiff.data.options.Decoding`: ``resize``,
            ``threads``).
        augmentation: random changes of training clips (:class:`~vdiff.data.options.Augmentation`: ``crop``,
            ``flip``); evaluation always crops the center.
        batch_size: training clips per batch and rank.
        val_batch_size: clips per batch in validation, test and predict (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank, or ``"auto"``: none without a CUDA device (on CPU,
            decoding in the main process beats workers competing with torch's threads), else one per CPU core
            available to each GPU's rank, less one for the rank itself, at most 8 (:func:`auto_num_workers`).
            A GPU needs workers: decoding in the training process leaves it idle between steps.
        loader: how batches travel (:class:`~vdiff.data.options.LoaderOptions`: ``pin_memory``,
            ``prefetch_factor``, ``worker_start_method``, ``float_on_device``).
        shuffle_buffer: training samples (compressed, per source and worker) held for shuffling;
            memory is about ``shuffle_buffer`` x mean sample size per source and worker.
        seed: seed of every random choice of the training pipeline.
        epoch_length: training batches per rank and epoch; default: the samples of all training
            sources (from their manifests, else by reading the shards) / (``batch_size`` x world size).
        val_clips_per_video: evaluation clips per video, evenly spaced from the first frame to the
            last possible start; with more than one, keys become ``<key>/clip<j>``.
        eval_num_frames: frames per clip in validation, test and predict (default: ``num_frames``);
            e.g. train on 16-frame clips and evaluate 2 -> 28 on 30-frame clips (MCVD's protocol).

    The groups were flat arguments before (``resize``, ``crop``, ``pin_memory``...): see :mod:`vdiff.data.options` for
    where each went.

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
        decoding: Decoding | None = None,
        augmentation: Augmentation | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int | Literal["auto"] = 2,
        loader: LoaderOptions | None = None,
        shuffle_buffer: int = 64,
        seed: int = 0,
        epoch_length: int | None = None,
        val_clips_per_video: int = 1,
        eval_num_frames: int | None = None,
    ):
        super().__init__()
        self.sources = {
            "train": as_sources(train, "train"),
            "val": as_sources(val, "val"),
            "test": as_sources(test, "test"),
            "predict": as_sources(predict, "predict"),
        }
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if frame_stride is not None and target_fps is not None:
            raise ValueError("give either frame_stride or target_fps, not both")
        if frame_stride is not None and frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        self.decoding = option_group(Decoding, decoding, "decoding")
        self.augmentation = option_group(Augmentation, augmentation, "augmentation")
        self.loader = option_group(LoaderOptions, loader, "loader")
        try:
            out_hw = frame_size(size)  # the meaning of every tool's --size (vdiff.data.frame_size)
        except ValueError:
            raise ValueError(f"size must be a positive int (a square) or (H, W), got {size!r}") from None
        if isinstance(num_workers, str):
            if num_workers != "auto":
                raise ValueError(f"num_workers must be an integer >= 0 or 'auto', got {num_workers!r}")
            num_workers = auto_num_workers()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("seed", seed, 0),
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
            resize=self.decoding.resize,
            decode_threads=self.decoding.threads,
        )
        if eval_num_frames is not None and eval_num_frames < 1:
            raise ValueError(f"eval_num_frames must be >= 1, got {eval_num_frames}")
        self.eval_spec = replace(self.spec, num_frames=eval_num_frames) if eval_num_frames else self.spec
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_length = epoch_length
        self.val_clips_per_video = val_clips_per_video
        self.pin_memory = torch.cuda.is_available() if self.loader.pin_memory is None else self.loader.pin_memory
        # Rows: per stage, the main process and each worker (see ClipStreamBase).
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
        """``(tar path, source name)`` of a stage's shards, in a fixed order (resolved once). A source that
        names no shard raises :class:`DataPathError` naming the argument (``train``...) and the fix."""
        if stage not in self._shards:
            found = []
            for source in self.sources[stage]:
                try:
                    paths = expand_shard_spec(source.path)
                except NoShardsError as err:
                    raise DataPathError(stage, _missing_shards_detail(err)) from err
                found.extend((path, source.name) for path in paths)
            self._shards[stage] = found
        return self._shards[stage]

    def _resolve_stage(self, stage: str | None, leave_out: tuple[str, ...] = ()) -> None:
        for name in STAGE_SPLITS.get(stage or "", STAGES):
            if name not in leave_out:
                self.shards(name)

    def check_data(self, stage: str | None = None) -> None:
        """Check, before the Trainer is built, that every shard spec the Trainer stage (``fit``, ``validate``...)
        reads names shards: :class:`DataPathError` otherwise. ``vdiff fit|validate|test|predict`` calls it, so a
        missing or empty data folder is one message before anything starts. A data module that writes shards in
        ``prepare_data`` leaves those out (they do not exist yet)."""
        self._resolve_stage(stage)

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard specs of the stage: a spec that matches nothing raises :class:`DataPathError` (before
        any training) naming the argument, whether the path is missing or holds no shards, and the fix."""
        self._resolve_stage(stage)

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
        return functools.partial(collate_clips, normalize=not self.loader.float_on_device)

    def train_stream_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`train_stream_class` beyond those every train stream takes."""
        return {"crop": self.augmentation.crop, "flip": self.augmentation.flip}

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
            multiprocessing_context=self.loader.worker_start_method if self.num_workers > 0 else None,
            prefetch_factor=self.loader.prefetch_factor if self.num_workers > 0 else None,
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
        """Turn a uint8 ``video`` into float in [-1, 1] on the device (see ``float_on_device``), in the dtype the
        trainer's precision feeds the model (bfloat16 under ``bf16-true``; Lightning converts floating inputs
        before the transfer, when this video was still uint8)."""
        if isinstance(batch, dict) and B.VIDEO in batch:
            video = normalize_video(batch[B.VIDEO])
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                video = trainer.precision_plugin.convert_input(video)
            batch[B.VIDEO] = video
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
