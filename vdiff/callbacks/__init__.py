"""Callbacks that work with every vdiff LightningModule through the documented protocol
(docs/architecture.md, "The callback protocol"): EMA, LoRA injection (peft), video-quality metrics
(PSNR/SSIM/LPIPS/FVD/FID), sample videos, and scoring the saved checkpoint after training."""

from vdiff.callbacks.checkpoint_eval import EvaluateCheckpoint
from vdiff.callbacks.ema import EMA
from vdiff.callbacks.lora import LoRA
from vdiff.callbacks.sample_videos import SampleVideos
from vdiff.callbacks.video_quality import VideoQuality

__all__ = ["EMA", "EvaluateCheckpoint", "LoRA", "SampleVideos", "VideoQuality"]
