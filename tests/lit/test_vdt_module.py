"""VDTModule: masked training, exact given frames, rollout, learning, subclassing through `vdiff fit`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.lit.helpers import TINY_VDT, quiet_trainer, tiny_synthetic_data, vdt_module
from vdiff.cli import main
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.vdt import VDTModule

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def tiny_module(**overrides) -> VDTModule:
    kwargs = dict(patch_size=8, depth=2, hidden_size=32, num_heads=2, val_steps=4)
    kwargs.update(overrides)
    return vdt_module(**kwargs)


def moving_square_batch(batch: int = 2, frames: int = 6, size: int = 16, seed: int = 0) -> dict:
    """A bright square sliding right one pixel per frame on a dark background."""
    g = torch.Generator().manual_seed(seed)
    video = torch.full((batch, frames, 3, size, size), -0.8)
    for b in range(batch):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        for t in range(frames):
            video[b, t, :, y0 : y0 + 4, x0 + t : x0 + t + 4] = 0.9
    return {"video": video, "key": [f"clip{b}" for b in range(batch)], "fps": torch.full((batch,), 10.0)}


def test_network_is_built_in_configure_model_with_overrides():
    module = vdt_module(patch_size=8, depth=3, hidden_size=48, num_heads=3, configure=False)
    assert module.net is None
    module.configure_model()
    assert len(module.net.blocks) == 3 and module.net.hidden_size == 48 and module.net.patch_size == 8
    assert module.net.in_channels == 3  # pixel space: the identity autoencoder's channels
    assert module.net.out_channels == 6  # learned sigma doubles the output


def test_loss_ignores_given_content():
    """A network that is perfect on generated elements and garbage on given ones has zero MSE."""
    module = tiny_module(learn_sigma=False, prediction="x0", mask_weights={"prediction": 1.0})
    batch = moving_square_batch()
    x0 = batch["video"]

    class Oracle(torch.nn.Module):
        def forward(self, x, noise_level, cond, given_mask):
            return torch.where(given_mask, torch.full_like(x, 7.0), x0)

    module.net = Oracle()
    losses = module.compute_loss(batch)
    assert float(losses["loss"]) == 0.0


def test_generated_sample_keeps_given_frames_exactly():
    module = tiny_module()
    batch = moving_square_batch()
    out = module.generate(batch, task="prediction", given_frames=2, generator=torch.Generator().manual_seed(0))
    assert out.video.shape == batch["video"].shape
    assert torch.equal(out.video[:, :2], batch["video"][:, :2])
    assert out.given_frames[:, :2].all() and not out.given_frames[:, 2:].any()
    for task in ("backward", "interpolation", "single_frame", "unconditional"):
        assert module.generate(batch, task=task).video.shape == batch["video"].shape


def test_rollout_extends_beyond_the_training_window():
    module = tiny_module()
    context = moving_square_batch(frames=2)["video"]
    video = module.rollout(context, num_frames=13, window=6, given_frames=2, steps=2)
    assert video.shape[:2] == (2, 13)
    assert torch.equal(video[:, :2], context)
    with pytest.raises(ValueError, match="given_frames"):
        module.rollout(context, num_frames=8, window=2, given_frames=2)


def test_evaluate_protocol_batch_scores_generated_frames_only():
    """A stub sampler misses frame t of sample j by a known error 0.01 (t + 1) (j + 1) (the given frames by 0.5,
    which the protocol must paste over and leave out), so every score is known in closed form: PSNR per frame is
    10 log10(2^2 / error^2), averaged over the 4 generated frames, then the mean and the best of the k = 2 samples."""
    from vdiff.metrics.frames import frame_ssim

    module = tiny_module(val_given_frames=2, eval_samples_per_video=2)
    batch = moving_square_batch()  # (2, 6, 3, 16, 16), values -0.8 and 0.9
    x0 = batch["video"]
    errors = 0.01 * torch.arange(1, 7).view(1, 6, 1, 1, 1) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1)
    errors[:, :2] = 0.5  # given frames: far off, must not count
    samples = []

    def sample_latents(given, given_mask, *args, **kwargs):
        j = len(samples)
        out = given - torch.sign(given) * errors[j].unsqueeze(0)  # inside [-1, 1]: the decoder's clamp keeps it
        samples.append(torch.where(given_mask, given, out))
        return out

    module.sample_latents = sample_latents
    scores = module.evaluate_protocol_batch(batch, 0)
    assert set(scores) == {"psnr", "ssim", "psnr_best_of_k", "ssim_best_of_k", "psnr_copy_last", "ssim_copy_last"}
    assert len(samples) == 2 and all(v.shape == (2,) for v in scores.values())
    per_sample = torch.stack([(10 * torch.log10(4.0 / errors[j, 2:, 0, 0, 0] ** 2)).mean() for j in range(2)])
    torch.testing.assert_close(scores["psnr"], per_sample.mean().expand(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(scores["psnr_best_of_k"], per_sample.max().expand(2), atol=1e-3, rtol=0)
    mse_copy = (x0[:, 2:] - x0[:, 1:2]).pow(2).mean(dim=(2, 3, 4))  # (B, 4): the last given frame, copied
    torch.testing.assert_close(scores["psnr_copy_last"], (10 * torch.log10(4.0 / mse_copy)).mean(1), atol=1e-3, rtol=0)
    videos = [torch.where(torch.arange(6).view(1, 6, 1, 1, 1) < 2, x0, x0 - torch.sign(x0) * errors[j]) for j in range(2)]
    ssim = torch.stack([frame_ssim(v, x0)[:, 2:].mean(1) for v in videos], dim=1)  # (B, k) on generated frames
    torch.testing.assert_close(scores["ssim"], ssim.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["ssim_best_of_k"], ssim.max(1).values, atol=1e-5, rtol=0)
    copy = x0[:, 1:2].expand_as(x0)
    torch.testing.assert_close(scores["ssim_copy_last"], frame_ssim(copy, x0)[:, 2:].mean(1), atol=1e-5, rtol=0)
    assert bool((scores["ssim"] < 1).all()) and bool((scores["psnr_copy_last"] < scores["psnr"]).all())


@pytest.mark.slow
def test_learns_to_beat_copy_last_frame():
    """A few hundred steps on a sliding square: DDIM samples beat copying the last given frame."""
    torch.manual_seed(0)
    module = tiny_module(
        depth=3, hidden_size=64, num_heads=4, patch_size=4, prediction="v", learn_sigma=False,
        beta_schedule="cosine", mask_weights={"prediction": 1.0}, val_given_frames=2, val_steps=20,
    )
    from vdiff.diffusion.masks import MaskMixture, MaskSpec

    module.masks = MaskMixture({"p": 1.0}, {"p": MaskSpec("prediction", given_frames=2)})
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
    for step in range(400):
        batch = moving_square_batch(batch=16, seed=step)
        loss = module.compute_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = module.evaluate_protocol_batch(moving_square_batch(batch=16, seed=10_000), 0)
    assert scores["psnr"].mean() > scores["psnr_copy_last"].mean() + 1.0, scores


class L1VDTModule(VDTModule):
    """A research variant: L1 on the x0 estimate instead of the DDPM loss (what a user might try)."""

    def compute_loss(self, batch):
        x0 = self.batch_latents(batch)
        b, t, _, h, w = x0.shape
        given_mask, _ = self.masks.sample(b, t, h, w, device=x0.device)
        steps = torch.randint(0, self.diffusion.num_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = torch.where(given_mask, x0, self.diffusion.q_sample(x0, steps, noise))
        out = self.net(x_t, self.diffusion.network_timesteps(steps), {}, given_mask)
        prediction, _ = self.diffusion.split_output(out, x0)
        x0_hat = self.diffusion.predict_x0(prediction, x_t, steps)
        loss = F.l1_loss(x0_hat[~given_mask.expand_as(x0)], x0[~given_mask.expand_as(x0)])
        self.l1_calls = getattr(self, "l1_calls", 0) + 1
        return {"loss": loss}


def test_subclass_trains_through_vdiff_fit(tmp_path):
    """The card's "subclass our modules in new research": a subclass named by class_path trains."""
    args = [
        "fit", "-c", str(QUICKSTART),
        "--model.class_path", "tests.lit.test_vdt_module.L1VDTModule",
        *TINY_VDT, "--model.init_args.diffusion.init_args.learn_sigma", "false",
        *tiny_synthetic_data(tmp_path / "cache"), *quiet_trainer(tmp_path / "runs"),
    ]
    main(args)
    checkpoints = list((tmp_path / "runs").rglob("last.ckpt"))
    assert len(checkpoints) == 1
    checkpoint = torch.load(checkpoints[0], weights_only=False)
    assert checkpoint["vdiff_module"] == "tests.lit.test_vdt_module.L1VDTModule"
    assert checkpoint["global_step"] == 2


def test_learning_rate_warmup_then_cosine_decay():
    from vdiff.lit.optim import lr_factor

    assert [lr_factor(s, warmup=4, total=None) for s in (0, 1, 3, 100)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(4, warmup=4, total=104) == 1.0
    assert abs(lr_factor(54, warmup=4, total=104) - 0.5) < 1e-12
    assert lr_factor(104, warmup=4, total=104) == 0.0 and lr_factor(500, warmup=4, total=104) == 0.0
    with pytest.raises(ValueError, match="lr_decay"):
        VDTModule(optimizer=OptimizerSettings(lr_decay="linear"))
