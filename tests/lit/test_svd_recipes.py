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
    """The recipes name SVD by hub id: offline and not cached, the error says what to fetch and where."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match=r"hf://stabilityai/stable-video-diffusion-img2vid(-xt)?/\w+ is not in the "
                       r"Hugging Face cache .*HF_HUB_OFFLINE=1.*vdiff weights download.*VDIFF_WEIGHTS"):  # fmt: skip
        main(["fit", "-c", str(RECIPES / recipe), *quiet_trainer(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_the_recipe_loads_svd_by_its_hub_ids_through_the_hugging_face_cache(tmp_path, monkeypatch):
    """svd_img2vid's own hf:// ids, with the repository in the Hugging Face cache (laid out as huggingface_hub lays it
    out; offline): the UNet, the CLIP encoder and the autoencoder are read from it and the recipe trains."""
    import dataclasses

    from tests.weights.servers import COMMIT, fill_hub_cache
    from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
    from vdiff.models.conditioners import CLIPImageEmbedder, CLIPImageEmbedderConfig
    from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
    from vdiff.weights.svd import SVDWeights, save_svd

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = {**TINY_NET, "in_channels": 8, "out_channels": 4, "concat_channels": 4, "norm_eps": "diffusers"}
    torch.manual_seed(0)
    parts = SVDWeights(
        UNetSVD(UNetSVDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in net.items()})),
        CLIPImageEmbedder(CLIPImageEmbedderConfig.from_name("tiny")),
        VideoAutoencoder(dataclasses.replace(AutoencoderConfig.from_name("tiny-svd"), num_res_blocks=2,
                                             use_quant_conv=True)),
    )  # fmt: skip
    folder = save_svd(parts, tmp_path / "svd")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    fill_hub_cache(hub, "stabilityai/stable-video-diffusion-img2vid", files)
    main([
        "fit", "-c", str(RECIPES / "svd_img2vid.yaml"),
        "--model.init_args.net", json.dumps(net), "--model.init_args.sampler.steps", "2",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(tmp_path / "cache", frames=5),
        "--data.init_args.size", "16", "--data.init_args.video_size", "16", "--data.init_args.target_fps", "null",
        *quiet_trainer(tmp_path / "runs"),
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ])  # fmt: skip
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    snapshot = hub / "models--stabilityai--stable-video-diffusion-img2vid" / "snapshots" / COMMIT
    assert state["global_step"] == 2 and state["hyper_parameters"]["net_weights"].startswith("hf://stabilityai/")
    assert state["vdiff_autoencoder"]["path"] == str(snapshot / "vae" / "diffusion_pytorch_model.safetensors")
    assert state["vdiff_image_encoder"]["path"] == str(snapshot / "image_encoder" / "model.safetensors")
    # The checkpoint on another machine, whose Hugging Face cache is elsewhere: the frozen parts it recorded by their
    # cache paths are found in that cache (the same commit's files; their sha256 is checked on load).
    import shutil

    from vdiff.callbacks.checkpoint_eval import load_module

    shutil.copytree(tmp_path / "hf", tmp_path / "elsewhere", symlinks=True)
    shutil.rmtree(tmp_path / "hf")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    module = load_module(str(checkpoint))
    moved = tmp_path / "elsewhere" / "hub" / "models--stabilityai--stable-video-diffusion-img2vid" / "snapshots" / COMMIT
    assert module.image_encoder.weights_path == str(moved / "image_encoder" / "model.safetensors")
    assert module.net_weights == str(moved / "unet")


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
