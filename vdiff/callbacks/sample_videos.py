"""Log sampled videos to TensorBoard (and mp4 files) during training.

Talks to the LightningModule only through ``generate(batch, **options) -> Generated`` (see
``vdiff.lit.base``). Each panel shows ground truth | sample side by side; frames that were given
(conditioning) carry a green border, generated frames a red one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor

from vdiff.lit.base import Generated


class GeneratesVideo(Protocol):
    def generate(self, batch: dict[str, Any], **options: Any) -> Generated: ...


GIVEN_COLOUR = (0.0, 1.0, 0.0)
GENERATED_COLOUR = (1.0, 0.0, 0.0)


def mark_frames(video: Tensor, given_frames: Tensor, width: int = 1) -> Tensor:
    """Paint a border on every frame: green where given, red where generated.

    video ``(B, T, 3, H, W)`` in [0, 1]; given_frames bool ``(B, T)``. Returns a new tensor.
    """
    out = video.clone()
    given = torch.tensor(GIVEN_COLOUR, device=video.device).view(1, 1, 3, 1, 1)
    generated = torch.tensor(GENERATED_COLOUR, device=video.device).view(1, 1, 3, 1, 1)
    colour = torch.where(given_frames.view(*given_frames.shape, 1, 1, 1), given, generated)  # (B, T, 3, 1, 1)
    border = torch.zeros(video.shape[-2:], dtype=torch.bool, device=video.device)
    border[:width, :] = border[-width:, :] = True
    border[:, :width] = border[:, -width:] = True
    return torch.where(border, colour.expand_as(out), out)


def panel(generated: Generated) -> Tensor:
    """Side-by-side ``(B, T, 3, H, 2W)`` (or ``W`` without target) in [0, 1] for logging."""
    sample = mark_frames((generated.video.float().clamp(-1, 1) + 1) / 2, generated.given_frames)
    if generated.target is None:
        return sample
    target = (generated.target.float().clamp(-1, 1) + 1) / 2
    return torch.cat([target, sample], dim=-1)


class SampleVideos(L.Callback):
    """Every ``every_n_epochs`` validation epochs, sample the first validation batch and log it.

    Args:
        every_n_epochs: how often (in validation runs) to sample.
        num_videos: how many clips of the first validation batch to show.
        fps: playback rate of the logged videos.
        save_mp4: also write ``<log_dir>/samples/epoch=E-step=S.mp4``.
        generate_options: extra keyword arguments for ``generate`` (e.g. ``{"steps": 25}``).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_videos: int = 4,
        fps: int = 8,
        save_mp4: bool = True,
        generate_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.every_n_epochs = max(1, every_n_epochs)
        self.num_videos = num_videos
        self.fps = fps
        self.save_mp4 = save_mp4
        self.generate_options = dict(generate_options or {})
        self._batch: dict[str, Any] | None = None
        self._runs = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._batch = {
                k: (v[: self.num_videos] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()
            }

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None:
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_epochs:
            return
        if not hasattr(pl_module, "generate"):
            raise TypeError(f"SampleVideos needs {type(pl_module).__name__}.generate(batch) -> Generated")
        generator = torch.Generator(device=pl_module.device).manual_seed(0)
        with torch.no_grad():
            generated = pl_module.generate(self._batch, generator=generator, **self.generate_options)
        video = panel(generated).cpu()  # (B, T, 3, H, W') in [0, 1]
        if trainer.is_global_zero:
            self._log(trainer, video)

    def _log(self, trainer: L.Trainer, video: Tensor) -> None:
        tag = "samples"
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_video"):  # TensorBoard (needs moviepy<2 to write anything)
                experiment.add_video(tag, video, global_step=trainer.global_step, fps=self.fps)
        if self.save_mp4 and trainer.log_dir:
            from vdiff.data.video_io import encode_video

            folder = Path(trainer.log_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            grid = torch.cat(list(video), dim=-2)  # stack clips vertically: (T, 3, B*H, W')
            frames = (grid.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            h, w = frames.shape[1:3]
            frames = frames[:, : h - h % 2, : w - w % 2]  # yuv420p needs even sizes
            name = f"epoch={trainer.current_epoch}-step={trainer.global_step}.mp4"
            (folder / name).write_bytes(encode_video(frames, fps=self.fps))
