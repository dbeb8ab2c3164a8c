"""Shared pieces of the LightningModule/CLI tests: tiny synthetic data and fast model overrides."""

from __future__ import annotations

from pathlib import Path

# A VDT small enough to train in seconds on 2 CPU cores, on 32x32 synthetic clips.
TINY_VDT = [
    "--model.init_args.patch_size", "8",
    "--model.init_args.depth", "2",
    "--model.init_args.hidden_size", "32",
    "--model.init_args.num_heads", "2",
    "--model.init_args.val_steps", "3",
]


def tiny_synthetic_data(cache: Path, frames: int = 8) -> list[str]:
    """CLI overrides that point the quickstart's data module at a tiny synthetic set in ``cache``."""
    return [
        "--data.init_args.cache_dir", str(cache),
        "--data.init_args.num_videos", "8",
        "--data.init_args.val_videos", "4",
        "--data.init_args.video_frames", str(frames),
        "--data.init_args.video_size", "32",
        "--data.init_args.size", "32",
        "--data.init_args.num_frames", str(frames),
        "--data.init_args.batch_size", "2",
        "--data.init_args.val_batch_size", "4",
        "--data.init_args.num_workers", "0",
        "--data.init_args.shuffle_buffer", "4",
    ]


def quiet_trainer(root: Path, steps: int = 2) -> list[str]:
    """Trainer overrides: a few steps, no time limit, everything written under ``root``."""
    return [
        "--trainer.max_steps", str(steps),
        "--trainer.max_time", "null",
        "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(root),
    ]
