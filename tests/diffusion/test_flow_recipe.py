"""Flow matching from a recipe: recipes/quickstart_flow.yaml is the VDT quickstart with the flow process (same fixed
steps, same everything else), and a tiny VDT built from it trains a step and samples with the flow sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.lit.helpers import TINY_VDT
from vdiff.diffusion.flow import FlowMatching, LogitNormalTime
from vdiff.lit.cli import build_lightning_cli
from vdiff.lit.vdt import VDTModule

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FLOW = RECIPES / "quickstart_flow.yaml"


def test_the_flow_quickstart_differs_from_the_quickstart_in_the_process_and_sampler_only():
    ddpm, flow = (yaml.safe_load((RECIPES / name).read_text()) for name in ("quickstart.yaml", "quickstart_flow.yaml"))
    assert flow["model"]["init_args"]["diffusion"]["class_path"] == "vdiff.diffusion.flow.FlowMatching"
    assert flow["model"]["init_args"]["sampler"]["name"] == "flow_euler"
    for recipe in (ddpm, flow):
        del recipe["model"]["init_args"]["diffusion"], recipe["model"]["init_args"]["sampler"]
    assert flow["trainer"]["logger"]["init_args"].pop("name") == "quickstart_flow"
    ddpm["trainer"]["logger"]["init_args"].pop("name")
    assert flow == ddpm  # same steps (trainer.max_steps), data, network, optimiser, callbacks, protocol


def test_a_tiny_vdt_from_the_flow_recipe_trains_and_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_lightning_cli(["-c", str(FLOW), *TINY_VDT, "--trainer.logger.init_args.save_dir", str(tmp_path)],
                              run=False)
    module = cli.model
    assert isinstance(module, VDTModule) and isinstance(module.diffusion, FlowMatching)
    assert isinstance(module.diffusion.time_sampler, LogitNormalTime) and module.diffusion.shift == 1.0
    assert module.sampler.name == "flow_euler" and module.sampler.steps == 3
    module.configure_model()
    assert module.network_config().learn_sigma is False  # the network outputs the velocity only
    torch.manual_seed(0)
    video = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    batch = {"video": video, "key": ["a", "b"]}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = module.compute_loss(batch)
    t = losses["noise_level"]
    assert t.shape == (2,) and bool(((t > 0) & (t < 1)).all())
    assert torch.isfinite(losses["loss"]) and losses["vb"].item() == 0
    losses["loss"].backward()
    grads = [p.grad for p in module.net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    optimizer.step()

    calls: list[torch.Tensor] = []
    forward = module.net.forward

    def recording(x, noise_level, cond, given_mask):
        calls.append(noise_level.clone())
        return forward(x, noise_level, cond, given_mask)

    module.net.forward = recording
    out = module.generate(batch, generator=torch.Generator().manual_seed(0))
    assert out.video.shape == video.shape
    assert torch.equal(out.video[:, :2], video[:, :2])  # the recipe's 2 given frames come back exactly
    assert [float(level[0]) for level in calls] == pytest.approx([1000.0, 2000 / 3, 1000 / 3])  # 3 Euler steps


def test_vista_trains_with_flow_matching_and_its_x0_losses():
    """The UNet families take the flow process too: with no sampler named, Vista (through SVD's constructor) gets
    the flow sampler, its dynamics and structure losses weight the x0 errors with ``FlowMatching.weight``, and a
    guided, action-conditioned sample keeps the given frames."""
    from tests.lit.test_vista_module import ENCODER, NET, driving_batch
    from vdiff.lit.vista import VistaModule
    from vdiff.models.actions import ActionEncoder
    from vdiff.models.conditioners import CLIPImageEmbedder

    module = VistaModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), action_encoder=ActionEncoder(**ENCODER),
                         diffusion=FlowMatching(shift=2.0))
    assert module.sampler.name == "flow_euler"
    module.configure_model()
    torch.manual_seed(0)
    batch = driving_batch()
    step = module.loss_step(batch)
    losses = module.compute_loss(batch)
    assert torch.isfinite(losses["loss"]) and "loss_dynamics" in losses and "loss_structure" in losses
    t = step.noise_level
    assert bool(((t > 0) & (t < 1)).all())
    losses["loss"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.net.parameters())
    out = module.generate(batch, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.video.shape == batch["video"].shape and bool(torch.isfinite(out.video).all())
    given = out.given_frames[0]
    assert bool(given.any()) and torch.equal(out.video[:, given], batch["video"][:, given])
