"""VDT Cityscapes recipe: the evaluation protocol (k samples, best-of-k), its printout, and the recipe
run end to end through a real (tiny) pretrained autoencoder file on synthetic stand-in data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.lit.helpers import TINY_VDT, quiet_trainer, tiny_synthetic_data, vdt_module
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.cli import main
from vdiff.data.synthetic_datamodule import SyntheticDrivingDataModule
from vdiff.diffusion.sampling import SamplerConfig
from vdiff.lit.evaluation import EvalProtocol
from vdiff.metrics.frames import frame_psnr, masked_frame_mean
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder import save_autoencoder
from vdiff.weights.pretrained import PretrainedAutoencoder

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "vdt_cityscapes.yaml"
FRAMES = 8


def tiny_module(**overrides):
    kwargs = dict(patch_size=4, depth=1, hidden_size=32, num_heads=2, val_steps=2, val_given_frames=2)
    kwargs.update(overrides)
    return vdt_module(**kwargs)


def noisy_clips(batch: int = 3, frames: int = 6, size: int = 16) -> dict:
    """Smooth random clips in [-1, 1]: enough structure that samples from different seeds score differently."""
    g = torch.Generator().manual_seed(0)
    video = torch.nn.functional.avg_pool2d(torch.rand(batch * frames, 3, size, size, generator=g) * 2 - 1, 3, 1, 1)
    return {"video": video.view(batch, frames, 3, size, size), "key": [f"clip{i}" for i in range(batch)]}


def test_best_of_k_is_at_least_the_mean_and_equals_it_for_one_sample():
    batch = noisy_clips()
    module = tiny_module(eval_samples_per_video=3)
    scores = module.evaluate_protocol_batch(batch, batch_idx=1)
    assert set(scores) == {"psnr", "ssim", "psnr_best_of_k", "ssim_best_of_k", "psnr_copy_last", "ssim_copy_last"}
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in scores.values())
    for metric in ("psnr", "ssim"):
        assert (scores[f"{metric}_best_of_k"] >= scores[metric]).all()
    # Distinct seeds give distinct samples, so for some clip the best strictly beats the mean.
    assert (scores["psnr_best_of_k"] > scores["psnr"]).any()
    # Deterministic: the same batch index gives the same numbers.
    again = module.evaluate_protocol_batch(batch, batch_idx=1)
    assert all(torch.equal(scores[k], again[k]) for k in scores)

    single = tiny_module(eval_samples_per_video=1)
    single.load_state_dict(module.state_dict())
    one = single.evaluate_protocol_batch(batch, batch_idx=1)
    for metric in ("psnr", "ssim"):
        assert torch.equal(one[f"{metric}_best_of_k"], one[metric])
    # Sample 0 uses validation's seed (seed + batch_idx): k = 1 reproduces a sample drawn with it.
    generated = single.generate(batch, generator=torch.Generator().manual_seed(single.evaluation.seed + 1))
    frames = ~generated.given_frames
    reference = masked_frame_mean(frame_psnr(generated.video, batch["video"]), frames)
    assert torch.allclose(one["psnr"], reference)
    # Validation scores sample 0 whatever k is: k = 3 asked for one sample gives k = 1's numbers.
    first = module.evaluate_protocol_batch(batch, batch_idx=1, samples_per_video=1)
    assert all(torch.equal(first[k], one[k]) for k in one)


def test_eval_num_frames_cuts_the_clips_and_rejects_short_ones():
    module = tiny_module(eval_num_frames=4)
    batch = noisy_clips(batch=1, frames=6)
    batch["actions"] = {"speed": torch.zeros(1, 6)}
    cut = module.protocol_clips(batch)
    assert cut["video"].shape[1] == 4 and cut["actions"]["speed"].shape == (1, 4) and cut["key"] == batch["key"]
    assert torch.isfinite(module.evaluate_protocol_batch(batch, 0)["psnr"]).all()
    with pytest.raises(ValueError, match="num_frames=8"):
        tiny_module(eval_num_frames=8).evaluate_protocol_batch(batch, 0)
    with pytest.raises(ValueError, match="samples_per_video"):
        EvalProtocol(samples_per_video=0)
    with pytest.raises(ValueError, match="fvd_frames"):
        EvalProtocol(fvd_frames="some")
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        EvalProtocol(given_frames=2, num_frames=2)


def test_protocol_is_printed_with_the_results():
    protocol = EvalProtocol(task="prediction", given_frames=2, num_frames=30, samples_per_video=5, seed=0,
                            fvd_frames="generated")
    assert protocol.sample_seed(3, 0) == 3 and len({protocol.sample_seed(b, j) for b in range(4) for j in range(5)}) == 20
    text = protocol.describe(SamplerConfig(name="ancestral", steps=200), clips=12)
    for needle in ("prediction 2 -> 28 frames", "frames per clip: 30", "clips: 12", "k=5",
                   "ancestral, 200 steps", "generated frames only", "FVD/FID: the VideoQuality callback"):
        assert needle in text, (needle, text)
    module = tiny_module(eval_samples_per_video=2, eval_num_frames=6, fvd_frames="all")
    results = {"psnr": 20.0, "ssim": 0.5, "psnr_best_of_k": 21.0, "ssim_best_of_k": 0.6,
               "psnr_copy_last": 18.0, "ssim_copy_last": 0.4, "clips": 4}
    report = module.report(results)
    for needle in ("prediction 2 -> 4 frames", "k=2", "best of k=2", "mean of k=2", "all frames", "0.6000", "18.00",
                   "+2.00"):
        assert needle in report, (needle, report)


def test_pretrained_autoencoder_loads_a_local_file_and_names_a_missing_one(tmp_path, monkeypatch):
    reference = VideoAutoencoder(AutoencoderConfig.from_name("tiny"))
    save_autoencoder(reference, tmp_path / "vae.safetensors")
    loaded = PretrainedAutoencoder(str(tmp_path / "vae.safetensors"), layout="vdiff", scale_factor=0.5)
    assert isinstance(loaded, VideoAutoencoder)
    assert (loaded.scale_factor, loaded.latent_channels, loaded.spatial_downsample) == (0.5, 4, 2)
    video = torch.rand(1, 2, 3, 8, 8) * 2 - 1
    assert torch.equal(loaded.encode(video).mode(), reference.encode(video).mode())
    # Relative paths are looked up under $VDIFF_WEIGHTS.
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path))
    assert PretrainedAutoencoder("vae.safetensors", layout="vdiff").weights_path == str(tmp_path / "vae.safetensors")
    with pytest.raises(FileNotFoundError, match=r"sd-vae-ft-mse\.safetensors.*VDIFF_WEIGHTS.*Pretrained weights"):
        PretrainedAutoencoder("weights/sd-vae-ft-mse.safetensors")


def test_recipe_prints_its_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(RECIPE), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = capsys.readouterr().out
    for needle in ("VDT-L/2", "vdiff.weights.pretrained.PretrainedAutoencoder", "path: hf://stabilityai/sd-vae-ft-mse",
                   "samples_per_video: 5", "fvd_frames: generated", "given_frames: 2", "size: 128"):
        assert needle in config, needle


def tiny_recipe_args(tmp_path: Path, vae_path: Path) -> list[str]:
    """The Cityscapes recipe shrunk to seconds: tiny VDT, tiny VAE file, synthetic 32x32 clips."""
    cache = tmp_path / "cache"
    stand_in = SyntheticDrivingDataModule(num_videos=8, val_videos=4, video_frames=FRAMES, video_size=32, cache_dir=str(cache))
    return [
        "-c", str(RECIPE),
        *TINY_VDT,
        "--model.init_args.sampler.steps", "2",
        "--model.init_args.evaluation.num_frames", "6",
        "--model.init_args.evaluation.samples_per_video", "2",
        "--model.init_args.autoencoder.init_args.path", str(vae_path),
        "--model.init_args.autoencoder.init_args.layout", "vdiff",
        "--model.init_args.autoencoder.init_args.config", "tiny",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(cache, frames=FRAMES),
        "--data.init_args.eval_num_frames", str(FRAMES),
        "--data.init_args.test", str(stand_in.synthetic_root / "val"),
        *quiet_trainer(tmp_path / "runs"),
        "--trainer.precision", "32-true",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
    ]


def test_recipe_trains_two_steps_then_tests_with_the_protocol(tmp_path, capsys):
    vae_path = tmp_path / "weights" / "tiny-vae.safetensors"
    vae_path.parent.mkdir()
    save_autoencoder(VideoAutoencoder(AutoencoderConfig.from_name("tiny")), vae_path)
    args = tiny_recipe_args(tmp_path, vae_path)
    main(["fit", *args])
    checkpoints = list((tmp_path / "runs").rglob("last.ckpt"))
    assert len(checkpoints) == 1
    checkpoint = torch.load(checkpoints[0], weights_only=False)
    assert checkpoint["global_step"] == 2
    # Lean: the frozen autoencoder is recorded (file + sha256), not stored; it reloads from that file.
    assert not any(k.startswith("autoencoder.") for k in checkpoint["state_dict"])
    assert checkpoint["vdiff_autoencoder"]["path"] == str(vae_path.resolve())
    module = load_module(str(checkpoints[0]), use_ema=False)
    assert type(module.autoencoder) is VideoAutoencoder and module.net.in_channels == 4
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(value, module.state_dict()[name]), name
    capsys.readouterr()

    main(["test", *args, "--ckpt_path", str(checkpoints[0])])
    out = capsys.readouterr().out
    for needle in ("VDTModule test results (4 clips)", f"checkpoint: {checkpoints[0]}", "prediction 2 -> 4 frames",
                   "frames per clip: 6", "k=2", "ancestral, 2 steps", "best of k=2", "copy last given frame",
                   "FVD/FID: the VideoQuality callback"):
        assert needle in out, (needle, out)
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines() if "of k=2" in line[:28]}
    mean_psnr, mean_ssim = map(float, rows["samples, mean of k=2"])
    best_psnr, best_ssim = map(float, rows["samples, best of k=2"])
    assert best_psnr >= mean_psnr and best_ssim >= mean_ssim


def test_missing_autoencoder_weights_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    missing = tmp_path / "weights" / "sd-vae-ft-mse.safetensors"
    # LightningCLI (jsonargparse) re-raises construction errors as ValueError carrying the message.
    with pytest.raises((FileNotFoundError, ValueError), match=r"sd-vae-ft-mse\.safetensors.*Pretrained weights"):
        main(["fit", *tiny_recipe_args(tmp_path, missing)])
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
    assert not (tmp_path / "cache").exists()  # not even the stand-in data was written


def test_score_totals_reduce_the_same_names_on_a_rank_without_clips():
    """Exact-once loaders can leave a rank without clips: it must still reduce every score (else DDP hangs)."""
    from vdiff.lit.evaluation import PROTOCOL_SCORES, ScoreTotals

    empty, full = ScoreTotals(), ScoreTotals()
    full.add({name: torch.full((3,), float(i)) for i, name in enumerate(PROTOCOL_SCORES)})
    reduced: list[torch.Tensor] = []

    def fake_all_reduce(tensor: torch.Tensor) -> torch.Tensor:  # two ranks: this one and `full`
        reduced.append(tensor)
        other = torch.tensor([full.clips] + [full.sums[k] for k in sorted(full.sums)], dtype=torch.float64)
        assert other.shape == tensor.shape
        return tensor + other

    means = empty.means(fake_all_reduce)
    assert means["clips"] == 3 and means["psnr"] == 0.0 and means["ssim_copy_last"] == float(PROTOCOL_SCORES.index("ssim_copy_last"))
