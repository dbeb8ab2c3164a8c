"""The Vista recipes (phase 1, phase 2 with LoRA, phase 2 at 576x1024): each parses with the values Vista trains
with, swaps its data by a data block, names its missing weights before training, and trains 2 steps on CPU with a
tiny network on synthetic driving clips with actions; phase 2 moves only the LoRA adapters and the action
projections."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.lit.helpers import quiet_trainer, tiny_synthetic_data
from vdiff.cli import main
from vdiff.data.datamodule import VideoDataModule
from vdiff.data.synthetic import ensure_synthetic_splits
from vdiff.data.synthetic_datamodule import SyntheticDrivingDataModule
from vdiff.lit.cli import RecipeError
from vdiff.weights.vista import LORA_TARGETS

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:The number of training batches", "ignore:.*LeafSpec.*"
)
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
VISTA_RECIPES = ["vista.yaml", "vista_phase2.yaml", "vista_phase2_hires.yaml"]
TINY_NET = {"in_channels": 6, "out_channels": 3, "concat_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_levels": [1], "head_dim": 16, "context_dim": 24,
            "added_time_embed_dim": 32, "num_frames": 6, "gradient_checkpointing": True}  # fmt: skip
TINY_ACTIONS = {"class_path": "vdiff.models.actions.ActionEncoder",
                "init_args": {"embed_dim": 8, "future_seconds": [0.1, 0.2, 0.3, 0.4]}}  # fmt: skip
TINY_CLIP = {"class_path": "vdiff.models.conditioners.CLIPImageEmbedder", "init_args": {"config": "tiny"}}
FRAMES = 6
SNAPSHOTS: dict[str, object] = {}


class Snapshot(L.Callback):
    """Records the network's parameters when training starts and ends, and which parameters train."""

    def on_train_start(self, trainer, pl_module) -> None:
        SNAPSHOTS["before"] = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}
        SNAPSHOTS["trainable"] = {n for n, p in pl_module.net.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module) -> None:
        SNAPSHOTS["after"] = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


def printed_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", VISTA_RECIPES)
def test_recipe_prints_vistas_settings(recipe, capsys):
    config = printed_config(["-c", str(RECIPES / recipe)], capsys)
    model, trainer, data = config["model"]["init_args"], config["trainer"], config["data"]["init_args"]
    assert config["model"]["class_path"] == "vdiff.lit.vista.VistaModule"
    sigma = model["diffusion"]["init_args"]
    assert sigma["sigma_sampler"]["init_args"] == {"p_mean": 1.0, "p_std": 1.6}
    assert sigma["offset_noise"] == 0.02 and sigma["offset_noise_scope"] == "frame" and sigma["loss_weighting"] == "v"
    assert model["conditioning"]["fps_id"] == 9 and model["conditioning"]["drop_image"] == 0.15
    assert {int(k): v for k, v in model["prior_weights"].items()} == {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}
    assert model["structure_weight"] == 0.1 and model["action_drop"] == 0.15 and model["optimizer"]["warmup_steps"] == 1000
    assert trainer["gradient_clip_val"] == 0.3 and trainer["precision"] == "bf16-mixed"
    assert data["num_frames"] == 25 and data["target_fps"] == 10.0
    ema = next(c for c in trainer["callbacks"] if c["class_path"] == "vdiff.callbacks.EMA")
    assert ema["init_args"]["decay"] == 0.9999
    lora = [c for c in trainer["callbacks"] if c["class_path"] == "vdiff.callbacks.LoRA"]
    if recipe == "vista.yaml":
        assert model["optimizer"]["lr"] == 1e-5 and model["spatial_lr_scale"] == 0.1 and data["size"] == [576, 1024]
        assert model["net_weights"] == "hf://stabilityai/stable-video-diffusion-img2vid-xt/svd_xt.safetensors" and not lora
        assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert trainer["devices"] * trainer["accumulate_grad_batches"] * data["batch_size"] == 256
    else:
        assert model["optimizer"]["lr"] == 5e-5 and model["spatial_lr_scale"] == 1.0
        assert data["size"] == ([320, 576] if recipe == "vista_phase2.yaml" else [576, 1024])
        assert [s["weight"] for s in data["train"]] == [1.0, 1.0]  # half action-free video, half nuScenes
        (adapter,) = lora[0]["init_args"]["adapters"].values()
        assert adapter["rank"] == 16 and adapter["alpha"] == 16 and adapter["init"] == "gaussian"
        assert lora[0]["init_args"]["extra_trainable"] == [r".*\.action_kv\.weight"]


