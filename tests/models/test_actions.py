"""ActionEncoder: Vista's 19-scalar x 128-d action features from the batch's per-frame actions (layout, values and
constants, sinusoids in closed form, invalid and missing actions as zeros), one action type per training clip, and
per-action CFG dropout."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.models.actions import (
    ACTION_GROUPS,
    ACTION_TYPES,
    VISTA_ACTION_DIM,
    ActionEncoder,
    drop_actions,
    keep_one_action_type,
)

SHAPES = {"speed": (), "yaw_rate": (), "steering": (), "command": (), "trajectory": (4, 2), "goal": (2,)}


def batch_actions(B: int = 2, T: int = 25, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch's action dict as the data modules make it: every key, all valid, random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in SHAPES.items():
        if key == "command":
            out[key] = torch.randint(0, 4, (B, T), generator=g)
        else:
            out[key] = torch.randn(B, T, *shape, generator=g) * (30 if key == "steering" else 2)
        out[f"{key}_valid"] = torch.ones(B, T, dtype=torch.bool)
    return out


def sinusoid(value: float, dim: int = 128) -> torch.Tensor:
    """Vista's per-scalar embedding, by hand: [cos(v f_i), sin(v f_i)], f_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
    return torch.tensor([math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs])


def blocks(features: torch.Tensor, encoder: ActionEncoder, key: str) -> torch.Tensor:
    """(B, n, embed_dim) blocks of one action type."""
    return features[:, encoder.slices()[key]].reshape(features.shape[0], -1, encoder.embed_dim)


# ----------------------------------------------------------------------------- layout and values


def test_layout_is_vistas_19_scalars_of_128_in_its_conditioner_order():
    encoder = ActionEncoder()
    assert encoder.action_dim == VISTA_ACTION_DIM == 2432
    assert ACTION_TYPES == ("command", "trajectory", "speed", "steering", "goal")
    slices = encoder.slices()
    assert [(s.start, s.stop) for s in slices.values()] == [
        (0, 128), (128, 1152), (1152, 1664), (1664, 2176), (2176, 2432),
    ]  # fmt: skip
    assert encoder(batch_actions()).shape == (2, 2432) and encoder(batch_actions()).dtype == torch.float32
    assert list(encoder.parameters()) == []


def test_each_scalar_is_its_sinusoid_in_closed_form_with_vistas_values_and_constants():
    B, T = 2, 25
    actions = batch_actions(B, T)
    actions["command"][:, 0] = torch.tensor([2, 0])
    actions["trajectory"][0, 0] = torch.tensor([[1.0, 0.1], [2.0, 0.2], [3.0, 0.3], [4.0, 0.4]])
    actions["speed"][0] = torch.arange(T, dtype=torch.float32)  # speed at frame f = f m/s
    actions["steering"][0] = 10.0 * torch.arange(T, dtype=torch.float32)
    actions["goal"][0, 0] = torch.tensor([0.25, 0.75])
    encoder = ActionEncoder()
    features = encoder(actions)  # 10 Hz default: speed/steering at frames 5, 10, 15, 20
    expected = {
        "command": [2.0],
        "trajectory": [1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4],  # x1, y1, x2, y2, ...
        "speed": [5.0, 10.0, 15.0, 20.0],
        "steering": [50 / 780, 100 / 780, 150 / 780, 200 / 780],  # Vista's angle / 780
        "goal": [0.25, 0.75],
    }
    for key, values in expected.items():
        got = blocks(features, encoder, key)[0]
        assert got.shape == (len(values), 128), key
        for j, v in enumerate(values):
            torch.testing.assert_close(got[j], sinusoid(v), atol=2e-5, rtol=0, msg=f"{key}[{j}]")
    scalars, valid = encoder.values(actions)
    assert all(bool(v.all()) for v in valid.values())
    torch.testing.assert_close(scalars["speed"][0], torch.tensor([5.0, 10.0, 15.0, 20.0]))


def test_speed_and_steering_frames_follow_each_clips_fps_and_the_reference_frame():
    B, T = 3, 30
    actions = batch_actions(B, T)
    actions["speed"] = torch.arange(T, dtype=torch.float32).expand(B, T).clone()
    encoder = ActionEncoder(reference_frame=2)
    scalars, valid = encoder.values(actions, fps=torch.tensor([10.0, 12.0, 2.0]))
    expected = torch.tensor([[7.0, 12.0, 17.0, 22.0], [8.0, 14.0, 20.0, 26.0], [3.0, 4.0, 5.0, 6.0]])
    torch.testing.assert_close(scalars["speed"], expected, atol=0, rtol=0)
    assert bool(valid["speed"].all())
    scaled, _ = ActionEncoder(speed_scale=3.6).values(actions)
    torch.testing.assert_close(scaled["speed"][0], 3.6 * torch.tensor([5.0, 10.0, 15.0, 20.0]))
    # command / trajectory / goal come from the reference frame (here the last frame)
    last, _ = ActionEncoder(reference_frame=-1).values(actions)
    torch.testing.assert_close(last["goal"], actions["goal"][:, -1])


