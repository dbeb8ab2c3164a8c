"""An export carries its module's config and samples like its checkpoint: the same samples (fixed seed) from the
.ckpt and from its export, for a tiny VDT (EMA weights, through `vdiff sample` too), a tiny UNet-SVD whose random
CLIP image encoder lives in the checkpoint, and LoRA kept separate; an export without the config is refused
naming the file. `vdiff export --layout diffusers --convert-norm-eps` exports a default (sgm-epsilon) UNet-SVD."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.callbacks.test_export import cli
from tests.callbacks.test_export import train as train_vdt
from tests.callbacks.test_lora_presets import Randomize
from tests.lit.test_network_hook import Clips
from tests.lit.test_svd_module import NET as SVD_NET
from tests.lit.test_svd_module import clip_batch
from vdiff.callbacks.lora import LoRA
from vdiff.cli import main
from vdiff.data.video_io import encode_video
from vdiff.lit.module_loading import load_module
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.svd import SVDModule
from vdiff.models.conditioners import CLIPImageEmbedder


def samples(module, batch, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return module.generate(batch, generator=generator).video


def vdt_batch() -> dict:
    return next(iter(Clips()))


def test_an_export_samples_like_its_checkpoint_also_through_vdiff_sample(tmp_path):
    ckpt = train_vdt(tmp_path, [])
    export = tmp_path / "ema.safetensors"
    assert cli("--ema", ckpt, str(export)) == 0
    from_ckpt, from_export = load_module(ckpt, use_ema=True), load_module(str(export))
    assert type(from_export) is type(from_ckpt) and from_export.sampler == from_ckpt.sampler
    assert torch.equal(samples(from_export, vdt_batch()), samples(from_ckpt, vdt_batch()))

    # `vdiff sample --ckpt export.safetensors` (a KeyError before): the same frames as from the checkpoint
    video = tmp_path / "clip.mp4"
    frames = ((vdt_batch()["video"][0].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    video.write_bytes(encode_video(frames.numpy(), fps=8))
    grids = {}
    for name, path in (("ckpt", ckpt), ("export", str(export))):
        out = tmp_path / name
        assert main(["sample", "--ckpt", path, "--input", str(video), "--out", str(out), "--num-frames", "4",
                     "--size", "16x16", "--steps", "2", "--task", "prediction", "--given-frames", "2"]) == 0  # fmt: skip
        grids[name] = np.asarray(Image.open(out / "grid.png"))
    assert np.array_equal(grids["export"], grids["ckpt"])


def svd_checkpoint(tmp_path, callbacks=()) -> str:
    """A tiny UNet-SVD trained 2 steps (its random CLIP image encoder is stored in the checkpoint)."""
    module = SVDModule(net=SVD_NET, image_encoder=CLIPImageEmbedder("tiny"), sampler=SVDModule.svd_sampler(2),
                       optimizer=OptimizerSettings(lr=1e-2))
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Randomize(), *callbacks], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([clip_batch(), clip_batch(seed=1)], batch_size=None))
    path = tmp_path / "svd.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def svd_ckpt(tmp_path_factory) -> str:
    return svd_checkpoint(tmp_path_factory.mktemp("svd"))


def test_an_svd_export_carries_the_image_encoder_the_checkpoint_stores(tmp_path, svd_ckpt):
    ckpt = svd_ckpt
    cli(ckpt, str(tmp_path / "svd.safetensors"))
    from_ckpt, from_export = load_module(ckpt), load_module(str(tmp_path / "svd.safetensors"))
    for name, value in from_ckpt.state_dict().items():
        assert torch.equal(from_export.state_dict()[name], value), name  # network and random CLIP alike
    assert torch.equal(samples(from_export, clip_batch(batch=1)), samples(from_ckpt, clip_batch(batch=1)))


def test_an_export_with_separate_lora_samples_with_its_adapters(tmp_path):
    ckpt = svd_checkpoint(tmp_path, [LoRA(rank=2, init=False)])  # random B: the adapters change the samples
    written = cli(ckpt, str(tmp_path / "base.safetensors"))
    assert written == 0 and (tmp_path / "base_lora" / "default").is_dir()
    expected = samples(load_module(ckpt, use_ema=False), clip_batch(batch=1))
    assert torch.allclose(samples(load_module(str(tmp_path / "base.safetensors")), clip_batch(batch=1)), expected,
                          atol=1e-5)  # fmt: skip


def test_an_export_without_its_config_is_refused_naming_the_file(tmp_path):
    old = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(2)}, str(old), metadata={"vdiff_module": "vdiff.lit.vdt.VDTModule"})
    with pytest.raises(ValueError, match=r"old\.safetensors is a weights file without its module's config"):
        load_module(str(old))


def test_export_a_default_unet_svd_in_the_diffusers_layout_from_the_command_line(tmp_path, svd_ckpt):
    from vdiff.weights.unet_svd import read_unet_svd

    ckpt = svd_ckpt
    assert SVD_NET.norm_eps == "sgm"  # the presets' (and a recipe mapping's) default
    with pytest.raises(ValueError, match="--convert-norm-eps"):
        cli("--layout", "diffusers", ckpt, str(tmp_path / "refused"))
    assert cli("--layout", "diffusers", "--convert-norm-eps", ckpt, str(tmp_path / "unet")) == 0
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNetSpatioTemporalConditionModel"
    weights = read_unet_svd(tmp_path / "unet", layout="diffusers")
    assert weights.config.norm_eps == "diffusers"
    for name, value in load_module(ckpt).net.state_dict().items():
        assert torch.equal(weights.state_dict[name], value), name
