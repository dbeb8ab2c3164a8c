"""Log sampled videos to TensorBoard (and mp4 files) during training.

Talks to the LightningModule only through ``generate(batch, **options) -> Generated`` (see
``vdiff.lit.base``). Each panel shows ground truth | sample side by side; frames that were given
(conditioning) carry a green border, generated frames a red one (:func:`vdiff.lit.frame_marks.mark_frames`).

The conditions are fixed for the whole run, so panels of different steps compare like with like: the
first ``num_videos`` clips of the first validation batch ever seen are kept (on the CPU) and sampled
with the same seed every time. Both, and the count of validation runs, are the callback's state, so
a resumed run keeps sampling the same clips with the same noise even when its validation data differ.
In the checkpoint, float clips that came from 8-bit video are stored as uint8 (exactly: decoding
repeats :func:`vdiff.data.transforms.normalize_video`'s arithmetic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor

from vdiff.lit.base import Generated
from vdiff.lit.frame_marks import GENERATED_COLOUR, GIVEN_COLOUR, mark_frames  # noqa: F401 - colours: older code's names


class GeneratesVideo(Protocol):
    def generate(self, batch: dict[str, Any], **options: Any) -> Generated: ...


def panel(generated: Generated) -> Tensor:
    """Side-by-side ``(B, T, 3, H, 2W)`` (or ``W`` without target) in [0, 1] for logging."""
    sample = mark_frames((generated.video.float().clamp(-1, 1) + 1) / 2, generated.given_frames)
    if generated.target is None:
        return sample
    target = (generated.target.float().clamp(-1, 1) + 1) / 2
    return torch.cat([target, sample], dim=-1)


def first_clips(value: Any, n: int, batch_size: int) -> Any:
    """The first ``n`` clips of a batch entry (tensors and lists of length ``batch_size``, also nested
    in dicts such as ``actions``), detached on the CPU; anything else as is."""
    if isinstance(value, Tensor):
        return value[:n].detach().cpu().clone() if value.ndim and value.shape[0] == batch_size else value.detach().cpu()
    if isinstance(value, list) and len(value) == batch_size:
        return value[:n]
    if isinstance(value, dict):
        return {k: first_clips(v, n, batch_size) for k, v in value.items()}
    return value


UINT8_KEY = "__uint8_video__"  # a float tensor stored as uint8 in the callback state


def pack(value: Any) -> Any:
    """For the checkpoint: float tensors that are exactly ``normalize_video`` of uint8 frames become uint8."""
    if isinstance(value, Tensor) and value.dtype == torch.float32 and value.numel():
        q = ((value + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if torch.equal(unpack({UINT8_KEY: q}), value):
            return {UINT8_KEY: q}
        return value
    if isinstance(value, dict):
        return {k: pack(v) for k, v in value.items()}
    return value


def unpack(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {UINT8_KEY}:
            return value[UINT8_KEY].to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)  # normalize_video's arithmetic
        return {k: unpack(v) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class SampleVideos(L.Callback):
    """Every ``every_n_epochs`` validation runs, sample the fixed conditions and log them.

    Args:
        every_n_epochs: how often (in validation runs) to sample.
        num_videos: how many clips of the first validation batch to keep and show.
        fps: playback rate of the logged videos.
        save_mp4: also write ``<log_dir>/samples/epoch=E-step=S.mp4``.
        generate_options: extra keyword arguments for ``generate`` (e.g. ``{"steps": 25}``).
        seed: seed of the sampling noise, the same at every run.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_videos: int = 4,
        fps: int = 8,
        save_mp4: bool = True,
        generate_options: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_epochs = max(1, every_n_epochs)
        self.num_videos = num_videos
        self.fps = fps
        self.save_mp4 = save_mp4
        self.generate_options = dict(generate_options or {})
        self.seed = seed
        self._batch: dict[str, Any] | None = None  # the fixed conditions, on the CPU
        self._runs = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._batch is None and batch_idx == 0 and dataloader_idx == 0:
            sizes = [v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.ndim]
            batch_size = sizes[0] if sizes else len(next((v for v in batch.values() if isinstance(v, list)), []))
            self._batch = {k: first_clips(v, self.num_videos, batch_size) for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self._runs, "seed": self.seed, "batch": pack(self._batch) if self._batch is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._runs = int(state_dict.get("runs", 0))
        self.seed = int(state_dict.get("seed", self.seed))
        batch = state_dict.get("batch")
        self._batch = unpack(batch) if batch is not None else None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None:
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_epochs:
            return
        if not hasattr(pl_module, "generate"):
            raise TypeError(f"SampleVideos needs {type(pl_module).__name__}.generate(batch) -> Generated")
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with torch.no_grad():
            batch = to_device(self._batch, pl_module.device)
            generated = pl_module.generate(batch, generator=generator, **self.generate_options)
        video = panel(generated).cpu()  # (B, T, 3, H, W') in [0, 1]
        # trainer.log_dir broadcasts from rank 0 under DDP/FSDP: every rank must ask, not only rank 0.
        log_dir = trainer.log_dir if self.save_mp4 else None
        if trainer.is_global_zero:
            self._log(trainer, video, log_dir)

    def _log(self, trainer: L.Trainer, video: Tensor, log_dir: str | None) -> None:
        tag = "samples"
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_video"):  # TensorBoard (needs moviepy<2 to write anything)
                experiment.add_video(tag, video, global_step=trainer.global_step, fps=self.fps)
        if self.save_mp4 and log_dir:
            from vdiff.data.video_io import encode_video

            folder = Path(log_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            grid = torch.cat(list(video), dim=-2)  # stack clips vertically: (T, 3, B*H, W')
            frames = (grid.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            h, w = frames.shape[1:3]
            frames = frames[:, : h - h % 2, : w - w % 2]  # yuv420p needs even sizes
            name = f"epoch={trainer.current_epoch}-step={trainer.global_step}.mp4"
            (folder / name).write_bytes(encode_video(frames, fps=self.fps))
