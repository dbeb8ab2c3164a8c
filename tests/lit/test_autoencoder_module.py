"""AutoencoderModule: overfitting one clip (the seed's verification), the GAN path with two optimizers,
KL warm-up, validation outputs (metrics, reconstruction panel, error map, blob indicator), frozen encoder,
self-contained checkpoints, and both recipes through ``vdiff fit`` with tiny overrides."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

from vdiff.cli import main as vdiff_main
from vdiff.data.synthetic import render_drive
from vdiff.lit.autoencoder import AutoencoderModule, load_autoencoder_from_checkpoint, patch_error_map
from vdiff.lit.base import Generated
from vdiff.lit.optim import OptimizerSettings
from vdiff.metrics.frames import frame_psnr
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder import load_autoencoder, save_autoencoder

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def synthetic_clip(frames: int = 8, size: int = 32) -> torch.Tensor:
    """One rendered driving clip ``(1, T, 3, S, S)`` in [-1, 1]."""
    video, _ = render_drive(frames, size, seed=0)
    return torch.from_numpy(video).permute(0, 3, 1, 2)[None].float() / 127.5 - 1


class OneClip(torch.utils.data.Dataset):
    def __init__(self, video: torch.Tensor, length: int) -> None:
        self.video, self.length = video, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[0], "key": f"clip{i}"}


def fit(module: L.LightningModule, video: torch.Tensor, batches: int, **trainer_kw) -> L.Trainer:
    loader = torch.utils.data.DataLoader(OneClip(video, batches), batch_size=1)
    # Without a logger, Lightning's log_dir is the working directory: keep outputs out of the repo.
    trainer_kw.setdefault("default_root_dir", tempfile.mkdtemp(prefix="vdiff-ae-test-"))
    trainer = L.Trainer(max_steps=-1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    trainer.fit(module, loader)
    return trainer


def mode_psnr(module: AutoencoderModule, video: torch.Tensor) -> float:
    with torch.no_grad():
        recon, _ = module.reconstruct(video, sample=False)
    return frame_psnr(recon.clamp(-1, 1), video).mean().item()


def test_training_lowers_the_reconstruction_error():
    torch.manual_seed(0)
    video = synthetic_clip(4, 32)
    module = AutoencoderModule(net=AutoencoderConfig.from_name("tiny"), lpips_weight=0.0,
                               optimizer=OptimizerSettings(lr=2e-3, betas=(0.9, 0.99)))
    module.configure_model()
    before = mode_psnr(module, video)
    fit(module, video, batches=12)
    assert int(module.batches_trained) == 12
    assert mode_psnr(module, video) > before + 3.0


@pytest.mark.slow
def test_overfitting_one_clip_reaches_30_db():
    # The seed's own verification: a tiny autoencoder learns one 8-frame 32x32 synthetic clip to >= 30 dB.
    torch.manual_seed(0)
    video = synthetic_clip(8, 32)
    module = AutoencoderModule(net="tiny", lpips_weight=0.0,
                               optimizer=OptimizerSettings(lr=2e-3, betas=(0.9, 0.99)))
    fit(module, video, batches=400)
    assert mode_psnr(module, video) >= 30.0


def test_gan_path_steps_both_optimizers_from_disc_start():
    torch.manual_seed(0)
    video = synthetic_clip(2, 32)
    module = AutoencoderModule(net="tiny", lpips_weight=0.0, disc_weight=0.5, disc_start=1,
                               disc_channels=8, disc_layers=2, optimizer=OptimizerSettings(lr=1e-3), grad_clip_val=1.0)
    module.configure_model()
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    decoder_before = module.autoencoder.decoder.conv_out.weight.detach().clone()
    trainer = fit(module, video, batches=1)
    # Batch 0 is before disc_start: the discriminator optimizer steps without gradients (a no-op).
    assert all(torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert "train/d_loss" not in trainer.callback_metrics and trainer.global_step == 2
    trainer = fit(module, video, batches=2)
    assert int(module.batches_trained) == 3
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert not torch.equal(decoder_before, module.autoencoder.decoder.conv_out.weight)
    metrics = trainer.callback_metrics
    assert {"train/d_loss", "train/g_loss", "train/d_weight", "train/logits_real"} <= set(metrics)
    assert 0 < metrics["train/d_weight"] <= 0.5 * 1e4


def test_kl_warmup_is_linear():
    module = AutoencoderModule(net="tiny", lpips_weight=0.0, kl_weight=1e-6, kl_warmup_steps=100)
    assert [module.kl_weight_at(s) for s in (0, 25, 100, 500)] == pytest.approx([0.0, 2.5e-7, 1e-6, 1e-6])


def test_validation_outputs_generate_and_error_map(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(net="tiny", lpips_weight=0.0, error_patch=8)
    module.configure_model()
    video = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    generated = module.generate({"video": video}, generator=torch.Generator().manual_seed(0))
    assert isinstance(generated, Generated) and generated.video.shape == video.shape
    assert generated.target is video and not generated.given_frames.any()
    scores = module.evaluate_batch({"video": video})
    for name in ("psnr", "ssim", "blob_latent", "blob_decoder"):
        assert scores[name].shape == (2,) and torch.isfinite(scores[name]).all()
    assert {"loss/rec", "loss/nll", "loss/kl"} <= set(scores)
    panel = module.error_panel(scores["recon"], video)
    assert panel.shape == (3, 2 * 32, 3 * 32) and panel.min() >= 0 and panel.max() <= 1
    # The error map is per patch: an error confined to one 8x8 patch lights exactly that patch.
    target = torch.zeros(1, 2, 3, 32, 32)
    pred = target.clone()
    pred[:, :, :, 8:16, 24:32] = 0.5
    errors = patch_error_map(pred, target, 8)
    assert errors.shape == (1, 4, 4) and errors[0, 1, 3] == 0.5 and errors.sum() == 0.5


def test_freeze_encoder_trains_the_decoder_only():
    torch.manual_seed(0)
    module = AutoencoderModule(net="tiny-svd", freeze_encoder=True, lpips_weight=0.0, optimizer=OptimizerSettings(lr=1e-3))
    module.configure_model()
    encoder = {k: v.clone() for k, v in module.autoencoder.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    decoder = module.autoencoder.decoder.time_conv_out.weight.detach().clone()
    fit(module, synthetic_clip(3, 16), batches=2)
    state = module.autoencoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    assert not torch.equal(decoder, module.autoencoder.decoder.time_conv_out.weight)
    assert module.last_layer() is module.autoencoder.decoder.time_conv_out.weight


# ---------------------------------------------------------------- recipes through `vdiff fit`

TINY_DATA = [
    "--data.init_args.num_videos", "2", "--data.init_args.val_videos", "1", "--data.init_args.video_frames", "4",
    "--data.init_args.video_size", "32", "--data.init_args.num_frames", "3", "--data.init_args.size", "32",
    "--data.init_args.batch_size", "1", "--data.init_args.val_batch_size", "1", "--data.init_args.num_workers", "0",
    "--data.init_args.shuffle_buffer", "2",
]
TINY_TRAINER = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "4",
    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
]
TINY_GAN = [
    "--model.init_args.lpips_weight", "0", "--model.init_args.disc_start", "1", "--model.init_args.disc_channels", "8",
    "--model.init_args.disc_layers", "2",
]


def test_vae_kl_recipe_prints_config_and_trains_two_batches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:  # LightningCLI exits after printing
        vdiff_main(["fit", "-c", str(RECIPES / "vae_kl.yaml"), "--print_config"])
    assert done.value.code in (0, None)
    assert "vdiff.lit.autoencoder.AutoencoderModule" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # net: a preset name instead of the fields
        vdiff_main(["fit", "-c", str(RECIPES / "vae_kl.yaml"), "--model.init_args.net", "tiny-svd", "--print_config"])
    assert "net: tiny-svd" in capsys.readouterr().out
    vdiff_main([
        "fit", "-c", str(RECIPES / "vae_kl.yaml"), *TINY_TRAINER, *TINY_DATA, *TINY_GAN,
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.init_args.net.ch", "32", "--model.init_args.net.ch_mult", "[1, 2]",
        "--model.init_args.net.num_res_blocks", "1", "--model.init_args.net.norm_num_groups", "16",
    ])
    (run,) = (tmp_path / "runs" / "vae_kl").iterdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4 and int(checkpoint["state_dict"]["batches_trained"]) == 2
    net = checkpoint["hyper_parameters"]["net"]
    assert isinstance(net, AutoencoderConfig) and (net.ch, net.ch_mult, net.norm_num_groups) == (32, (1, 2), 16)
    assert any(k.startswith("discriminator.") for k in checkpoint["state_dict"])
    assert list((run / "error_maps").glob("*.png")) and list((run / "samples").glob("*.mp4"))
    # The checkpoint alone rebuilds the autoencoder; `vdiff encode --ckpt` uses exactly that.
    autoencoder = load_autoencoder_from_checkpoint(ckpt, use_ema=False)
    weights = {k[len("autoencoder."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("autoencoder.")}
    assert all(torch.equal(autoencoder.state_dict()[k], v) for k, v in weights.items())


def test_svd_recipe_missing_weights_fail_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "weights"))
    args = ["fit", "-c", str(RECIPES / "svd_temporal_decoder.yaml"), *TINY_DATA,
            "--data.init_args.cache_dir", str(tmp_path / "cache")]
    # The module's FileNotFoundError reaches the caller (jsonargparse may re-raise it as a ValueError that keeps
    # its message), or `vdiff` prints it and exits with status 2.
    try:
        code = vdiff_main(args)
    except (FileNotFoundError, ValueError) as error:
        message = str(error)
    else:
        assert code == 2
        message = capsys.readouterr().err
    assert "stable-video-diffusion-img2vid/vae" in message and "VDIFF_WEIGHTS" in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_svd_recipe_fine_tunes_the_temporal_decoder_with_a_frozen_encoder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A diffusers folder (config.json + weights), as the recipe expects, under $VDIFF_WEIGHTS.
    weights = tmp_path / "weights" / "tiny_svd"
    torch.manual_seed(0)
    save_autoencoder(VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd", num_res_blocks=2)), weights,
                     layout="diffusers")
    monkeypatch.setenv("VDIFF_WEIGHTS", str(weights.parent))
    vdiff_main([
        "fit", "-c", str(RECIPES / "svd_temporal_decoder.yaml"), *TINY_TRAINER, *TINY_DATA, *TINY_GAN,
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--model.init_args.pretrained", "tiny_svd", "--model.init_args.optimizer.lr", "1e-3",
    ])
    (run,) = (tmp_path / "runs" / "svd_temporal_decoder").iterdir()
    shutil.move(str(weights), tmp_path / "moved")  # the checkpoint must not need the weights
    trained = load_autoencoder_from_checkpoint(run / "checkpoints" / "last.ckpt", use_ema=False)
    start = load_autoencoder(tmp_path / "moved")
    assert trained.config == start.config
    before, after = start.state_dict(), trained.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.time_conv_out.weight"], after["decoder.time_conv_out.weight"])