@pytest.mark.parametrize("block", ["nuscenes", "cityscapes", "opendv", "synthetic"])
def test_data_blocks_swap_in(block, capsys):
    extra = ["--data.init_args.frame_stride", "null"] if block == "cityscapes" else []  # 17 Hz -> Vista's 10 Hz
    config = printed_config(["-c", str(RECIPES / "vista_phase2.yaml"), "-c", str(RECIPES / "data" / f"{block}.yaml"),
                             *extra], capsys)  # fmt: skip
    data = config["data"]
    expected = yaml.safe_load((RECIPES / "data" / f"{block}.yaml").read_text())["data"]
    assert data["class_path"] == expected["class_path"]
    for key, value in expected["init_args"].items():
        if isinstance(value, dict):  # a group (decoding, augmentation): the block's fields, the recipe's others kept
            for field, field_value in value.items():
                assert data["init_args"][key][field] == field_value, (key, field)
        elif not (block == "cityscapes" and key == "frame_stride"):
            assert data["init_args"][key] == value, key
    if data["class_path"] == "vdiff.data.datamodule.VideoDataModule":
        VideoDataModule(**data["init_args"])  # the merged block constructs (e.g. no frame_stride + target_fps)
    else:  # the recipe's VideoDataModule arguments do not leak into the synthetic block (it chooses train/val)
        SyntheticDrivingDataModule(**data["init_args"])


