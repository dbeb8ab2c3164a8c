"""`vdiff sample --image`: an SVD checkpoint (recipes/svd_tiny.yaml, 2 steps) animates an image or a frame of a
video into an mp4 of the requested length and size; unreadable images and sizes the model cannot take are
refused naming the file and the rule."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.lit.helpers import quiet_trainer, tiny_synthetic_data
from vdiff.cli import main
from vdiff.data.video_io import decode_all, probe
from vdiff.models.unet_svd import UNetSVDConfig
from vdiff.sample import check_size

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "svd_tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pixel-space SVD checkpoint trained on 4-frame 16x16 clips, and its validation shards."""
    root = tmp_path_factory.mktemp("sample-image")
    cache = root / "cache"
    main(["fit", "-c", str(RECIPE), *tiny_synthetic_data(cache, frames=4), "--data.init_args.size", "16",
          "--data.init_args.video_size", "16", "--model.init_args.net.num_frames", "4",
          "--model.init_args.sampler.steps", "2", *quiet_trainer(root / "runs")])  # fmt: skip
    (checkpoint,) = (root / "runs").rglob("last.ckpt")
    (val,) = cache.glob("synthetic-drive-*/val")
    return checkpoint, val


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "x.png"
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def sample(checkpoint: Path, out: Path, *options: str) -> int:
    return main(["sample", "--ckpt", str(checkpoint), "--out", str(out), *options])


def test_image_to_video_writes_an_mp4_of_the_requested_length_and_size(trained, picture, tmp_path):
    checkpoint, _ = trained
    out = tmp_path / "out"
    assert sample(checkpoint, out, "--image", str(picture), "--num-frames", "6", "--size", "24x16", "--steps", "2",
                  "--fps", "8", "--motion-bucket-id", "60", "--cond-aug", "0.05", "--min-guidance", "1.2",
                  "--max-guidance", "2", "--decode-chunk", "3", "--seed", "1") == 0  # fmt: skip
    mp4 = out / "x-sample.mp4"
    frames = decode_all(mp4)
    assert frames.shape == (6, 16, 24, 3)  # 6 frames of W 24 x H 16
    assert probe(mp4).fps == pytest.approx(8.0)
    assert Image.open(out / "grid.png").size == (6 * 24, 16)
    settings = json.loads((out / "samples.json").read_text())
    assert settings["task"] == "image_to_video" and settings["frames"] == 6
    assert (settings["fps_id"], settings["motion_bucket_id"], settings["cond_aug"]) == (7.0, 60.0, 0.05)
    assert settings["guidance"] == "LinearCFG(min_scale=1.2, max_scale=2.0)"
    assert settings["sampler"].startswith("euler, 2 steps")
    assert settings["decode_chunk"] == 3 and settings["seed"] == 1


def test_defaults_come_from_the_checkpoint(trained, picture, tmp_path):
    checkpoint, _ = trained
    out = tmp_path / "out"
    assert sample(checkpoint, out, "--image", str(picture), "--steps", "2") == 0
    assert decode_all(out / "x-sample.mp4").shape == (4, 16, 16, 3)  # the training clip: 4 frames at 16x16
    settings = json.loads((out / "samples.json").read_text())
    assert (settings["fps_id"], settings["motion_bucket_id"], settings["cond_aug"]) == (6.0, 127.0, 0.02)
    assert settings["guidance"] == "LinearCFG(min_scale=1.0, max_scale=2.0)"  # the recipe's


def test_a_frame_of_a_video(trained, tmp_path):
    checkpoint, val = trained
    from vdiff.data.shards import expand_shard_spec, iter_raw_samples

    _, files = next(iter_raw_samples(expand_shard_spec(val)[0]))
    video = tmp_path / "clip.mp4"
    video.write_bytes(files["mp4"])
    out = tmp_path / "out"
    assert sample(checkpoint, out, "--input", str(video), "--frame", "2", "--num-frames", "5", "--steps", "2") == 0
    mp4 = out / "clip-frame2-sample.mp4"
    assert decode_all(mp4).shape == (5, 16, 16, 3)
    assert probe(mp4).fps == pytest.approx(probe(video).fps)  # fps_id = the video's rate - 1, written at fps_id + 1
    with pytest.raises(ValueError) as error:
        sample(checkpoint, out, "--input", str(video), "--frame", "999", "--steps", "2")
    assert str(error.value).startswith(f"vdiff sample: cannot read frame 999 of {video}: ")


def test_an_unreadable_image_is_named(trained, tmp_path):
    checkpoint, _ = trained
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError) as error:
        sample(checkpoint, tmp_path / "out", "--image", str(missing))
    assert str(error.value) == f"vdiff sample: cannot read image {missing}: no such file"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError) as error:
        sample(checkpoint, tmp_path / "out", "--image", str(broken))
    assert str(error.value).startswith(
        f"vdiff sample: cannot read image {broken}: not a readable image (UnidentifiedImageError: "
    )


def test_a_size_the_model_cannot_take_states_the_rule(trained, picture, tmp_path):
    checkpoint, _ = trained
    with pytest.raises(ValueError) as error:
        sample(checkpoint, tmp_path / "out", "--image", str(picture), "--size", "15x16")
    assert str(error.value) == (
        "vdiff sample: size 15x16 (WxH) is not divisible by 2: frame sides must be multiples of the autoencoder's "
        "spatial downsampling (1) times the UNet's total downsampling (2) = 2"
    )
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_rule_for_svd_latent_models():
    svd = SimpleNamespace(autoencoder=SimpleNamespace(spatial_downsample=8), net_config=UNetSVDConfig())
    check_size(svd, (576, 1024))
    with pytest.raises(ValueError) as error:
        check_size(svd, (576, 1000))
    assert str(error.value) == (
        "vdiff sample: size 1000x576 (WxH) is not divisible by 64: frame sides must be multiples of the "
        "autoencoder's spatial downsampling (8) times the UNet's total downsampling (8) = 64"
    )


@pytest.mark.parametrize("paste", [False, True])
def test_explicit_noise_is_the_generators_second_draw_and_a_pasted_frame_is_kept(paste):
    import torch

    from vdiff.lit.svd import SVDModule
    from vdiff.models.conditioners import CLIPImageEmbedder

    net = UNetSVDConfig(in_channels=6, out_channels=3, concat_channels=3, model_channels=32, channel_mult=(1, 2),
                        num_res_blocks=1, attention_levels=(1,), head_dim=16, context_dim=24, added_time_embed_dim=32,
                        num_frames=4)  # fmt: skip
    module = SVDModule(net=net, image_encoder=CLIPImageEmbedder("tiny"), sampler=SVDModule.svd_sampler(steps=2),
                       paste_cond_frame=paste)  # fmt: skip
    module.configure_model()
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    drawn = module.image_latents(image, 4, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    torch.randn(1, 3, 16, 16, generator=g)  # the conditioning-frame noise comes first
    noise = torch.randn(1, 4, 3, 16, 16, generator=g)
    given = module.image_latents(image, 4, generator=torch.Generator().manual_seed(2), noise=noise)
    torch.testing.assert_close(given, drawn, atol=1e-6, rtol=0)
    video = module.image_to_video(image, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(video[:, 0], image) == paste  # pixel space: the pasted frame is the image itself
