"""A researcher adds a loss term without copying the loss: a subclass's ``extra_loss_terms`` gets the step's
x0, given mask, noise level and x0 estimate, and its term reaches the loss, the logged metrics and the gradient."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.lit.test_svd_module import NET, clip_batch
from vdiff.lit.base import TrainingStep
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.svd import SVDModule
from vdiff.models.conditioners import CLIPImageEmbedder


class TemporalSmoothness(SVDModule):
    """SVD plus a penalty on frame-to-frame change of the x0 estimate, on generated frames, weighted by noise level."""

    def extra_loss_terms(self, step: TrainingStep) -> dict[str, torch.Tensor]:
        self.seen = step
        generated = (~step.given_mask).float()  # (B, T, 1, h, w)
        change = (step.denoised[:, 1:] - step.denoised[:, :-1]).abs() * generated[:, 1:]
        return {"smooth": 0.1 * change.flatten(1).mean(1) / (1 + step.noise_level)}  # (B,)


def build(cls, seed: int = 0):
    torch.manual_seed(seed)
    module = cls(net=NET, image_encoder=CLIPImageEmbedder("tiny"), mask_task="prediction",
                 mask_params={"given_frames": 1}, optimizer=OptimizerSettings(lr=1e-3))  # fmt: skip
    module.configure_model()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in module.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.train()


def test_a_subclass_adds_a_term_from_the_steps_tensors_to_loss_and_gradient():
    plain, smooth = build(SVDModule), build(TemporalSmoothness)
    batch = clip_batch()
    torch.manual_seed(3)
    base = plain.compute_loss(batch)
    torch.manual_seed(3)
    losses = smooth.compute_loss(batch)

    step = smooth.seen  # what the subclass was given: the tensors the loss was computed from
    assert step.x0.shape == (2, 4, 3, 16, 16) and torch.equal(step.x0, smooth.batch_latents(batch))
    assert step.given_mask.shape == (2, 4, 1, 16, 16) and step.given_mask[:, 0].all() and not step.given_mask[:, 1:].any()
    assert step.noise_level.shape == (2,) and torch.equal(step.noise_level, base["noise_level"])
    assert step.denoised.requires_grad and set(step.cond) >= {"context", "concat"}

    term = losses["loss_smooth"]
    assert term > 0 and losses["loss_smooth_per_clip"].shape == (2,)
    torch.testing.assert_close(losses["loss"], base["loss"] + term)  # the process's loss is unchanged underneath
    torch.testing.assert_close(losses["loss_per_clip"], base["loss_per_clip"] + losses["loss_smooth_per_clip"])
    assert torch.equal(losses["loss_extra"], term)

    weight = smooth.net.conv_out.weight
    (with_term,) = torch.autograd.grad(losses["loss"], weight, retain_graph=True)
    (without,) = torch.autograd.grad(base["loss"], plain.net.conv_out.weight)
    (term_only,) = torch.autograd.grad(term, weight)
    assert term_only.abs().sum() > 0
    torch.testing.assert_close(with_term, without + term_only)


def test_the_term_is_logged_during_training(tmp_path):
    module = build(TemporalSmoothness)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([clip_batch()], batch_size=None))
    logged = trainer.callback_metrics
    assert {"train/loss", "train/loss_smooth", "train/loss_extra"} <= set(logged)
    assert logged["train/loss_smooth"] > 0 and logged["train/loss"] > logged["train/loss_smooth"]


def test_a_term_that_is_not_per_clip_or_shadows_a_loss_key_is_refused():
    class Bad(SVDModule):
        def __init__(self, term, **kwargs):
            super().__init__(**kwargs)
            self.term = term

        def extra_loss_terms(self, step):
            return self.term(step)

    for term, message in ((lambda s: {"x": s.x0}, r"'x' must be per clip, \(2,\)"),
                          (lambda s: {"extra": s.noise_level}, "'loss_extra' is already a loss key")):  # fmt: skip
        torch.manual_seed(0)
        module = Bad(term, net=NET, image_encoder=CLIPImageEmbedder("tiny"))
        module.configure_model()
        with pytest.raises(ValueError, match=message):
            module.compute_loss(clip_batch())


def test_under_ddpm_a_term_on_the_x0_estimate_trains_the_network_too():
    from tests.lit.test_vdt_module import moving_square_batch
    from vdiff.diffusion.ddpm import GaussianDiffusion
    from vdiff.lit.vdt import VDTModule
    from vdiff.models.vdt import VDTConfig

    class SmoothVDT(VDTModule):
        def extra_loss_terms(self, step):
            return {"smooth": (step.denoised[:, 1:] - step.denoised[:, :-1]).abs().flatten(1).mean(1)}

    torch.manual_seed(0)
    module = SmoothVDT(net=VDTConfig(patch_size=8, depth=1, hidden_size=32, num_heads=2),
                       diffusion=GaussianDiffusion(learn_sigma=True))  # fmt: skip
    module.configure_model()
    with torch.no_grad():  # adaLN-Zero's zero gates and final layer would hide every path
        for param in module.net.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    batch = moving_square_batch(batch=2, frames=4, size=16, seed=1)
    losses = module.compute_loss({"video": batch["video"], "key": batch["key"]})
    (grad,) = torch.autograd.grad(losses["loss_smooth"], module.net.final_layer.linear.weight)
    assert grad.abs().sum() > 0  # the DDPM x0 estimate carries the prediction's gradient
