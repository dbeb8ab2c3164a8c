"""The option groups of :class:`~vdiff.data.datamodule.VideoDataModule`: how frames are decoded, how training clips
are augmented and how batches travel to the model. A recipe reads::

    data:
      class_path: vdiff.data.datamodule.VideoDataModule
      init_args:
        train: data/train
        num_frames: 25
        size: [576, 1024]
        target_fps: 10.0
        decoding: {resize: true, threads: 1}
        augmentation: {crop: center, flip: false}
        loader: {prefetch_factor: 4}

and a command line ``--data.init_args.augmentation.flip true``. Fields left out keep their defaults; a mapping (as
YAML gives it) or None is accepted wherever a group is (:func:`option_group`).

Migration from the flat arguments: ``resize`` and ``decode_threads`` (now ``decoding.threads``) go under
``decoding:``; ``crop`` and ``flip`` under ``augmentation:``; ``pin_memory``, ``prefetch_factor``,
``worker_start_method`` and ``float_on_device`` under ``loader:``. What forms a clip (``num_frames``,
``frame_stride``, ``target_fps``, ``size``) and ``batch_size``, ``num_workers`` stay where they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Group = TypeVar("Group")


def option_group(cls: type[Group], value: Group | Mapping[str, Any] | None, what: str) -> Group:
    """The ``cls`` group a data module was given: ``value`` itself, the defaults for None, or a mapping of fields (as
    YAML gives it); an unknown field is a ValueError naming the group (``what``), the field and the valid ones."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {unknown}; the fields are {names}")
        return cls(**value)
    raise TypeError(f"{what}: expected {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


@dataclass(frozen=True)
class Decoding:
    """How a clip's frames are decoded to the data module's ``size`` (which frames form a clip is the data module's
    ``num_frames``, ``frame_stride`` or ``target_fps``).

    resize: scale frames (keeping aspect) to the smallest size covering ``size``, then crop; False crops from the
        source resolution (smaller frames are skipped as ``too_small``).
    threads: PyAV decoding threads per reader (keep small: workers decode in parallel).
    """

    resize: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        if int(self.threads) != self.threads or self.threads < 1:
            raise ValueError(f"decoding: threads must be an integer >= 1, got {self.threads!r}")


@dataclass(frozen=True)
class Augmentation:
    """Random changes of training clips (evaluation clips always take the center crop and are never flipped).

    crop: ``random`` or ``center``. Crops move ``goal`` points; a goal outside the crop becomes invalid.
    flip: randomly mirror clips left-right, mirroring the actions too (off by default: driving is not
        mirror-symmetric, e.g. which side of the road traffic keeps to).
    """

    crop: Literal["random", "center"] = "random"
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise ValueError(f"augmentation: crop must be 'random' or 'center', got {self.crop!r}")


@dataclass(frozen=True)
class LoaderOptions:
    """How batches travel from the reading workers to the model (``num_workers`` and ``batch_size`` are the data
    module's own arguments).

    pin_memory: pin batches for faster host-to-GPU copies (None: when CUDA is available).
    prefetch_factor: batches each worker prepares ahead (None: torch's default, 2; only with workers). Workers are
        not persistent: the loader hands each epoch's stream to fresh workers, so an epoch (and a resume) always
        starts from its own seed.
    worker_start_method: how DataLoader workers start (None: the platform's, fork on Linux); ``spawn`` /
        ``forkserver`` where forking is unsafe, at the cost of workers importing torch.
    float_on_device: keep ``video`` uint8 through the DataLoader (4x less to copy between processes and to the
        accelerator) and convert it to float in ``on_after_batch_transfer``; False converts in the workers, so the
        loaders alone yield contract batches.
    """

    pin_memory: bool | None = None
    prefetch_factor: int | None = None
    worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None
    float_on_device: bool = True

    def __post_init__(self) -> None:
        factor = self.prefetch_factor
        if factor is not None and (int(factor) != factor or factor < 1):
            raise ValueError(f"loader: prefetch_factor must be an integer >= 1 or None, got {factor!r}")
        if self.worker_start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"loader: worker_start_method must be fork, spawn, forkserver or null, got "
                             f"{self.worker_start_method!r}")
