"""Inference as module methods with explicit arguments: ``SVDModule.image_to_video`` / ``image_latents`` and
``VistaModule``'s rollouts, uncertainty and reward take every setting as an argument, change nothing on the module
(no attribute of it is assigned during a call; the state dict, the settings objects and the training flags are the
same after it) and give what a module configured with those settings gives; ``decode_latents`` decodes in the
chunks it is given."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from tests.lit.test_vista_module import driving_batch, tiny_vista
from vdiff.diffusion.guidance import LinearCFG, TriangleCFG, VanillaCFG
from vdiff.lit.svd import SVDConditioning, SVDModule
from vdiff.lit.vista import VistaModule, recorded_round_actions, rollout_length
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.models.conditioners import CLIPImageEmbedder
from vdiff.models.unet_svd import UNetSVDConfig

NET = UNetSVDConfig(in_channels=8, out_channels=4, concat_channels=4, model_channels=32, channel_mult=(1, 2),
                    num_res_blocks=1, attention_levels=(1,), head_dim=16, context_dim=24, added_time_embed_dim=32,
                    num_frames=4)  # fmt: skip
# what the old `vdiff sample` rewrote for the length of a call, and what else a sampling call could touch
SETTINGS = ("cond_config", "guidance", "sampler", "evaluation", "decode_chunk", "decode_overlap", "paste_cond_frame",
            "mask_task", "sample_actions", "diffusion", "motion_buckets", "net", "autoencoder")  # fmt: skip


def latent_svd(**kwargs) -> SVDModule:
    """A tiny SVD on a tiny temporal-decoder autoencoder (x2), random weights everywhere, so that every setting and
    every decode chunk shows in the output."""
    torch.manual_seed(0)
    autoencoder = VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd"))
    kwargs.setdefault("sampler", SVDModule.svd_sampler(2))
    module = SVDModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), autoencoder=autoencoder, **kwargs)
    module.configure_model()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in [*module.net.parameters(), *autoencoder.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def picture(batch: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def snapshot(module: torch.nn.Module) -> dict:
    """The module's tensors (copied), its settings objects (and their fields), its modules' training flags."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "settings": {name: (getattr(module, name), dict(vars(getattr(module, name)))
                            if hasattr(getattr(module, name), "__dict__") else None)
                     for name in SETTINGS if hasattr(module, name)},  # fmt: skip
        "training": {name: m.training for name, m in module.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
    }


def assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    for name, (value, fields) in before["settings"].items():
        now, now_fields = after["settings"][name]
        assert now is value, f"module.{name} was replaced"
        assert now_fields == fields, f"module.{name} was changed in place"
    assert after["training"] == before["training"] and after["requires_grad"] == before["requires_grad"]


@contextlib.contextmanager
def no_assignment(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch):
    """Records every attribute assigned on ``module`` inside the block (even one restored before it ends)."""
    assigned: list[str] = []
    cls = type(module)
    original = cls.__setattr__

    def spy(self, name, value):
        if self is module:
            assigned.append(name)
        original(self, name, value)

    with monkeypatch.context() as patch:
        patch.setattr(cls, "__setattr__", spy)
        yield assigned


def test_image_to_video_takes_its_settings_as_arguments_and_changes_nothing(monkeypatch):
    module = latent_svd(guidance=LinearCFG(1.0, 2.0))
    image = picture()
    explicit = dict(fps_id=9.0, motion_bucket_id=30.0, cond_aug=0.1, guidance=LinearCFG(1.5, 3.0))
    before = snapshot(module)
    with no_assignment(module, monkeypatch) as assigned:
        video = module.image_to_video(image, 4, **explicit, generator=seeded(0), decode_chunk=2, decode_overlap=1,
                                      sampler=module.sampler_with(steps=3))  # fmt: skip
    assert assigned == [], f"image_to_video assigned module.{assigned}"
    assert_unchanged(module, before)
    assert video.shape == (1, 4, 3, 16, 16)

    # a module configured with those settings, sampled with its own: the same video, bit for bit
    configured = latent_svd(conditioning=SVDConditioning(fps_id=9.0, motion_bucket_id=30.0, cond_aug=0.1),
                            guidance=LinearCFG(1.5, 3.0), sampler=SVDModule.svd_sampler(3), decode_chunk=2,
                            decode_overlap=1)  # fmt: skip
    configured.load_state_dict(module.state_dict())
    assert torch.equal(video, configured.decode_latents(configured.image_latents(image, 4, generator=seeded(0))))
    # and each setting matters (the module's own give another video)
    assert not torch.allclose(module.image_to_video(image, 4, generator=seeded(0)), video)


def test_image_to_video_settings_come_from_the_arguments_then_the_module_then_svd():
    module = latent_svd()  # conditioning: no fps_id, no motion bucket, cond_aug 0.02; guidance LinearCFG(1.0, 2.5)
    plain = module.image_to_video_settings(4)
    assert (plain.fps_id, plain.fps, plain.motion_bucket_id, plain.cond_aug) == (6.0, 7.0, 127.0, 0.02)
    assert plain.guidance is module.guidance
    assert module.image_to_video_settings(4, source_fps=12.5).fps_id == 11.5  # the video's rate - 1
    assert module.image_to_video_settings(4, fps_id=3, source_fps=12.5).fps_id == 3.0
    configured = latent_svd(conditioning=SVDConditioning(fps_id=9, motion_bucket_id=30, cond_aug=0.1),
                            guidance=VanillaCFG(1.0))  # fmt: skip
    settings = configured.image_to_video_settings(4, source_fps=12.5)
    assert (settings.fps_id, settings.motion_bucket_id, settings.cond_aug) == (9.0, 30.0, 0.1)
    assert settings.guidance is None  # a scale of 1 at every frame: no guidance, one conditional call per step
    assert module.image_to_video_settings(4, guidance=LinearCFG(1.0, 1.0)).guidance is None
    assert repr(module.guidance_with(min_scale=1.5)) == "LinearCFG(min_scale=1.5, max_scale=2.5)"
    assert module.guidance_with() is module.guidance


