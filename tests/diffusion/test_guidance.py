"""Classifier-free guidance schedules, the batched guided call, and condition dropout."""

from __future__ import annotations

import pytest
import torch

from vdiff.diffusion.edm import EDMDiffusion, EDMPrecond
from vdiff.diffusion.guidance import Guidance, LinearCFG, TriangleCFG, VanillaCFG, drop_conditions, guided_call
from vdiff.diffusion.karras import euler_sample, heun_sample


class CondNet:
    """Output depends on x, the noise level, every condition and the mask; records each call's batch."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.masks: list = []

    def __call__(self, x, noise_level, cond, given_mask):
        self.batches.append(x.shape[0])
        self.masks.append(given_mask)
        out = torch.sin(x) + 0.1 * noise_level.view(-1, 1, 1, 1, 1)
        out = out + cond["image"].view(-1, 1, 1, 1, 1) * x + cond["fps"].view(-1, 1, 1, 1, 1)
        if given_mask is not None:
            out = out + given_mask.to(x.dtype)
        return out


# --- schedules -------------------------------------------------------------------------------------


def test_schedules_follow_the_protocol():
    for schedule in (VanillaCFG(2.0), LinearCFG(), TriangleCFG()):
        assert isinstance(schedule, Guidance)


def test_vanilla_scale():
    torch.testing.assert_close(VanillaCFG(3.5).scale(4), torch.full((4,), 3.5))


def test_linear_scale_per_frame():
    scale = LinearCFG(1.0, 2.5).scale(14)
    assert scale.shape == (14,)
    assert scale[0].item() == pytest.approx(1.0) and scale[-1].item() == pytest.approx(2.5)
    torch.testing.assert_close(scale[1:] - scale[:-1], torch.full((13,), 1.5 / 13))
    torch.testing.assert_close(LinearCFG(1.5, 3.0).scale(25)[12], torch.tensor(2.25))  # SVD-XT midpoint
    assert LinearCFG().scale(1).tolist() == [1.0]


def test_triangle_shape():
    """Period 1: min at the first and last frame, max in the middle, linear in between (a tent)."""
    scale = TriangleCFG(1.0, 3.0).scale(5)
    torch.testing.assert_close(scale, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]))
    scale = TriangleCFG(1.0, 2.5).scale(25)
    assert scale.argmax().item() == 12
    torch.testing.assert_close(scale, scale.flip(0))
    # period 0.5: two tents, fused with a period-1 tent by max
    two = TriangleCFG(0.0, 1.0, period=0.5).scale(9)
    torch.testing.assert_close(two, torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0]))
    fused = TriangleCFG(0.0, 1.0, period=[1.0, 0.5], period_fusing="max").scale(9)
    torch.testing.assert_close(fused, torch.maximum(two, TriangleCFG(0.0, 1.0).scale(9)))
    mean = TriangleCFG(0.0, 1.0, period=[1.0, 0.5], period_fusing="mean").scale(9)
    torch.testing.assert_close(mean, (two + TriangleCFG(0.0, 1.0).scale(9)) / 2)
    with pytest.raises(ValueError, match="period"):
        TriangleCFG(period=0.0)


# --- guided call -----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [VanillaCFG(3.0), LinearCFG(1.0, 2.5), TriangleCFG(1.0, 2.5)])
@pytest.mark.parametrize("mask_kind", ["none", "per_clip", "shared"])
def test_guided_call_matches_two_manual_calls(schedule, mask_kind):
    batch, frames = 3, 5
    x = torch.randn(batch, frames, 2, 4, 4, dtype=torch.float64)
    level = torch.rand(batch, dtype=torch.float64)
    cond = {"image": torch.rand(batch, dtype=torch.float64), "fps": torch.full((batch,), 0.5, dtype=torch.float64)}
    uncond = {"image": torch.zeros(batch, dtype=torch.float64)}  # fps is shared by both halves
    mask = {
        "none": None,
        "per_clip": torch.rand(batch, frames, 1, 1, 1) < 0.5,
        "shared": torch.arange(frames).view(1, frames, 1, 1, 1) < 2,
    }[mask_kind]
    net = CondNet()
    guided = guided_call(net, x, level, cond, uncond, mask, schedule)
    assert net.batches == [2 * batch]  # one batched call

    c = CondNet()(x, level, cond, mask)
    u = CondNet()(x, level, {**cond, **uncond}, mask)
    s = schedule.scale(frames).to(x.dtype).view(1, frames, 1, 1, 1)
    torch.testing.assert_close(guided, u + s * (c - u))


def test_guided_call_without_guidance_is_one_plain_call():
    x = torch.randn(2, 3, 1, 2, 2)
    cond = {"image": torch.ones(2), "fps": torch.zeros(2)}
    for uncond, guidance in [(None, LinearCFG()), ({"image": torch.zeros(2)}, None)]:
        net = CondNet()
        out = guided_call(net, x, torch.zeros(2), cond, uncond, None, guidance)
        assert net.batches == [2]
        torch.testing.assert_close(out, CondNet()(x, torch.zeros(2), cond, None))


def test_guided_call_rejects_mismatched_conditions():
    x = torch.randn(2, 3, 1, 2, 2)
    with pytest.raises(KeyError, match="uncond has keys"):
        guided_call(CondNet(), x, torch.zeros(2), {"image": torch.ones(2)}, {"other": torch.ones(2)}, None, VanillaCFG(2))
    with pytest.raises(ValueError, match="shape"):
        guided_call(CondNet(), x, torch.zeros(2), {"image": torch.ones(2)}, {"image": torch.ones(3)}, None, VanillaCFG(2))


def test_scale_one_equals_conditional():
    x = torch.randn(2, 4, 1, 3, 3, dtype=torch.float64)
    cond = {"image": torch.rand(2, dtype=torch.float64), "fps": torch.zeros(2, dtype=torch.float64)}
    uncond = {"image": torch.zeros(2, dtype=torch.float64)}
    out = guided_call(CondNet(), x, torch.zeros(2, dtype=torch.float64), cond, uncond, None, VanillaCFG(1.0))
    torch.testing.assert_close(out, CondNet()(x, torch.zeros(2, dtype=torch.float64), cond, None))


@pytest.mark.parametrize("sampler", [euler_sample, heun_sample])
def test_samplers_guide_through_guided_call(sampler):
    """A guided sample equals a sample whose network does the two-call CFG mix by hand."""
    noise = torch.randn(2, 4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = {"image": torch.tensor([0.2, 0.7], dtype=torch.float64), "fps": torch.zeros(2, dtype=torch.float64)}
    uncond = {"image": torch.zeros(2, dtype=torch.float64)}
    schedule = LinearCFG(1.0, 2.0)

    def manual(x, level, cond_, mask):
        c = CondNet()(x, level, cond_, mask)
        u = CondNet()(x, level, {**cond_, **uncond}, mask)
        return u + schedule.scale(x.shape[1]).to(x.dtype).view(1, -1, 1, 1, 1) * (c - u)

    diffusion = EDMDiffusion(EDMPrecond())
    net = CondNet()
    guided = sampler(diffusion, net, noise, cond, uncond, schedule, steps=4)
    reference = sampler(diffusion, manual, noise, cond, steps=4)
    torch.testing.assert_close(guided, reference)
    assert set(net.batches) == {4}


# --- condition dropout -----------------------------------------------------------------------------


def test_drop_conditions_rate_within_sampling_error():
    batch, p = 20000, 0.15
    cond = {"image": torch.ones(batch, 3), "actions": torch.ones(batch, 8)}
    out, keep = drop_conditions(cond, p, torch.Generator().manual_seed(0), return_keep=True)
    sigma = (p * (1 - p) / batch) ** 0.5
    for key in cond:
        dropped = (out[key] == 0).all(dim=1)
        assert torch.equal(dropped, ~keep[key])
        assert torch.equal(out[key][keep[key]], cond[key][keep[key]])
        assert abs(dropped.float().mean().item() - p) < 4 * sigma
    # independent draws per key: both dropped with probability p^2
    both = (~keep["image"] & ~keep["actions"]).float().mean().item()
    assert abs(both - p * p) < 4 * (p * p * (1 - p * p) / batch) ** 0.5
    assert torch.all(cond["image"] == 1)  # inputs untouched


def test_drop_conditions_groups_and_per_key_rates():
    batch = 5000
    cond = {"crossattn": torch.ones(batch, 2, 4), "concat": torch.ones(batch, 4, 2, 2), "fps": torch.ones(batch)}
    out, keep = drop_conditions(
        cond, {"crossattn": 0.3, "concat": 0.3}, torch.Generator().manual_seed(1),
        groups=[("crossattn", "concat")], return_keep=True,
    )  # fmt: skip
    assert torch.equal(keep["crossattn"], keep["concat"])
    assert keep["fps"].all() and torch.equal(out["fps"], cond["fps"])
    assert abs((~keep["concat"]).float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / batch) ** 0.5
    with pytest.raises(ValueError, match="different p"):
        drop_conditions(cond, {"crossattn": 0.1, "concat": 0.2}, groups=[("crossattn", "concat")])
    with pytest.raises(KeyError, match="lacks"):
        drop_conditions(cond, {"text": 0.1})


def test_drop_conditions_extremes():
    cond = {"image": torch.randn(16, 3)}
    assert torch.equal(drop_conditions(cond, 0.0)["image"], cond["image"])
    assert torch.all(drop_conditions(cond, 1.0)["image"] == 0)
