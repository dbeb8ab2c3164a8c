"""recipes/vista_nuscenes_eval.yaml: Vista's nuScenes FID/FVD protocol as a `vdiff validate` recipe. It parses with
the protocol's values, names its missing weights, and validates a tiny Vista on synthetic 25-frame clips with stub
I3D / Inception TorchScript files at the recipe's own paths, printing the protocol beside the numbers; samples are
action-free (sample_actions: false)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.lit.helpers import tiny_synthetic_data
from tests.lit.test_vista_module import driving_batch, tiny_vista
from tests.metrics.test_fid import write_stub_inception
from tests.metrics.test_fvd import write_stub_i3d
from vdiff.cli import main
from vdiff.lit.cli import RecipeError
from vdiff.lit.vista import ACTIONS_KEY

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated", "ignore:.*does not have many workers", "ignore:.*LeafSpec.*",
)  # fmt: skip
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "vista_nuscenes_eval.yaml"
TINY_NET = {"in_channels": 6, "out_channels": 3, "concat_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_levels": [1], "head_dim": 16, "context_dim": 24,
            "added_time_embed_dim": 32, "num_frames": 25}  # fmt: skip


def test_recipe_records_vistas_protocol(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "-c", str(RECIPE), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["evaluation"] == {"task": "prediction", "given_frames": 1, "num_frames": 25, "samples_per_video": 1,
                                   "seed": 0, "fvd_frames": "all"}  # fmt: skip
    assert model["sample_actions"] is False and model["guidance"]["init_args"] == {"scale": 2.5}
    assert model["sampler"]["steps"] == 50 and model["sampler"]["sigma_max"] == 700.0
    assert model["conditioning"]["cond_aug"] == 0.0 and model["conditioning"]["fps_id"] == 9
    assert data["val"] == "data/nuscenes/val" and data["size"] == [576, 1024] and data["num_frames"] == 25
    assert data["target_fps"] == 10.0 and data["val_clips_per_video"] == 36
    first, second, steering = (c["init_args"] for c in config["trainer"]["callbacks"])
    assert first["fvd"]["num_frames"] == 25 and first["fvd"]["num_real"] == 5369 and first["fvd"]["cov_divisor"] == "N"
    assert first["fid"]["backend"] == "clean-fid" and first["fid"]["num_real"] == 5369 * 25
    assert second["fvd"]["num_frames"] == 16 and second["fid_weights"] is None
    assert steering["run_on"] == ["validate"] and steering["steering"] == 90.0 and steering["rows"] == [0.3, 0.6]
    assert steering["keep_actions"] == ["speed"]


def test_missing_weights_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match=r"(hf://OpenDriveLab/Vista/vista\.safetensors is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*vdiff weights download.*VDIFF_WEIGHTS)|(weights/vista_unet\.safetensors.*VDIFF_WEIGHTS)"):
        main(["validate", "-c", str(RECIPE), "--trainer.accelerator", "cpu"])


def test_sampling_is_action_free():
    module = tiny_vista(sample_actions=False)
    batch = driving_batch()
    assert not module.conditioning(batch)[ACTIONS_KEY].any()  # the recorded steering is not used
    assert module.training_conditioning(batch)[ACTIONS_KEY].any()  # training still reads it
    assert tiny_vista().conditioning(batch)[ACTIONS_KEY].any()


def test_validate_prints_the_protocol_with_stub_networks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "weights"))  # the recipe's bare file names are found here
    write_stub_i3d_at(tmp_path / "weights" / "i3d_torchscript.pt")
    write_stub_inception(tmp_path / "weights" / "inception-2015-12-05.pt")
    main([
        "validate", "-c", str(RECIPE),
        "--model.init_args.net", json.dumps(TINY_NET), "--model.init_args.net_weights", "null",
        "--model.init_args.autoencoder", "null",
        "--model.init_args.image_encoder", json.dumps({"class_path": "vdiff.models.conditioners.CLIPImageEmbedder",
                                                       "init_args": {"config": "tiny"}}),
        "--model.init_args.sampler.steps", "2",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(tmp_path / "synth", frames=25), "--data.init_args.size", "16",
        "--data.init_args.video_size", "16", "--data.init_args.val_batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    fvd = ("FVD: StyleGAN-V's I3D TorchScript (Kinetics-400), called with rescale=True, resize=True, "
           "return_features=True; weights i3d_torchscript.pt")  # fmt: skip
    assert printed.count(fvd) == 2
    assert "clips: the first 25 of the all frames (given included)" in printed
    assert "clips: the first 16 of the all frames (given included)" in printed
    assert "N real 5369 / generated 5369; covariance / N" in printed
    assert "FID (clean-fid): Inception pool3 (2048) of every frame of the all frames (given included)" in printed
    assert "task: prediction, given frames: 1; frames per clip: 25" in printed
    assert "sampler: euler" in printed
    rows = [line for line in printed.splitlines() if line.startswith(("FVD ", "FID ")) and " real / " in line]
    assert len(rows) == 3 and all("4 real / 4 generated clips" in r or "100 real / 100 generated frames" in r
                                  for r in rows)  # fmt: skip
    assert all("not comparable with numbers at that N" in r for r in rows)  # 4 clips, not Vista's 5369
    assert "Steering test on 4 held-out clips" in printed and "LEFT +90 deg / RIGHT -90 deg" in printed


def write_stub_i3d_at(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_stub_i3d(path)
