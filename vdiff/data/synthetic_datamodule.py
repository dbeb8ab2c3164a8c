"""A VideoDataModule over synthetic driving shards that it writes itself on first use.

The quickstart and the tests need data without a download: :class:`SyntheticDrivingDataModule`
renders procedurally generated driving video (:mod:`vdiff.data.synthetic`) into a cache folder in
``prepare_data`` (once; later runs only read the manifests) and then behaves exactly like a
:class:`~vdiff.data.datamodule.VideoDataModule` over ``<cache>/train`` and ``<cache>/val``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vdiff.cache import cache_root
from vdiff.data.datamodule import VideoDataModule
from vdiff.data.synthetic import ensure_synthetic_splits


def default_cache_dir() -> Path:
    """``$VDIFF_CACHE`` or ``$XDG_CACHE_HOME/vdiff`` or ``~/.cache/vdiff``."""
    return cache_root()


class SyntheticDrivingDataModule(VideoDataModule):
    """Synthetic driving clips (with truthful actions), generated into a cache on first use.

    Args:
        num_videos: training videos (seeds ``(synth_seed, i)``).
        val_videos: held-out validation videos (disjoint seeds).
        video_frames: frames per generated video (clips of ``num_frames`` are cut from them).
        video_size: side of the generated square videos, in pixels (even).
        video_fps: frame rate of the generated videos.
        synth_seed: seed of the generator.
        cache_dir: where the shards go; default ``$VDIFF_CACHE`` or ``~/.cache/vdiff``. The set
            lives in a sub-folder named by its parameters, so different settings never collide.
        synth_workers: processes that render and encode on first use.
        synth_options: :class:`~vdiff.data.synthetic.DriveConfig` fields, e.g. ``{"stop_prob": 0}``.
        **kwargs: every :class:`VideoDataModule` argument except ``train`` and ``val``.
    """

    def __init__(
        self,
        num_videos: int = 256,
        val_videos: int = 32,
        video_frames: int = 24,
        video_size: int = 64,
        video_fps: float = 10.0,
        synth_seed: int = 0,
        cache_dir: str | None = None,
        synth_workers: int = 1,
        synth_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("train", "val"):
            if kwargs.get(name) is not None:
                raise TypeError(f"SyntheticDrivingDataModule chooses {name!r} itself (it writes the shards)")
        options = dict(synth_options or {})
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        name = f"synthetic-drive-n{num_videos}-v{val_videos}-t{video_frames}-s{video_size}-fps{video_fps:g}-seed{synth_seed}"
        if options:
            digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
            name += f"-opt{digest}"
        self.synthetic_root = root / name
        self.synthetic_args = dict(
            num_videos=num_videos, num_frames=video_frames, size=video_size, seed=synth_seed,
            val_videos=val_videos, fps=video_fps, workers=synth_workers, **options,
        )
        super().__init__(
            train=str(self.synthetic_root / "train"),
            val=str(self.synthetic_root / "val") if val_videos else None,
            **kwargs,
        )

    def check_data(self, stage: str | None = None) -> None:
        """As :meth:`VideoDataModule.check_data`, leaving out ``train`` and ``val``: ``prepare_data`` writes them."""
        self._resolve_stage(stage, leave_out=("train", "val"))

    def prepare_data(self) -> None:
        """Write the shards unless the cache already holds the same set (called on one process)."""
        ensure_synthetic_splits(self.synthetic_root, progress=True, **self.synthetic_args)
        super().prepare_data()
