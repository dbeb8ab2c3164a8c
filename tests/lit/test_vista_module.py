"""VistaModule: dynamic prior, actions in the conditioning and CFG, exact given latents, the extra losses,
parameter roles, long rollouts (T + (T - overlap)(N - 1) frames) and the uncertainty reward."""

from __future__ import annotations

import pytest
import torch

from vdiff.data.schema import ACTION_SHAPES
from vdiff.lit.vista import ACTIONS_KEY, VISTA_PRIOR_WEIGHTS, VistaModule, dynamic_prior
from vdiff.models.actions import ActionEncoder
from vdiff.models.conditioners import CLIPImageEmbedder
from vdiff.models.unet_svd import UNetSVDConfig

NET = UNetSVDConfig(in_channels=6, out_channels=3, concat_channels=3, model_channels=32, channel_mult=(1, 2),
                    num_res_blocks=1, attention_levels=(1,), head_dim=16, context_dim=24, added_time_embed_dim=32,
                    num_frames=6)
ENCODER = dict(embed_dim=8, future_seconds=(0.1, 0.2, 0.3, 0.4))


def tiny_vista(**kwargs) -> VistaModule:
    kwargs.setdefault("sampler", VistaModule.svd_sampler(2))
    module = VistaModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), action_encoder=ActionEncoder(**ENCODER),
                         **kwargs)
    module.configure_model()
    with torch.no_grad():  # random weights everywhere, zero-initialised action projections included
        g = torch.Generator().manual_seed(0)
        for p in module.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def driving_batch(batch: int = 2, frames: int = 6, size: int = 16, steering: float = 20.0) -> dict:
    actions = {}
    for key, shape in ACTION_SHAPES.items():
        actions[key] = torch.zeros((batch, frames, *shape), dtype=torch.long if key == "command" else torch.float32)
        actions[f"{key}_valid"] = torch.zeros(batch, frames, dtype=torch.bool)
    actions["steering"] = torch.full((batch, frames), steering)
    actions["steering_valid"][:] = True
    actions["speed"] = torch.full((batch, frames), 5.0)
    actions["speed_valid"][:] = True
    g = torch.Generator().manual_seed(1)
    video = torch.nn.functional.avg_pool2d(torch.rand(batch * frames, 3, size, size, generator=g) * 2 - 1, 3, 1, 1)
    return {"video": video.view(batch, frames, 3, size, size), "fps": torch.full((batch,), 10.0),
            "key": [f"c{i}" for i in range(batch)], "actions": actions}


def test_the_network_gets_the_conditioning_frame_mlp_and_action_projections():
    module = tiny_vista()
    assert module.net.config.cond_frame_time_embed and module.net.config.action_dim == module.action_encoder.action_dim
    roles = {module.parameter_role(n) for n in module.net.vista_parameter_names()}
    assert roles == {"new"}
    frozen = tiny_vista(train="temporal")
    assert all(p.requires_grad for n, p in frozen.net.named_parameters() if frozen.parameter_role(n) == "new")


def test_dynamic_prior_draws_the_first_k_frames_with_vista_weights():
    torch.manual_seed(0)
    masks, _ = dynamic_prior({0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}).sample(6000, 6, 1, 1)
    given = masks.flatten(2).all(2)  # (N, T)
    k = given.sum(1)
    assert all(torch.equal(given[i, : int(k[i])], torch.ones(int(k[i]), dtype=torch.bool)) for i in range(50))
    freq = torch.bincount(k, minlength=4).float() / len(k)
    torch.testing.assert_close(freq, torch.tensor([1, 2, 4, 8]) / 15.0, atol=0.02, rtol=0)


def test_actions_condition_the_network_and_the_unconditional_branch_zeroes_them():
    module = tiny_vista()
    batch = driving_batch()
    cond = module.conditioning(batch)
    assert cond[ACTIONS_KEY].shape == (2, module.action_encoder.action_dim) and cond[ACTIONS_KEY].abs().sum() > 0
    assert not module.unconditional(cond)[ACTIONS_KEY].any()
    no_actions = {k: v for k, v in batch.items() if k != "actions"}
    assert not module.conditioning(no_actions)[ACTIONS_KEY].any()  # action-free data = unconditional
    x = torch.randn(2, 6, 3, 16, 16)
    level = torch.tensor([0.2, 0.4])
    left = module.net(x, level, cond)
    right = module.net(x, level, module.conditioning(driving_batch(steering=-20.0)))
    assert (left - right).abs().max() > 1e-4  # steering changes the prediction


