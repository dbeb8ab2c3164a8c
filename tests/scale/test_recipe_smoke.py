"""Strategy x precision smoke matrix: 2 training steps of a model recipe on CPU with tiny overrides, through
the ``vdiff`` command, for every strategy block that runs on CPU (recipes/strategy/ddp.yaml on 2 processes,
model_parallel_cpu.yaml on 2 processes) and every precision a recipe declares (32-true, bf16-mixed,
bf16-true); a sharded run's checkpoint folder consolidates into a file load_module reads. fsdp.yaml and
model_parallel.yaml need GPUs (they only parse here: tests/scale/test_scaling_options.py).

Callbacks: the strategy runs keep the recipe's EMA and SampleVideos (every rank samples: a sharded network's
forward needs them all) and drop EvaluateCheckpoint, which cannot read a sharded checkpoint folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lit.helpers import TINY_VDT, quiet_trainer, tiny_synthetic_data
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
EMA_ONLY = '[{"class_path": "vdiff.callbacks.EMA", "init_args": {"decay": 0.9}}]'
EMA_AND_SAMPLES = (
    '[{"class_path": "vdiff.callbacks.EMA", "init_args": {"decay": 0.9}}, '
    '{"class_path": "vdiff.callbacks.SampleVideos", "init_args": {"num_videos": 2, "fps": 10}}]'
)


def tiny_args(root: Path) -> list[str]:
    return [*TINY_VDT, *tiny_synthetic_data(root / "cache"), *quiet_trainer(root / "runs")]


def last_checkpoint(root: Path) -> Path:
    (path,) = root.glob("runs/quickstart/version_*/checkpoints/last.ckpt")
    return path


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_quickstart_two_steps_in_every_precision(tmp_path, precision):
    main(["fit", "-c", QUICKSTART, *tiny_args(tmp_path), "--trainer.precision", precision,
          "--trainer.callbacks", EMA_ONLY])  # fmt: skip
    checkpoint = torch.load(last_checkpoint(tmp_path), weights_only=False)
    assert checkpoint["global_step"] == 2
    weights = [v for k, v in checkpoint["state_dict"].items() if k.startswith("net.blocks")]
    want = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert weights and all(w.dtype == want for w in weights)
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["ema_state_dict"].values())
    module = load_module(str(last_checkpoint(tmp_path)))
    assert module.net is not None


def run_vdiff(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``vdiff fit`` as a user runs it (Lightning launches the second process by re-running the command)."""
    env = {**os.environ, "VDIFF_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    vdiff = Path(sys.executable).with_name("vdiff")
    command = [str(vdiff), "fit", "-c", QUICKSTART, *args, *tiny_args(root)]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


SVD_TINY = str(REPO / "recipes" / "svd_tiny.yaml")
SVD_ARGS = ["--trainer.max_steps", "2", "--trainer.max_time", "null", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false", "--data.init_args.num_videos", "8",
            "--data.init_args.val_videos", "4", "--data.init_args.num_workers", "0"]  # fmt: skip


@pytest.mark.slow
def test_svd_tiny_shards_on_two_cpu_processes(tmp_path):
    """UNet-SVD's block classes (spatio-temporal ResBlocks and transformers) shard beside a frozen CLIP."""
    env = {**os.environ, "VDIFF_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    block = str(REPO / "recipes" / "strategy" / "model_parallel_cpu.yaml")
    command = [str(Path(sys.executable).with_name("vdiff")), "fit", "-c", SVD_TINY, "-c", block,
               "--trainer.callbacks", EMA_ONLY, *SVD_ARGS]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (path,) = tmp_path.glob("runs/svd_tiny/version_*/checkpoints/last.ckpt")
    out = tmp_path / "full.ckpt"
    assert main(["consolidate", str(path), str(out)]) == 0
    assert torch.load(out, weights_only=False)["global_step"] == 2


MATRIX = [
    ("ddp", "32-true"),
    pytest.param("ddp", "bf16-mixed", marks=pytest.mark.slow),
    ("model_parallel_cpu", "32-true"),
    pytest.param("model_parallel_cpu", "bf16-mixed", marks=pytest.mark.slow),
    pytest.param("model_parallel_cpu", "bf16-true", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("strategy", "precision"), MATRIX)
def test_strategy_blocks_train_two_steps_on_two_cpu_processes(tmp_path, strategy, precision):
    block = str(REPO / "recipes" / "strategy" / f"{strategy}.yaml")
    result = run_vdiff(tmp_path, "-c", block, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                       "--trainer.precision", precision, "--trainer.callbacks", EMA_AND_SAMPLES)  # fmt: skip
    assert "Starting with 2 processes" in result.stderr + result.stdout
    assert list(tmp_path.glob("runs/quickstart/version_*/samples/*.mp4"))  # rank 0 wrote the validation samples
    path = last_checkpoint(tmp_path)
    if strategy == "ddp":
        checkpoint = torch.load(path, weights_only=False)
    else:  # a folder of shards: consolidate it
        assert path.is_dir() and len(list(path.glob("*.distcp"))) == 2
        out = tmp_path / "full.ckpt"
        assert main(["consolidate", str(path), str(out)]) == 0
        checkpoint = torch.load(out, weights_only=False)
        assert load_module(str(out)).net is not None
    assert checkpoint["global_step"] == 2 and "ema_state_dict" in checkpoint
