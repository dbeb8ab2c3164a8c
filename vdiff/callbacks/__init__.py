"""Callbacks: EMA, LoRA injection, sample videos, video-quality validation."""

from vdiff.callbacks.ema import EMA
from vdiff.callbacks.sample_videos import SampleVideos

__all__ = ["EMA", "SampleVideos"]