@pytest.mark.parametrize("recipe", VISTA_RECIPES)
def test_missing_weights_fail_before_training_naming_the_file(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # SVD-XT's file by hub id, not in the (empty) Hugging Face cache
    with pytest.raises(RecipeError, match=r"hf://stabilityai/stable-video-diffusion-img2vid-xt/svd_xt\.safetensors is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*vdiff weights download.*VDIFF_WEIGHTS"):
        main(["fit", "-c", str(RECIPES / recipe), *quiet_trainer(tmp_path / "runs")])
    net_weights = {"vista.yaml": r"hf://stabilityai/stable-video-diffusion-img2vid-xt/svd_xt\.safetensors is not in",
                   "vista_phase2.yaml": r"weights/vista_phase1_unet\.safetensors.*VDIFF_WEIGHTS",
                   "vista_phase2_hires.yaml": r"weights/vista_phase2_unet\.safetensors.*VDIFF_WEIGHTS"}[recipe]  # fmt: skip
    with pytest.raises(RecipeError, match=net_weights):
        main(["fit", "-c", str(RECIPES / recipe), "--model.init_args.image_encoder", json.dumps(TINY_CLIP),
              "--model.init_args.autoencoder", "null", *quiet_trainer(tmp_path / "runs")])  # fmt: skip
    assert not (tmp_path / "runs").exists()


def tiny_args(recipe: str, tmp_path: Path, recipe_weights: bool = False, tiny_actions: bool = True) -> list[str]:
    """The recipe with a tiny network (random, or ``recipe_weights``: the recipe's own net_weights path) and tiny
    action features (or, without ``tiny_actions``, Vista's 2432-d ones), trained 2 steps on CPU."""
    return [
        "fit", "-c", str(RECIPES / recipe),
        "--model.init_args.net", json.dumps(TINY_NET),
        *([] if recipe_weights else ["--model.init_args.net_weights", "null"]),
        "--model.init_args.autoencoder", "null",
        "--model.init_args.image_encoder", json.dumps(TINY_CLIP),
        *(["--model.init_args.action_encoder", json.dumps(TINY_ACTIONS)] if tiny_actions else []),
        "--model.init_args.sampler.steps", "2",
        "--model.init_args.optimizer.warmup_steps", "0",
        "--trainer.callbacks+", json.dumps({"class_path": "tests.lit.test_vista_recipes.Snapshot"}),
        *quiet_trainer(tmp_path / "runs"),
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.num_nodes", "1", "--trainer.strategy", "auto", "--trainer.accumulate_grad_batches", "1",
    ]  # fmt: skip


def synthetic_block(tmp_path: Path) -> list[str]:
    return ["--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
            *tiny_synthetic_data(tmp_path / "cache", frames=FRAMES),
            "--data.init_args.size", "16", "--data.init_args.video_size", "16"]  # fmt: skip


def mixed_block(tmp_path: Path) -> list[str]:
    """The phase-2 data block's two weighted sources, both on synthetic shards with actions."""
    splits = ensure_synthetic_splits(tmp_path / "synth", num_videos=4, num_frames=FRAMES, size=16, seed=0, val_videos=2)
    assert set(splits) == {"train", "val"}
    train = [{"path": str(tmp_path / "synth" / "train"), "weight": 1.0, "name": "opendv-youtube"},
             {"path": str(tmp_path / "synth" / "train"), "weight": 1.0, "name": "nuscenes"}]  # fmt: skip
    return ["--data.init_args.train", json.dumps(train), "--data.init_args.val", str(tmp_path / "synth" / "val"),
            "--data.init_args.size", "16", "--data.init_args.num_frames", str(FRAMES),
            "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "4"]  # fmt: skip


def trained_checkpoint(tmp_path: Path) -> dict:
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["vdiff_module"] == "vdiff.lit.vista.VistaModule"
    assert state["ema_state_dict"]  # the recipe's EMA callback ran
    return state


def test_phase1_trains_two_steps_with_a_tiny_network(tmp_path):
    SNAPSHOTS.clear()
    main([*tiny_args("vista.yaml", tmp_path), *synthetic_block(tmp_path)])
    trained_checkpoint(tmp_path)
    before, after = SNAPSHOTS["before"], SNAPSHOTS["after"]
    assert SNAPSHOTS["trainable"] == set(before)  # train: all
    assert any(not torch.equal(before[n], after[n]) for n in before if ".spatial." in n)


def tiny_vista_net(tiny_actions: bool = True):
    from vdiff.models.actions import ActionEncoder
    from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig

    encoder = ActionEncoder(**TINY_ACTIONS["init_args"]) if tiny_actions else ActionEncoder()
    config = UNetSVDConfig.from_dict(TINY_NET).replace(cond_frame_time_embed=True, action_dim=encoder.action_dim)
    return UNetSVD(config)


def phase1_weights(path: Path, tiny_actions: bool = True) -> Path:
    """A trained-looking tiny phase-1 UNet (every weight random but the zero-initialised action projections), in
    the vdiff layout ``vdiff export`` writes: the start of phase 2."""
    from vdiff.weights.unet_svd import save_unet_svd

    net = tiny_vista_net(tiny_actions)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "action_kv" not in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return save_unet_svd(net, path, "vdiff")


def stage1_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """A stage-1 adapter folder as ``vdiff export`` writes it, for the tiny network: the recipe's LoRA, random."""
    from vdiff.callbacks.lora import LoRAAdapter, adapter_state_dict, inject_adapters, save_adapter

    adapter = LoRAAdapter(LORA_TARGETS, 16, 16, init="gaussian")
    net = inject_adapters(tiny_vista_net(), {"default": adapter.peft_config()})
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    save_adapter(net, "default", folder)
    return adapter_state_dict(net, "default")


@pytest.mark.parametrize("recipe", ["vista_phase2.yaml", "vista_phase2_hires.yaml"])
def test_phase2_trains_only_adapters_and_action_layers(recipe, tmp_path, monkeypatch):
    SNAPSHOTS.clear()
    monkeypatch.chdir(tmp_path)
    start = phase1_weights(tmp_path / "phase1.safetensors")
    args = [*tiny_args(recipe, tmp_path), *mixed_block(tmp_path), "--model.init_args.net_weights", str(start)]
    saved = None
    if recipe == "vista_phase2_hires.yaml":  # continues stage 1's adapter from weights/vista_phase2_unet_lora/default
        with pytest.raises(FileNotFoundError, match=r"weights/vista_phase2_unet_lora/default/adapter_config\.json"):
            main(args)
        assert not list((tmp_path / "runs").rglob("*.ckpt"))
        saved = stage1_adapter(tmp_path / "weights" / "vista_phase2_unet_lora" / "default")
    main(args)
    state = trained_checkpoint(tmp_path)
    assert state["vdiff_lora"]["extra_trainable"] == [r".*\.action_kv\.weight"]
    before, after = SNAPSHOTS["before"], SNAPSHOTS["after"]
    trainable = SNAPSHOTS["trainable"]
    adapters = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    actions = {n for n in before if n.endswith(".action_kv.weight")}
    assert adapters and actions and trainable == adapters | actions
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert {n for n in changed if ".lora_B." in n} == {n for n in adapters if ".lora_B." in n}
    assert changed & actions
    assert set(state["ema_state_dict"]) == {f"net.{n}" for n in trainable}
    if saved is not None:  # training started from the stage-1 adapter
        for name, value in saved.items():
            module = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            assert torch.equal(before[module], value), module


def test_phase2_export_starts_the_hires_stage_at_the_recipes_paths(tmp_path, monkeypatch):
    """phase 2 -> `vdiff export --ema` to the paths vista_phase2_hires.yaml names -> the hires stage starts from the
    exported UNet and EMA adapter (Vista's 2432-d actions: checkpoints rebuild the default encoder)."""
    from safetensors.torch import load_file

    SNAPSHOTS.clear()
    monkeypatch.chdir(tmp_path)
    start = phase1_weights(tmp_path / "phase1.safetensors", tiny_actions=False)
    main([*tiny_args("vista_phase2.yaml", tmp_path / "p2", tiny_actions=False), *mixed_block(tmp_path),
          "--model.init_args.net_weights", str(start)])  # fmt: skip
    (checkpoint,) = (tmp_path / "p2" / "runs").rglob("last.ckpt")
    assert main(["export", "--ema", str(checkpoint), "weights/vista_phase2_unet.safetensors"]) == 0
    adapter = load_file(str(tmp_path / "weights" / "vista_phase2_unet_lora" / "default" / "adapter_model.safetensors"))
    ema = torch.load(checkpoint, map_location="cpu", weights_only=False)["ema_state_dict"]
    SNAPSHOTS.clear()
    main([*tiny_args("vista_phase2_hires.yaml", tmp_path / "hires", recipe_weights=True, tiny_actions=False),
          *mixed_block(tmp_path)])  # fmt: skip
    before = SNAPSHOTS["before"]
    for name, value in adapter.items():
        module = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(before[module], value), module
        assert torch.equal(value, ema[f"net.{module}"]), module  # the EMA adapter
    actions = [n for n in before if n.endswith(".action_kv.weight")]
    assert actions and all(torch.equal(before[n], ema[f"net.{n}"]) for n in actions)