def test_given_latents_are_kept_exactly_in_samples():
    module = tiny_vista()
    batch = driving_batch()
    x0 = module.batch_latents(batch, sample=False)
    mask = module.task_given_mask("prediction", 6, 16, 16, 2, 3)
    latents = module.sample_latents(x0, mask, module.conditioning(batch), generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents[:, :3], x0[:, :3]) and not torch.equal(latents[:, 3:], x0[:, 3:])


def test_extra_losses_are_added_and_can_be_switched_off():
    batch = driving_batch()
    on = tiny_vista()
    torch.manual_seed(3)
    losses = on.compute_loss(batch)
    assert {"loss_dynamics", "loss_structure", "loss_extra"} <= set(losses)
    assert losses["loss_extra"] > 0
    off = tiny_vista(dynamics_loss=False, structure_loss=False)
    torch.manual_seed(3)
    plain = off.compute_loss(batch)
    assert float(plain["loss_extra"]) == 0.0


@pytest.mark.parametrize("rounds", [1, 3])
def test_rollout_length_and_continuity(rounds):
    module = tiny_vista()
    batch = driving_batch(frames=6)
    video = module.rollout_rounds(batch, rounds=rounds, overlap=3, generator=torch.Generator().manual_seed(0))
    assert video.shape[1] == 6 + (6 - 3) * (rounds - 1)
    assert torch.equal(video[:, :3], module.decode_latents(module.batch_latents(batch, sample=False))[:, :3])
    again, latents = module.rollout_rounds(batch, rounds=rounds, overlap=3, generator=torch.Generator().manual_seed(0),
                                           return_latents=True)
    assert torch.equal(again, video) and latents.shape[:2] == video.shape[:2]
    assert torch.equal(module.decode_latents(latents), video)  # the latents of exactly those frames, seams included
    with pytest.raises(ValueError, match="action sets"):
        module.rollout_rounds(batch, rounds=2, actions=[batch["actions"]])


def test_rollout_of_25_frame_windows_gives_25_plus_22_per_round():
    net = NET.replace(num_frames=25)
    module = VistaModule(net=net, image_encoder=CLIPImageEmbedder("tiny"), action_encoder=ActionEncoder(**ENCODER),
                         sampler=VistaModule.svd_sampler(1))
    module.configure_model()
    batch = driving_batch(batch=1, frames=25, size=8)
    assert module.rollout_rounds(batch, rounds=3, overlap=3).shape[1] == 25 + 22 * 2


