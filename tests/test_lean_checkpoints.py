"""Lean SVD and Vista checkpoints load everywhere, and a recorded frozen model means its config too.

A latent SVD/Vista run with a file-backed autoencoder (a diffusers folder) and CLIP (a transformers folder) writes a
lean checkpoint: both are recorded by path, sha256 and the config.json they were read from, not stored.

* ``load_module`` (what ``vdiff sample``, ``vdiff export``, ``EvaluateCheckpoint`` and ``SteeringTest`` use) loads
  it: the UNet's channel check runs against the recorded autoencoder once it is restored, not against the
  placeholder ``load_from_checkpoint`` constructs the module with; also from a copy moved to another folder with
  ``$VDIFF_WEIGHTS`` pointing at the moved weight folders.
* A ``config.json`` edited beside unchanged weights is refused on resume and on load, naming the file and the keys
  (old -> new); checkpoints written before configs were recorded load with a warning.

The slow test runs both recipes end to end through the CLI (fit, sample, export, the callbacks, a moved copy).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tests.lit.test_svd_module import clip_batch
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.lit.svd import SVDModule
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.models.conditioners import CLIPImageEmbedderConfig
from vdiff.models.unet_svd import UNetSVDConfig
from vdiff.weights.autoencoder import save_autoencoder
from vdiff.weights.clip import PretrainedCLIPImageEmbedder
from vdiff.weights.pretrained import PretrainedAutoencoder

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:The number of training batches", "ignore:.*LeafSpec.*",
    "ignore:.*modules? in eval mode", "ignore:.*log_every_n_steps",
)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LATENT = 4  # the tiny autoencoder's latent channels: the UNet takes 4 noisy + 4 concat
NET = UNetSVDConfig(in_channels=2 * LATENT, out_channels=LATENT, concat_channels=LATENT, model_channels=32,
                    channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_dim=16, context_dim=24,
                    added_time_embed_dim=32, num_frames=4)  # fmt: skip


def frozen_parts(folder: Path) -> Path:
    """``folder/vae`` (a diffusers AutoencoderKL folder, scaling_factor 0.5) and ``folder/clip`` (a transformers
    CLIPVisionModelWithProjection folder, the tiny CLIP: 24-d embeddings), random weights; returns ``folder``."""
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vae = VideoAutoencoder(dataclasses.replace(AutoencoderConfig.from_name("tiny"), scale_factor=0.5))
    save_autoencoder(vae, folder / "vae", layout="diffusers")
    cfg = CLIPImageEmbedderConfig.from_name("tiny")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.embed_dim, hidden_act=cfg.act, layer_norm_eps=cfg.norm_eps,
    )).save_pretrained(folder / "clip")  # fmt: skip
    return folder


def lean_svd(weights: Path, scale_factor: float | None = None) -> SVDModule:
    """A latent SVD as a recipe builds it: the autoencoder and CLIP read from their folders."""
    return SVDModule(net=NET, autoencoder=PretrainedAutoencoder(str(weights / "vae"), scale_factor=scale_factor),
                     image_encoder=PretrainedCLIPImageEmbedder(str(weights / "clip")), sampler=SVDModule.svd_sampler(2))


def fit(module: SVDModule, run: Path, steps: int = 1, ckpt_path: Path | None = None) -> Path:
    """Train ``steps`` steps (resuming from ``ckpt_path``) and return the ``last.ckpt`` written in ``run``."""
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ModelCheckpoint(run, save_last=True)])
    trainer.fit(module, train_dataloaders=DataLoader([clip_batch(batch=1, size=16)], batch_size=None),
                ckpt_path=ckpt_path)
    return run / "last.ckpt"


def sample(module: SVDModule) -> torch.Tensor:
    return module.generate(clip_batch(batch=1, size=16), generator=torch.Generator().manual_seed(0)).video


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def trained(tmp_path) -> tuple[Path, Path, SVDModule]:
    """Frozen weight folders, the ``last.ckpt`` of a lean latent SVD trained 1 step on them, and the module."""
    weights = frozen_parts(tmp_path / "weights")
    module = lean_svd(weights)
    return weights, fit(module, tmp_path / "run"), module


# ---------------------------------------------------------------- item 3: lean checkpoints load everywhere


def test_a_lean_latent_svd_checkpoint_loads_in_place_and_moved(trained, tmp_path, monkeypatch):
    weights, checkpoint, module = trained
    loaded = load_module(str(checkpoint), use_ema=False)  # was: "the autoencoder gives 3 latent channels"
    assert isinstance(loaded, SVDModule) and loaded.latent_channels == LATENT and loaded.latent_scale == 0.5
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    reference = sample(loaded)
    assert reference.shape == (1, 4, 3, 16, 16) and torch.isfinite(reference).all()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the records are plain data
    assert not any(k.startswith(("autoencoder.", "conditioner.image_embedder.")) for k in state["state_dict"])
    autoencoder, image_encoder = state["vdiff_autoencoder"], state["vdiff_image_encoder"]
    assert autoencoder["config_file"]["path"] == str(weights / "vae" / "config.json")
    assert autoencoder["config_file"]["content"]["scaling_factor"] == 0.5
    assert image_encoder["config_file"]["path"] == str(weights / "clip" / "config.json")

    # Another machine: the checkpoint copied elsewhere, the weight folders moved under $VDIFF_WEIGHTS.
    copy = tmp_path / "copy" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    moved = tmp_path / "moved"
    weights.rename(moved)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"weights/vae/diffusion_pytorch_model.safetensors.*VDIFF_WEIGHTS is not"):
        load_module(str(copy), use_ema=False)
    monkeypatch.setenv("VDIFF_WEIGHTS", str(moved))
    relocated = load_module(str(copy), use_ema=False)
    torch.testing.assert_close(sample(relocated), reference, rtol=0, atol=0)


def test_the_channel_check_runs_against_the_autoencoder_the_module_uses(tmp_path):
    weights = frozen_parts(tmp_path / "weights")
    pixel_net = NET.replace(in_channels=6, out_channels=3, concat_channels=3)
    with pytest.raises(ValueError, match="the autoencoder gives 4 latent channels.*net has in_channels=6"):
        SVDModule(net=pixel_net, autoencoder=PretrainedAutoencoder(str(weights / "vae")))  # a recipe: at once
    # Pixel space (no autoencoder) with a latent UNet: refused when the trainer builds the network, before a step.
    module = SVDModule(net=NET, image_encoder=PretrainedCLIPImageEmbedder(str(weights / "clip")))
    with pytest.raises(ValueError, match="the autoencoder gives 3 latent channels.*net has in_channels=8"):
        fit(module, tmp_path / "run")
    assert module.net is None and not (tmp_path / "run" / "last.ckpt").exists()


def test_a_vdt_with_net_in_channels_set_loads_its_lean_checkpoint(tmp_path):
    from tests.lit.helpers import vdt_module
    from tests.lit.test_network_hook import Clips

    vae = save_autoencoder(VideoAutoencoder(AutoencoderConfig.from_name("tiny")), tmp_path / "vae.safetensors")
    module = vdt_module(patch_size=2, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, configure=False,
                        in_channels=LATENT, autoencoder=PretrainedAutoencoder(str(vae)))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(Clips(), batch_size=None))
    trainer.save_checkpoint(tmp_path / "vdt.ckpt")
    loaded = load_module(str(tmp_path / "vdt.ckpt"), use_ema=False)  # was: "net.in_channels=4 but ... 3"
    assert loaded.net.in_channels == LATENT
    assert torch.equal(loaded.net.x_embedder.proj.weight, module.net.x_embedder.proj.weight)


# ---------------------------------------------------------------- item 6: the recorded config is checked


def test_an_edited_autoencoder_config_is_refused_on_load_and_on_resume(trained, tmp_path):
    weights, checkpoint, _ = trained
    config = weights / "vae" / "config.json"
    edit_json(config, scaling_factor=0.25)
    refused = rf"{config}: the autoencoder config changed since the checkpoint was written \(scaling_factor: 0.5 -> 0.25\)"
    with pytest.raises(ValueError, match=refused):
        load_module(str(checkpoint), use_ema=False)
    with pytest.raises(ValueError, match=refused):
        fit(lean_svd(weights), tmp_path / "resumed", steps=2, ckpt_path=checkpoint)
    assert not (tmp_path / "resumed" / "last.ckpt").exists()

    edit_json(config, scaling_factor=0.5, _diffusers_version="9.9.9")  # provenance only: accepted
    assert load_module(str(checkpoint), use_ema=False).latent_scale == 0.5
    # The config the part is built with counts too: a recipe's scale_factor override that differs.
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.safetensors: the autoencoder given is built "
                                         r"with another config .*scale_factor: 0.5 -> 0.3"):
        fit(lean_svd(weights, scale_factor=0.3), tmp_path / "resumed", steps=2, ckpt_path=checkpoint)
    assert fit(lean_svd(weights), tmp_path / "resumed", steps=2, ckpt_path=checkpoint).is_file()


def test_an_edited_or_missing_image_encoder_config_is_refused(trained, tmp_path):
    weights, checkpoint, _ = trained
    config = weights / "clip" / "config.json"
    original = config.read_text()
    edit_json(config, layer_norm_eps=1e-3)
    refused = rf"{config}: the image encoder config changed .*\(layer_norm_eps: 1e-05 -> 0.001\)"
    with pytest.raises(ValueError, match=refused):
        load_module(str(checkpoint), use_ema=False)
    with pytest.raises(ValueError, match=refused):
        fit(lean_svd(weights), tmp_path / "resumed", steps=2, ckpt_path=checkpoint)
    config.unlink()
    with pytest.raises(ValueError, match=rf"{config}: the image encoder config file this checkpoint was trained with "
                                         "is missing"):
        load_module(str(checkpoint), use_ema=False)
    config.write_text(original)
    assert isinstance(load_module(str(checkpoint), use_ema=False).image_encoder, PretrainedCLIPImageEmbedder)


def test_a_checkpoint_without_recorded_configs_loads_with_a_warning(trained, tmp_path):
    weights, checkpoint, _ = trained
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("vdiff_autoencoder", "vdiff_image_encoder"):
        del state[key]["config_file"]  # as written before vdiff recorded configs
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    with pytest.warns(UserWarning, match=r"vae/config.json: this checkpoint was written before vdiff recorded the "
                                         "config of its autoencoder"):
        loaded = load_module(str(old), use_ema=False)
    assert loaded.latent_channels == LATENT


# ---------------------------------------------------------------- end to end: the recipes through the CLI

TINY_ACTIONS = {"class_path": "vdiff.models.actions.ActionEncoder",
                "init_args": {"embed_dim": 8, "future_seconds": [0.1, 0.2, 0.3, 0.4]}}  # fmt: skip


def recipe_args(recipe: str, root: Path, vae: str, clip: str, frames: int, steps: int) -> list[str]:
    """``vdiff fit`` of a recipe with the tiny latent UNet, the frozen parts read from ``vae`` / ``clip`` (a relative
    path is looked up under $VDIFF_WEIGHTS), on tiny synthetic clips, with EvaluateCheckpoint (and, for Vista,
    SteeringTest) loading the written ``last.ckpt`` at the end."""
    from tests.lit.helpers import quiet_trainer, tiny_synthetic_data

    net = {**NET.to_dict(), "num_frames": frames}
    callbacks = [{"class_path": "vdiff.callbacks.EvaluateCheckpoint", "init_args": {"max_batches": 1}}]
    vista = recipe.startswith("vista")
    if vista:
        callbacks.append({"class_path": "vdiff.callbacks.steering.SteeringTest",
                          "init_args": {"steering": 100.0, "max_shift": 2, "max_batches": 1}})
    return [
        "fit", "-c", str(RECIPES / recipe),
        "--model.init_args.net", json.dumps(net), "--model.init_args.net_weights", "null",
        "--model.init_args.autoencoder", json.dumps({"class_path": "vdiff.weights.pretrained.PretrainedAutoencoder",
                                                     "init_args": {"path": vae}}),
        "--model.init_args.image_encoder", json.dumps({"class_path": "vdiff.weights.clip.PretrainedCLIPImageEmbedder",
                                                       "init_args": {"path": clip}}),
        *(["--model.init_args.action_encoder", json.dumps(TINY_ACTIONS)] if vista else []),
        "--model.init_args.sampler.steps", "1", "--model.init_args.optimizer.warmup_steps", "0",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(root / "cache", frames=frames), "--data.init_args.size", "16",
        "--data.init_args.video_size", "16", "--data.init_args.target_fps", "null",
        *quiet_trainer(root / "runs", steps=steps), "--trainer.limit_val_batches", "1",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.num_nodes", "1", "--trainer.strategy", "auto", "--trainer.accumulate_grad_batches", "1",
        *(arg for c in callbacks for arg in ("--trainer.callbacks+", json.dumps(c))),
    ]  # fmt: skip


def use_everywhere(checkpoint: Path, val: Path, out: Path, vista: bool) -> torch.Tensor:
    """``vdiff sample`` and ``vdiff export`` from ``checkpoint``; returns the exported UNet's conv_in weight."""
    from vdiff.cli import main
    from vdiff.weights.safetensors_io import load_state_dict

    assert main(["sample", "--ckpt", str(checkpoint), "--input", str(val), "--num-videos", "1", "--steps", "1",
                 "--out", str(out / "samples"), *(["--rounds", "2"] if vista else [])]) == 0  # fmt: skip
    assert list((out / "samples").glob("*-sample.mp4"))
    assert main(["export", str(checkpoint), str(out / "unet.safetensors")]) == 0
    return load_state_dict(out / "unet.safetensors")["conv_in.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["svd_tiny.yaml", "vista.yaml"])
def test_recipes_train_latent_and_their_checkpoints_load_everywhere(recipe, tmp_path, monkeypatch, capsys):
    from vdiff.cli import main
    from vdiff.lit.vista import VistaModule

    vista = recipe.startswith("vista")
    frames = 6 if vista else 4
    weights = frozen_parts(tmp_path / "weights")
    main(recipe_args(recipe, tmp_path, str(weights / "vae"), str(weights / "clip"), frames, steps=2))
    printed = capsys.readouterr().out
    assert "Checkpoint evaluation on held-out clips" in printed  # EvaluateCheckpoint loaded last.ckpt
    if vista:
        assert "Steering test on" in printed
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    (val,) = (tmp_path / "cache").glob("synthetic-drive-*/val")
    exported = use_everywhere(checkpoint, val, tmp_path / "here", vista)

    # A copy in another folder, the weight folders moved and found through $VDIFF_WEIGHTS.
    copy = tmp_path / "elsewhere" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    moved = tmp_path / "moved-weights"
    weights.rename(moved)
    monkeypatch.setenv("VDIFF_WEIGHTS", str(moved))
    assert torch.equal(use_everywhere(copy, val, tmp_path / "there", vista), exported)
    module = load_module(str(copy))
    assert isinstance(module, VistaModule) == vista and module.latent_channels == LATENT
    # Resumed there, the recipe naming the frozen parts relative to $VDIFF_WEIGHTS; the callbacks load again.
    resume = recipe_args(recipe, tmp_path, "vae", "clip", frames, steps=3)
    main([*resume, "--ckpt_path", str(copy)])
    printed = capsys.readouterr().out
    if vista:
        assert "Steering test on" in printed
    resumed = sorted((tmp_path / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert torch.load(resumed, map_location="cpu", weights_only=False)["global_step"] == 3
