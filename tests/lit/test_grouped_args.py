"""Grouped module arguments: ``net:`` as a preset with overrides, and the one ``optimizer:`` group every module takes
(with checkpoints written before the group still loading their settings)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tests.lit.test_svd_module import NET as SVD_NET
from vdiff.cli import main
from vdiff.lit.autoencoder import AutoencoderModule
from vdiff.lit.cli import RecipeError
from vdiff.lit.module_loading import load_module
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.svd import SVDModule
from vdiff.lit.vdt import VDTModule
from vdiff.lit.vista import VistaModule
from vdiff.models.autoencoder import AutoencoderConfig
from vdiff.models.conditioners import CLIPImageEmbedder
from vdiff.models.unet_svd import UNetSVDConfig
from vdiff.models.vdt import VDTConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY_VDT = {"patch_size": 8, "depth": 1, "hidden_size": 32, "num_heads": 2}

# ---------------------------------------------------------------- net: a preset with overrides


def test_net_names_a_preset_and_overrides_its_fields():
    svd = SVDModule(net={"name": "svd-xt", "gradient_checkpointing": True})
    assert svd.net_config == UNetSVDConfig.from_name("svd-xt", gradient_checkpointing=True)
    assert svd.net_config.num_frames == 25  # the preset's, not the dataclass default (14)
    vista = VistaModule(net={"name": "svd-xt", "gradient_checkpointing": True})
    assert vista.net_config.num_frames == 25 and vista.net_config.gradient_checkpointing
    vdt = VDTModule(net={"name": "VDT-L/2", "qk_norm": "rms"})
    assert vdt.net_config == VDTConfig.from_name("VDT-L/2", qk_norm="rms")
    autoencoder = AutoencoderModule(net={"name": "tiny-svd", "dropout": 0.1}, lpips_weight=0.0)
    assert autoencoder.config == AutoencoderConfig.from_name("tiny-svd", dropout=0.1)
    # today's forms stay: a name, a mapping of fields over the dataclass defaults, the dataclass itself
    assert SVDModule(net="svd-xt").net_config == UNetSVDConfig.from_name("svd-xt")
    assert SVDModule(net={"num_frames": 25}).net_config == UNetSVDConfig(num_frames=25)
    assert SVDModule(net=SVD_NET).net_config is SVD_NET


def test_an_unknown_override_fails_in_one_line_naming_it_and_the_valid_keys():
    with pytest.raises(ValueError) as info:
        SVDModule(net={"name": "svd-xt", "gradient_checkpionting": True})
    message = str(info.value)
    assert "\n" not in message and "['gradient_checkpionting']" in message
    assert "'name'" in message and "'gradient_checkpointing'" in message and "'num_frames'" in message
    with pytest.raises(ValueError, match=r"unknown size 'svd-xxl'.*'svd-xt'"):
        SVDModule(net={"name": "svd-xxl"})


def test_the_svd_xt_recipe_names_its_preset(capsys):
    recipe = yaml.safe_load((RECIPES / "svd_xt.yaml").read_text())
    net = recipe["model"]["init_args"]["net"]
    assert net["name"] == "svd-xt" and "num_frames" not in net
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(RECIPES / "svd_xt.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["net"]
    assert printed == {"name": "svd-xt", "gradient_checkpointing": True, "norm_eps": "diffusers"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.net.gradient_checkpointing", "false"],  # one field: the recipe's preset and others kept
         {"name": "svd-xt", "gradient_checkpointing": False, "norm_eps": "diffusers"}),
        (["--model.init_args.net", "{name: svd, gradient_checkpointing: false}"],  # a mapping replaces the recipe's
         {"name": "svd", "gradient_checkpointing": False}),
    ],
)
def test_a_net_override_on_the_command_line_keeps_the_recipes_preset(override, expected, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(RECIPES / "svd_xt.yaml"), *override, "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["net"] == expected


# ---------------------------------------------------------------- optimizer: one group


def _adamw(module) -> torch.optim.Optimizer:
    module.configure_model()
    return module.configure_optimizers()["optimizer"]


def test_the_optimizer_group_sets_adamw_and_fields_left_out_keep_the_modules_defaults():
    settings = OptimizerSettings(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, warmup_steps=4)
    module = VDTModule(net={"name": "VDT-S/2", **TINY_VDT}, optimizer=settings)
    optimizer = _adamw(module)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == 3e-3 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]  # matrices only
    assert group["lr"] == pytest.approx(3e-3 / 4)  # warm-up step 0 of 4
    # fields left out (None) take the family's defaults: SVD's lr is 1e-5; a mapping (YAML, a CLI checkpoint) too
    for given in (OptimizerSettings(warmup_steps=7), {"warmup_steps": 7}):
        svd = SVDModule(net=SVD_NET, image_encoder=CLIPImageEmbedder("tiny"), optimizer=given)
        assert svd.optimizer_settings == OptimizerSettings.complete(lr=1e-5, warmup_steps=7)
    assert VDTModule().optimizer_settings == OptimizerSettings.complete(lr=1e-4)
    autoencoder = AutoencoderModule(net="tiny", lpips_weight=0.0, optimizer=OptimizerSettings(weight_decay=0.1))
    assert autoencoder.optimizer_settings == OptimizerSettings.complete(lr=4.5e-6, betas=(0.5, 0.9), weight_decay=0.1)
    with pytest.raises(ValueError, match=r"optimizer: unknown field\(s\) \['learning_rate'\]"):
        VDTModule(optimizer={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="optimizer: lr_decay must be 'constant' or 'cosine'"):
        OptimizerSettings(lr_decay="linear")


def test_the_autoencoder_follows_the_group_schedule_once_per_batch():
    module = AutoencoderModule(net="tiny", lpips_weight=0.0, optimizer=OptimizerSettings(lr=1e-3, warmup_steps=4))
    module.configure_model()
    optimizers, schedulers = module.configure_optimizers()
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    optimizers[0].step()
    schedulers[0].step()
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 / 4)
    plain = AutoencoderModule(net="tiny", lpips_weight=0.0)  # no warm-up, no decay: no schedule (as before)
    plain.configure_model()
    assert isinstance(plain.configure_optimizers(), torch.optim.AdamW)


def test_a_recipe_sets_one_field_of_the_group_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(RECIPES / "svd_xt.yaml"), "--model.init_args.optimizer.lr", "3e-5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optimizer"]
    assert printed == {"lr": 3e-5, "betas": None, "eps": None, "weight_decay": None, "warmup_steps": 500,
                       "lr_decay": None}  # the recipe's warm-up kept, null: SVDModule's default


def test_a_partial_group_in_a_recipe_keeps_the_modules_defaults(tmp_path):
    """A recipe's ``optimizer: {warmup_steps: 7}`` on SVD keeps SVD's lr 1e-5 (not another class's default)."""
    import jsonargparse
    import lightning as L

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")  # as LightningCLI's subclass mode
    recipe = "model:\n  class_path: vdiff.lit.svd.SVDModule\n  init_args:\n    optimizer: {warmup_steps: 7}\n"
    module = parser.instantiate(parser.parse_string(recipe)).model
    assert module.optimizer_settings == OptimizerSettings.complete(lr=1e-5, warmup_steps=7)


def test_the_old_flat_form_in_a_recipe_fails_naming_the_key(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model:\n  class_path: vdiff.lit.vdt.VDTModule\n  init_args:\n    lr: 0.001\n")
    with pytest.raises(RecipeError, match="Option 'lr' is not accepted"):
        main(["fit", "-c", str(RECIPES / "quickstart.yaml"), "-c", str(recipe), "--print_config"])


@pytest.mark.parametrize("written_by", ["python", "cli"])
def test_a_checkpoint_with_the_flat_optimizer_arguments_loads_with_its_settings(written_by, tmp_path):
    """Checkpoints written before the group hold lr, betas, weight_decay, warmup_steps, lr_decay beside the other
    hyperparameters (and the CLI's also the old class argument ``optimizer: null``): they load, the settings read
    into the group, with a warning naming the new form."""
    module = VDTModule(net={"name": "VDT-S/2", **TINY_VDT}, mask_weights={"prediction": 1.0})
    module.configure_model()
    hparams = {"net": {"name": "VDT-S/2", **TINY_VDT}, "mask_weights": {"prediction": 1.0}, "lr": 2e-3,
               "weight_decay": 0.01, "betas": [0.9, 0.99], "warmup_steps": 5, "lr_decay": "cosine"}
    if written_by == "cli":
        hparams.update(optimizer=None, _class_path="vdiff.lit.vdt.VDTModule",
                       _instantiator="lightning.pytorch.cli.instantiate_module")
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0",
                "vdiff_module": "vdiff.lit.vdt.VDTModule"}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = VDTModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.optimizer_settings == OptimizerSettings.complete(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.01,
                                                                   warmup_steps=5, lr_decay="cosine")
    assert loaded.hparams["optimizer"] == loaded.optimizer_settings
    assert torch.equal(loaded.state_dict()["net.x_embedder.proj.weight"], module.state_dict()["net.x_embedder.proj.weight"])
    flat = [w for w in caught if issubclass(w.category, FutureWarning) and "flat optimizer arguments" in str(w.message)]
    assert len(flat) == 1 and "model.init_args.optimizer.lr" in str(flat[0].message)
    with pytest.warns(FutureWarning, match="flat optimizer arguments"):
        sampled = load_module(str(path))  # what vdiff sample / export / evaluate --ckpt load with
    assert sampled.optimizer_settings == loaded.optimizer_settings


def test_resuming_a_run_from_a_checkpoint_with_the_flat_arguments_keeps_its_settings(tmp_path, monkeypatch):
    """``vdiff fit --ckpt_path OLD`` reads the checkpoint's hyperparameters into the recipe (LightningCLI); the flat
    ones move into the group instead of failing the module's construction."""
    import functools

    import lightning as L

    module = VDTModule(net={"name": "VDT-S/2", **TINY_VDT})
    hparams = {"net": {"name": "VDT-S/2", **TINY_VDT}, "lr": 2e-3, "betas": [0.9, 0.99], "warmup_steps": 5,
               "optimizer": None, "_class_path": "vdiff.lit.vdt.VDTModule",
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}  # fmt: skip
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    fitted = []

    @functools.wraps(L.Trainer.fit)  # the signature LightningCLI reads its fit options from
    def fit(trainer, model, *args, **kwargs):
        fitted.append(model)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    with pytest.warns(FutureWarning, match="flat optimizer arguments"):
        main(["fit", "-c", str(RECIPES / "quickstart.yaml"), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--data.init_args.cache_dir", str(tmp_path / "cache"),
              "--ckpt_path", str(path)])  # fmt: skip
    assert fitted[0].optimizer_settings == OptimizerSettings.complete(lr=2e-3, betas=(0.9, 0.99), warmup_steps=5)