# ----------------------------------------------------------------------------- invalid and missing actions


def test_invalid_missing_or_non_finite_actions_are_zeros_and_valid_zero_values_are_not():
    B, T = 4, 25
    actions = batch_actions(B, T)
    actions["command_valid"][0, 0] = False  # clip 0: command invalid at the reference frame
    actions["command_valid"][1, 3] = False  # clip 1: another frame: still valid
    actions["speed_valid"][1, 10] = False  # clip 1: one of the 4 speed frames: speed invalid, steering kept
    actions["trajectory"][2, 0, 1, 0] = float("nan")  # clip 2: a non-finite waypoint
    actions["goal"][3, 0] = 0.0  # clip 3: a valid goal of value 0 is its sinusoid, not zeros
    encoder = ActionEncoder()
    features = encoder(actions)
    _, valid = encoder.values(actions)
    assert valid["command"].tolist() == [False, True, True, True]
    assert valid["speed"].tolist() == [True, False, True, True] and bool(valid["steering"].all())
    assert valid["trajectory"].tolist() == [True, True, False, True]
    assert blocks(features, encoder, "command")[0].abs().max() == 0
    assert blocks(features, encoder, "speed")[1].abs().max() == 0
    assert blocks(features, encoder, "steering")[1].abs().max() > 0
    assert blocks(features, encoder, "trajectory")[2].abs().max() == 0 and torch.isfinite(features).all()
    torch.testing.assert_close(blocks(features, encoder, "goal")[3], torch.stack([sinusoid(0.0)] * 2))

    missing = {k: v for k, v in actions.items() if not k.startswith("goal")}  # a key absent: invalid everywhere
    assert encoder(missing)[:, encoder.slices()["goal"]].abs().max() == 0
    none_valid = {k: (torch.zeros_like(v) if k.endswith("_valid") else v) for k, v in actions.items()}
    assert encoder(none_valid).abs().max() == 0  # all invalid: the unconditional vector


def test_speed_frames_past_the_end_of_the_clip_are_invalid():
    actions = batch_actions(2, 12)  # at 10 Hz, frames 15 and 20 lie outside
    encoder = ActionEncoder()
    _, valid = encoder.values(actions)
    assert not valid["speed"].any() and not valid["steering"].any() and valid["trajectory"].all()
    _, valid = encoder.values(actions, fps=4.0)  # frames 2, 4, 6, 8
    assert valid["speed"].all()


def test_the_last_speed_frame_may_be_the_clips_last_frame_but_not_one_past_it():
    encoder = ActionEncoder()  # 10 Hz: frames 5, 10, 15, 20 after the reference frame
    for frames, inside in ((21, True), (20, False)):  # frame 20 is the last of 21 frames, one past the end of 20
        actions = batch_actions(2, frames)
        actions["speed"] = torch.arange(frames, dtype=torch.float32).expand(2, frames).clone()
        scalars, valid = encoder.values(actions)
        assert valid["speed"].tolist() == [inside] * 2 and valid["steering"].tolist() == [inside] * 2, frames
        expected = torch.tensor([5.0, 10.0, 15.0, 20.0]) if inside else torch.zeros(4)
        torch.testing.assert_close(scalars["speed"], expected.expand(2, 4), atol=0, rtol=0)
    _, valid = ActionEncoder(reference_frame=1).values(batch_actions(2, 21))  # frame 21 of 21: outside
    assert not valid["speed"].any()


def test_speed_frames_are_rounded_to_the_nearest_frame_at_rates_where_the_seconds_are_not_whole_frames():
    T = 64
    actions = batch_actions(3, T)
    actions["speed"] = torch.arange(T, dtype=torch.float32).expand(3, T).clone()  # the value is the frame index
    scalars, valid = ActionEncoder().values(actions, fps=torch.tensor([29.97, 9.6, 7.3]))
    # 0.5, 1, 1.5, 2 s: 14.985, 29.97, 44.955, 59.94 -> 15, 30, 45, 60 (truncation: 14, 29, 44, 59);
    # 4.8, 9.6, 14.4, 19.2 -> 5, 10, 14, 19; 3.65, 7.3, 10.95, 14.6 -> 4, 7, 11, 15
    expected = torch.tensor([[15.0, 30.0, 45.0, 60.0], [5.0, 10.0, 14.0, 19.0], [4.0, 7.0, 11.0, 15.0]])
    torch.testing.assert_close(scalars["speed"], expected, atol=0, rtol=0)
    assert bool(valid["speed"].all())


def test_malformed_action_dicts_are_errors_naming_the_key():
    actions = batch_actions(2, 25)
    encoder = ActionEncoder()
    with pytest.raises(KeyError, match="speed_valid"):
        encoder({k: v for k, v in actions.items() if k != "speed_valid"})
    with pytest.raises(ValueError, match=r"actions\['trajectory'\] must be \(2, 25, 4, 2\)"):
        encoder({**actions, "trajectory": actions["trajectory"][..., 0]})
    with pytest.raises(ValueError, match="reference_frame=30"):
        ActionEncoder(reference_frame=30)(actions)
    with pytest.raises(ValueError, match="none of"):
        encoder({})
    with pytest.raises(ValueError, match="future_seconds"):
        ActionEncoder(future_seconds=(0.5, 1.0))


