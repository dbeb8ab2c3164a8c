"""Shared pieces of the LightningModule/CLI tests: tiny synthetic data and fast model overrides."""

from __future__ import annotations

from pathlib import Path

# A VDT small enough to train in seconds on 2 CPU cores, on 32x32 synthetic clips.
TINY_VDT = [
    "--model.init_args.net.patch_size", "8",
    "--model.init_args.net.depth", "2",
    "--model.init_args.net.hidden_size", "32",
    "--model.init_args.net.num_heads", "2",
    "--model.init_args.sampler.steps", "3",
]

NET_FIELDS = ("patch_size", "depth", "hidden_size", "num_heads", "mlp_ratio", "temporal_pos", "spatial_pos", "qk_norm",
              "gradient_checkpointing", "in_channels")
PROCESS_FIELDS = ("num_timesteps", "beta_schedule", "prediction", "learn_sigma")
SAMPLER_FIELDS = {"val_sampler": "name", "val_steps": "steps", "val_eta": "eta"}
OPTIMIZER_FIELDS = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "lr_decay")
PROTOCOL_FIELDS = {"val_task": "task", "val_given_frames": "given_frames", "val_seed": "seed",
                   "eval_num_frames": "num_frames", "eval_samples_per_video": "samples_per_video",
                   "fvd_frames": "fvd_frames"}


def vdt_module(net: str = "VDT-S/2", configure: bool = True, **flat):
    """A VDTModule from flat keyword arguments (network sizes, DDPM process, sampler and protocol
    settings side by side, as tests like to write them), sorted into the module's groups."""
    from vdiff.diffusion.ddpm import GaussianDiffusion
    from vdiff.diffusion.sampling import SamplerConfig
    from vdiff.lit.evaluation import EvalProtocol
    from vdiff.lit.optim import OptimizerSettings
    from vdiff.lit.vdt import VDTModule
    from vdiff.models.vdt import VDTConfig

    config = VDTConfig.from_name(net, **{k: flat.pop(k) for k in NET_FIELDS if k in flat})
    process = {k: flat.pop(k) for k in PROCESS_FIELDS if k in flat}
    process.setdefault("learn_sigma", True)
    sampler = {v: flat.pop(k) for k, v in SAMPLER_FIELDS.items() if k in flat}
    protocol = {v: flat.pop(k) for k, v in PROTOCOL_FIELDS.items() if k in flat}
    optimizer = OptimizerSettings.of({k: flat.pop(k) for k in OPTIMIZER_FIELDS if k in flat}, VDTModule.DEFAULT_OPTIMIZER)
    module = VDTModule(
        net=config, diffusion=GaussianDiffusion(**process), sampler=SamplerConfig(**sampler),
        evaluation=EvalProtocol(**protocol), optimizer=optimizer, **flat,
    )
    if configure:
        module.configure_model()
    return module


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
