"""recipes/svd_multiview.yaml (SVD-MV): parses with the paper's settings, names each missing weights file before
training, and trains 2 steps (tiny overrides) on shards made by `vdiff data shards --image-sequences`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.convert.helpers import indexed_video
from tests.convert.test_image_sequences import write_sequence
from tests.lit.helpers import quiet_trainer
from vdiff.cli import main
from vdiff.data.schema import Manifest
from vdiff.lit.cli import RecipeError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "svd_multiview.yaml"
WEIGHTS = "hf://stabilityai/stable-video-diffusion-img2vid"
TINY_CLIP = json.dumps({"class_path": "vdiff.models.conditioners.CLIPImageEmbedder", "init_args": {"config": "tiny"}})
TINY_NET = {"in_channels": 6, "out_channels": 3, "concat_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_levels": [1], "head_dim": 16, "context_dim": 24,
            "added_time_embed_dim": 32, "num_frames": 5}  # fmt: skip


def test_recipe_prints_its_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(RECIPE), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = capsys.readouterr().out
    for needle in (
        "vdiff.lit.svd.SVDModule", f"net_weights: {WEIGHTS}/unet", f"path: {WEIGHTS}/image_encoder",
        f"path: {WEIGHTS}/vae", "vdiff.weights.clip.PretrainedCLIPImageEmbedder",
        "vdiff.weights.pretrained.PretrainedAutoencoder", "VScalingPrecond", "loss_weighting: v", "p_mean: 0.7",
        "sigma_max: 700.0", "lr: 1.0e-05", "accumulate_grad_batches: 16", "num_frames: 21", "size: 576",
        "train: data/svd_mv/train", "batch_size: 1", "max_steps: 12000", "given_frames: 1",
    ):  # fmt: skip
        assert needle in config, needle


@pytest.mark.parametrize(
    ("missing", "overrides"),
    [
        ("image_encoder", []),  # nothing there: the first file read names itself
        ("vae", ["--model.init_args.image_encoder", TINY_CLIP]),
        ("unet", ["--model.init_args.image_encoder", TINY_CLIP, "--model.init_args.autoencoder", "null"]),
    ],
)
def test_each_missing_weights_file_fails_before_training_naming_it(missing, overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match=rf"{WEIGHTS}/{missing} is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*vdiff weights download.*VDIFF_WEIGHTS"):
        main(["fit", "-c", str(RECIPE), *overrides, *quiet_trainer(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_recipe_trains_two_steps_on_image_sequence_shards(tmp_path):
    orbit = indexed_video(5, height=16, width=16, level_step=8)
    for split, objects in (("train", 4), ("val", 2)):
        for i in range(objects):
            write_sequence(tmp_path / "renders" / split / f"obj{i}", orbit)
        code = main(["data", "shards", str(tmp_path / "renders" / split), "--out", str(tmp_path / "mv" / split),
                     "--image-sequences", "--clip-frames", "5", "--fps", "8", "--no-motion"])  # fmt: skip
        assert code == 0 and Manifest.load(tmp_path / "mv" / split).num_samples == objects
    args = [
        "fit", "-c", str(RECIPE),
        "--model.init_args.net", json.dumps(TINY_NET),
        "--model.init_args.net_weights", "null",
        "--model.init_args.autoencoder", "null",
        "--model.init_args.image_encoder", TINY_CLIP,
        "--model.init_args.sampler.steps", "2",
        "--data.init_args.train", str(tmp_path / "mv" / "train"),
        "--data.init_args.val", str(tmp_path / "mv" / "val"),
        "--data.init_args.num_frames", "5",
        "--data.init_args.size", "16",
        "--data.init_args.batch_size", "2",
        "--data.init_args.val_batch_size", "2",
        "--data.init_args.num_workers", "0",
        "--data.init_args.shuffle_buffer", "4",
        *quiet_trainer(tmp_path / "runs"),
        "--trainer.accumulate_grad_batches", "1",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ]  # fmt: skip
    main(args)
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["vdiff_module"] == "vdiff.lit.svd.SVDModule"
    assert state["ema_state_dict"]  # the recipe's EMA callback ran