# ----------------------------------------------------------------------------- one action type, CFG dropout


def test_one_action_type_per_clip_is_chosen_uniformly_among_the_valid_ones():
    B = 4000
    valid = {key: torch.ones(B, dtype=torch.bool) for key in ACTION_TYPES}
    valid["goal"][: B // 2] = False  # first half: 3 valid groups; second half: 4
    valid["command"][:10] = False
    valid["trajectory"][:10] = False
    valid["speed"][:10] = False
    valid["steering"][:5] = False  # clips 5..9: only steering among speed + steering; clips 0..4: nothing
    kept = keep_one_action_type(valid, torch.Generator().manual_seed(0))
    again = keep_one_action_type(valid, torch.Generator().manual_seed(0))
    assert all(torch.equal(kept[k], again[k]) for k in ACTION_TYPES)  # seeded
    groups = torch.stack([torch.stack([kept[k] for k in g]).any(0) for g in ACTION_GROUPS], dim=1)  # (B, 4)
    assert groups[:5].sum() == 0 and (groups[5:].sum(1) == 1).all()  # one group per clip that has one
    assert all(bool((kept[k] <= valid[k]).all()) for k in ACTION_TYPES)  # only valid types survive
    assert ((kept["speed"] == kept["steering"]) | ~valid["speed"] | ~valid["steering"]).all()  # kept together
    assert kept["steering"][5:10].all() and not kept["speed"][5:10].any()
    first, second = groups[10 : B // 2].float().mean(0), groups[B // 2 :].float().mean(0)
    torch.testing.assert_close(first, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), atol=0.04, rtol=0)
    torch.testing.assert_close(second, torch.full((4,), 0.25), atol=0.04, rtol=0)


def test_per_action_dropout_drops_each_type_independently_at_its_rate():
    B = 20000
    valid = {key: torch.ones(B, dtype=torch.bool) for key in ACTION_TYPES}
    g = torch.Generator().manual_seed(1)
    kept = drop_actions(valid, 0.15, g)
    rates = torch.stack([1 - kept[k].float().mean() for k in ACTION_TYPES])
    torch.testing.assert_close(rates, torch.full((5,), 0.15), atol=0.01, rtol=0)
    both = (~kept["speed"] & ~kept["steering"]).float().mean()
    assert abs(both.item() - 0.15**2) < 0.006  # independent draws
    partial = drop_actions(valid, {"goal": 1.0}, g)
    assert not partial["goal"].any() and all(partial[k].all() for k in ACTION_TYPES if k != "goal")
    with pytest.raises(KeyError, match="yaw"):
        drop_actions(valid, {"yaw": 0.5}, g)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_actions(valid, 1.5, g)


def test_training_features_keep_one_type_and_drop_it_reproducibly():
    actions = batch_actions(64, 25, seed=3)
    encoder = ActionEncoder()
    a = encoder.training_features(actions, generator=torch.Generator().manual_seed(7))
    b = encoder.training_features(actions, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    scalars, valid = encoder.values(actions)
    g = torch.Generator().manual_seed(7)
    manual = encoder.embed(scalars, drop_actions(keep_one_action_type(valid, g), 0.15, g))
    torch.testing.assert_close(a, manual, atol=0, rtol=0)
    nonzero = torch.stack([blocks(a, encoder, k).flatten(1).abs().amax(1) > 0 for k in ACTION_TYPES], dim=1)
    assert (nonzero.sum(1) <= 2).all()  # one type (two for speed + steering) or none when dropped
    assert (nonzero.sum(1) == 0).any() and (nonzero.sum(1) >= 1).float().mean() > 0.7


def test_the_features_are_what_a_unet_with_vistas_action_dim_reads():
    from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig

    encoder = ActionEncoder()
    model = UNetSVD(UNetSVDConfig.from_name("tiny", action_dim=encoder.action_dim)).eval()
    B, T = 2, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 4, 8, 8, generator=g)
    cond = {
        "context": torch.randn(B, 1, 64, generator=g),
        "concat": torch.randn(B, T, 4, 8, 8, generator=g),
        "added_time_ids": torch.randn(B, 3, generator=g),
        "actions": encoder(batch_actions(B, 25)),
    }
    with torch.no_grad():
        out = model(x, torch.randn(B, generator=g), cond)
    assert out.shape == (B, T, 4, 8, 8) and torch.isfinite(out).all()


def test_the_validity_key_has_one_home():
    """The batch contract (data layer) re-exports the models layer's rule instead of keeping a copy of it."""
    from vdiff.data import batch
    from vdiff.models.actions import valid_key

    assert batch.valid_key is valid_key and valid_key("speed") == "speed_valid"