def test_image_to_video_refuses_what_it_cannot_sample():
    module = latent_svd()
    with pytest.raises(ValueError, match=r"^SVDModule.image_to_video: size 14x16 \(WxH\) is not divisible by 4: "):
        module.image_to_video(torch.zeros(1, 3, 16, 14), 4)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\), got \(3, 16, 16\)"):
        module.image_to_video(torch.zeros(3, 16, 16), 4)
    with pytest.raises(ValueError, match="noise must have shape"):
        module.image_to_video(picture(), 4, noise=torch.zeros(1, 4, 4, 4, 4))
    late = latent_svd(conditioning=SVDConditioning(frame=5))
    with pytest.raises(ValueError, match="conditions on frame 5; num_frames=4 is too short"):
        late.image_to_video(picture(), 4)
    interpolating = latent_svd(mask_task="interpolation")
    with pytest.raises(ValueError, match="trained with mask_task='interpolation'"):
        interpolating.image_to_video(picture(), 4)


def test_decode_latents_decodes_in_the_chunks_it_is_given():
    module = latent_svd(decode_chunk=2, decode_overlap=1)
    latents = torch.randn(1, 4, 4, 8, 8, generator=seeded(3))
    unscaled = latents / module.latent_scale + module.latent_shift
    decode = module.autoencoder.decode
    whole = decode(unscaled).clamp(-1, 1)
    assert torch.equal(module.decode_latents(latents, chunk=None), whole)
    assert torch.equal(module.decode_latents(latents, 3, 1), decode(unscaled, chunk_size=3, overlap=1).clamp(-1, 1))
    assert torch.equal(module.decode_latents(latents), decode(unscaled, chunk_size=2, overlap=1).clamp(-1, 1))
    assert torch.equal(module.decode_latents(latents, overlap=0), decode(unscaled, chunk_size=2).clamp(-1, 1))
    assert not torch.allclose(module.decode_latents(latents, 3, 1), whole)  # the temporal decoder sees its chunk
    with pytest.raises(ValueError, match="need chunk >= 1 and 0 <= overlap < chunk, got chunk=2, overlap=2"):
        module.decode_latents(latents, 2, 2)
    assert (module.decode_chunk, module.decode_overlap) == (2, 1)


def test_rollouts_and_uncertainty_take_their_settings_as_arguments_and_change_nothing(monkeypatch):
    module = tiny_vista()  # evaluation: 3 given frames
    batch = driving_batch(batch=1, frames=6, size=8)
    guidance, sampler = TriangleCFG(1.0, 2.5), module.sampler_with(steps=1)
    explicit = dict(guidance=guidance, sampler=sampler, given_frames=1)
    default = module.rollout_rounds(batch, rounds=2, overlap=2, generator=seeded(0))
    before = snapshot(module)
    with no_assignment(module, monkeypatch) as assigned:
        video, latents = module.rollout_rounds(batch, rounds=2, overlap=2, generator=seeded(0), return_latents=True,
                                               decode_chunk=4, decode_overlap=1, **explicit)  # fmt: skip
        values = module.uncertainty(batch, num_samples=2, seed=3, **explicit)
    assert assigned == [], f"assigned module.{assigned}"
    assert_unchanged(module, before)
    assert video.shape[1] == latents.shape[1] == rollout_length(6, 2, 2) and not torch.equal(video, default)

    # the old tool path: the same settings written onto the module for the call
    module.evaluation = dataclasses.replace(module.evaluation, given_frames=1)
    module.sampler, module.guidance, module.decode_chunk, module.decode_overlap = sampler, guidance, 4, 1
    old_video, old_latents = module.rollout_rounds(batch, rounds=2, overlap=2, generator=seeded(0),
                                                   return_latents=True)  # fmt: skip
    assert torch.equal(video, old_video) and torch.equal(latents, old_latents)
    assert torch.equal(module.uncertainty(batch, num_samples=2, seed=3), values)


def test_rollout_actions_are_batched_per_round():
    module = tiny_vista()
    recorded = [{"speed": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}, None]
    rounds = module.recorded_rollout_actions(recorded, rounds=3, window=4, overlap=1)  # frames 0-3, 3-6, 6-9
    assert len(rounds) == 3 and rounds[1]["speed"].shape == (2, 4)
    assert rounds[1]["speed"][0].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert rounds[2]["speed_valid"][0].tolist() == [True, True, False, False]  # past the recording: invalid
    assert not rounds[0]["speed_valid"][1].any()  # nothing recorded for clip 1
    shared = module.rollout_actions([recorded_round_actions({"steering": [5.0] * 4}, 0, 4)] * 2, batch_size=3)
    assert len(shared) == 2 and shared[1]["steering"].shape == (3, 4) and shared[1]["steering_valid"].all()
    assert rounds[0]["speed"].device == module.device


def test_vistas_reward_averages_the_variance_over_all_frames():
    rewards = VistaModule.reward(torch.tensor([0.5, 0.0]), num_frames=25, given_frames=3)
    torch.testing.assert_close(rewards, torch.exp(torch.tensor([-0.5 * 22 / 25, 0.0])))
