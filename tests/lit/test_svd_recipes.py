"""The SVD recipes: each parses, names its missing weights before training, and trains 2 steps on CPU
with a tiny network override on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.lit.helpers import quiet_trainer, tiny_synthetic_data
from vdiff.cli import main
from vdiff.lit.cli import RecipeError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SVD_RECIPES = ["svd_img2vid.yaml", "svd_xt.yaml", "svd_interpolate.yaml"]
TINY_NET = {"in_channels": 6, "out_channels": 3, "concat_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_levels": [1], "head_dim": 16, "context_dim": 24,
            "added_time_embed_dim": 32, "num_frames": 5, "gradient_checkpointing": True}


@pytest.mark.parametrize("recipe", SVD_RECIPES)
def test_recipe_prints_its_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(RECIPES / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = capsys.readouterr().out
    for needle in ("vdiff.lit.svd.SVDModule", "vdiff.weights.clip.PretrainedCLIPImageEmbedder",
                   "vdiff.weights.pretrained.PretrainedAutoencoder", "VScalingPrecond", "sigma_max: 700.0"):
        assert needle in config, (recipe, needle)


@pytest.mark.parametrize("recipe", SVD_RECIPES)
def test_missing_weights_fail_before_training_naming_the_file(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    with pytest.raises(RecipeError, match=r"weights/stable-video-diffusion-img2vid.*VDIFF_WEIGHTS"):
        main(["fit", "-c", str(RECIPES / recipe), *quiet_trainer(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe", SVD_RECIPES)
def test_recipe_trains_two_steps_with_a_tiny_network(recipe, tmp_path):
    args = [
        "fit", "-c", str(RECIPES / recipe),
        "--model.init_args.net", json.dumps(TINY_NET),
        "--model.init_args.net_weights", "null",
        "--model.init_args.autoencoder", "null",
        "--model.init_args.image_encoder", json.dumps({"class_path": "vdiff.models.conditioners.CLIPImageEmbedder",
                                                       "init_args": {"config": "tiny"}}),
        "--model.init_args.sampler.steps", "2",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(tmp_path / "cache", frames=5),
        "--data.init_args.size", "16", "--data.init_args.video_size", "16", "--data.init_args.target_fps", "null",
        *quiet_trainer(tmp_path / "runs"),
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ]
    main(args)
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["vdiff_module"] == "vdiff.lit.svd.SVDModule"
    assert state["ema_state_dict"]  # the recipe's EMA callback ran


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml") if p.name.startswith(("svd", "vista"))))
def test_unet_norm_epsilons_match_the_weights_layout(recipe):
    """A diffusers unet/ folder loads only into norm_eps: diffusers (its GroupNorm epsilons differ from sgm's)."""
    import yaml

    model = yaml.safe_load((RECIPES / recipe).read_text()).get("model", {}).get("init_args", {})
    weights, layout = model.get("net_weights"), model.get("net_weights_layout", "auto")
    if not weights or layout == "sd21-image":
        return
    net = model.get("net") or {}
    norm_eps = net.get("norm_eps", "sgm") if isinstance(net, dict) else "sgm"
    is_file = weights.endswith((".safetensors", ".ckpt", ".pt", ".bin"))
    assert norm_eps == ("sgm" if is_file else "diffusers"), (recipe, weights, norm_eps)