def test_uncertainty_is_the_variance_of_an_ensemble():
    module = tiny_vista()
    values = module.uncertainty(driving_batch(), num_samples=3)
    assert values.shape == (2,) and (values > 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        module.uncertainty(driving_batch(), num_samples=1)


def test_the_default_dynamic_prior_is_vistas_1_2_4_8():
    assert VISTA_PRIOR_WEIGHTS == {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0}
    module = VistaModule(net=NET, action_encoder=ActionEncoder(**ENCODER))  # prior_weights left to the default
    assert dict(zip(module.prior.names, module.prior.weights.tolist())) == {
        "first_0": 1.0, "first_1": 2.0, "first_2": 4.0, "first_3": 8.0}
    torch.manual_seed(0)
    k = module.training_given_mask(torch.zeros(6000, 6, 3, 1, 1)).flatten(2).all(2).sum(1)  # given frames per clip
    freq = torch.bincount(k, minlength=4).float() / len(k)
    torch.testing.assert_close(freq, torch.tensor([1, 2, 4, 8]) / 15.0, atol=0.02, rtol=0)


# ---------------------------------------------------------------- what each rollout round is given (recorded)

LABEL_SIZE = 4


def labelled(values: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T, 3, s, s) frames filled with them."""
    return values.float().view(*values.shape, 1, 1, 1).expand(*values.shape, 3, LABEL_SIZE, LABEL_SIZE).clone()


def labels_of(frames: torch.Tensor) -> torch.Tensor:
    flat = frames.flatten(2)
    assert torch.all(flat == flat[..., :1]), "a frame is not one label"
    return flat[..., 0]


class RoundRecorder:
    """Stands in for VistaModule's latents, decoding, conditioning and sampler: latents are the frames themselves, the
    condition is the label of the window's conditioning frame (and its actions), and round r generates frame j of clip
    b as the label ``1000 b + 10 (r + 1) + j``. Records what each round was given."""

    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def batch_latents(self, batch, sample=True):
        return batch["video"].clone()

    def decode_latents(self, latents, chunk="module", overlap=None):
        return latents.clone()

    def conditioning(self, batch, generator=None):
        return {"frame": labels_of(batch["video"][:, :1])[:, 0], "actions": batch["actions"]}

    def sample_latents(self, given, given_mask, cond=None, *args, **kwargs):
        b, t = given.shape[:2]
        mask = given_mask.expand(b, t, *given.shape[2:]).flatten(2)
        assert torch.all(mask == mask[..., :1]), "the rollout's mask is not whole frames"
        mask = mask[..., 0]  # (B, T)
        k = int(mask[0].sum())
        r = len(self.rounds)
        self.rounds.append({"mask": mask.clone(), "given": labels_of(given[:, :k]), "frame": cond["frame"],
                            "actions": cond["actions"]})
        new = 1000.0 * torch.arange(b).view(b, 1) + 10.0 * (r + 1) + torch.arange(t).view(1, t)
        return torch.where(mask.view(b, t, 1, 1, 1), given, labelled(new))


@pytest.mark.parametrize(("given_frames", "overlap"), [(1, 2), (3, 1), (2, 3)])
def test_each_rollout_round_starts_from_the_last_overlap_frames_of_the_one_before(monkeypatch, given_frames, overlap):
    from vdiff.lit.evaluation import EvalProtocol

    module = VistaModule(net=NET, action_encoder=ActionEncoder(**ENCODER),
                         evaluation=EvalProtocol(task="prediction", given_frames=given_frames))
    recorder = RoundRecorder()
    for name in ("batch_latents", "decode_latents", "conditioning", "sample_latents"):
        monkeypatch.setattr(module, name, getattr(recorder, name))
    b, t, rounds = 2, 6, 4
    context = 1000.0 * torch.arange(b).view(b, 1) - torch.arange(1, t + 1).view(1, t)  # negative for clip 0
    actions = [{"round": torch.full((b,), r)} for r in range(rounds)]
    video = module.rollout_rounds({"video": labelled(context)}, rounds=rounds, overlap=overlap, actions=actions)

    assert len(recorder.rounds) == rounds and video.shape[1] == t + (t - overlap) * (rounds - 1)
    produced = context[:, :given_frames]  # the frames so far, round by round
    for r, record in enumerate(recorder.rounds):
        k = given_frames if r == 0 else overlap  # round 0: the protocol's given frames; then the overlap
        expected_mask = torch.zeros(b, t, dtype=torch.bool)
        expected_mask[:, :k] = True
        assert torch.equal(record["mask"], expected_mask), f"round {r}: mask {record['mask'][0].tolist()}"
        assert torch.equal(record["given"], produced[:, -k:]), (
            f"round {r} was given {record['given'][0].tolist()}, the last {k} frames so far are "
            f"{produced[0, -k:].tolist()}")
        assert torch.equal(record["frame"], produced[:, -k]), f"round {r}: conditioned on {record['frame'].tolist()}"
        assert record["actions"] is actions[r]
        new = 1000.0 * torch.arange(b).view(b, 1) + 10.0 * (r + 1) + torch.arange(k, t).view(1, -1)
        produced = torch.cat([produced, new], dim=1)
    assert torch.equal(labels_of(video), produced)  # the rounds appended in order
