"""VDTModule.rollout conditions every round on the latest frames, not on the first window.

The sampler is replaced by a recording stub (and the autoencoder calls by identities), so the test
reads exactly what each round was given. Frames carry labels: context frame ``i`` of clip ``b`` is
``1000 b - (i + 1)``; frame ``j`` generated in round ``r`` is ``1000 b + 10 (r + 1) + j``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.lit.helpers import vdt_module


def make_module():
    """The one place that builds a VDTModule (a tiny one; the network is never called here)."""
    return vdt_module(patch_size=8, depth=2, hidden_size=32, num_heads=2)


SIZE = 8


def labelled(values: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T, 3, SIZE, SIZE) frames filled with them."""
    return values.float().view(*values.shape, 1, 1, 1).expand(*values.shape, 3, SIZE, SIZE).clone()


def labels_of(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) frames that are constant -> (B, T) labels."""
    flat = frames.flatten(2)
    assert torch.all(flat == flat[..., :1]), "a frame is not one label"
    return flat[..., 0]


class Recorder:
    """Stands in for encode_video / decode_latents / sample_latents and records every round."""

    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def encode_video(self, video, sample=True):
        return video.clone()  # identity "latents"

    def decode_latents(self, latents):
        return latents.clone()

    def sample_latents(self, given, given_mask, cond=None, *args, **kwargs):
        b, w = given.shape[:2]
        frame_given = given_mask.expand(b, w, *given.shape[2:]).flatten(2)  # (B, W, C*h*w)
        assert torch.all(frame_given == frame_given[..., :1]), "rollout's mask is not whole frames"
        frame_given = frame_given[..., 0]  # (B, W)
        r = len(self.rounds)
        k = int(frame_given[0].sum())
        self.rounds.append({"given": labels_of(given[:, :k]), "mask": frame_given.clone(), "window": w})
        new = 1000.0 * torch.arange(b).view(b, 1) + 10.0 * (r + 1) + torch.arange(w).view(1, w)
        return torch.where(frame_given.view(b, w, 1, 1, 1), given, labelled(new))


@pytest.fixture
def stubbed(monkeypatch):
    module = make_module()
    recorder = Recorder()
    for name in ("encode_video", "decode_latents", "sample_latents"):
        monkeypatch.setattr(module, name, getattr(recorder, name))
    return module, recorder


@pytest.mark.parametrize(
    ("context_frames", "given_frames", "window", "num_frames"),
    [(3, 2, 5, 13), (2, 2, 6, 14), (4, 1, 3, 9), (3, 3, 4, 5)],
)
def test_each_round_conditions_on_the_last_frames_produced_so_far(
    stubbed, context_frames, given_frames, window, num_frames
):
    module, recorder = stubbed
    batch = 2
    context = labelled(1000.0 * torch.arange(batch).view(batch, 1) - torch.arange(1, context_frames + 1).view(1, -1))
    out = module.rollout(context, num_frames=num_frames, window=window, given_frames=given_frames, steps=1)

    assert out.shape == (batch, num_frames, 3, SIZE, SIZE)
    new_per_round = window - given_frames
    assert len(recorder.rounds) == math.ceil((num_frames - context_frames) / new_per_round)
    assert torch.equal(out[:, :context_frames], context)

    produced = labels_of(context)  # (B, frames so far)
    for r, record in enumerate(recorder.rounds):
        assert record["window"] == window
        expected_mask = torch.zeros(batch, window, dtype=torch.bool)
        expected_mask[:, :given_frames] = True
        assert torch.equal(record["mask"], expected_mask), f"round {r}: mask {record['mask'][0].tolist()}"
        assert torch.equal(record["given"], produced[:, -given_frames:]), (
            f"round {r} was given {record['given'][0].tolist()}, the last {given_frames} frames so far are "
            f"{produced[0, -given_frames:].tolist()}"
        )
        new = (
            1000.0 * torch.arange(batch).view(batch, 1)
            + 10.0 * (r + 1)
            + torch.arange(given_frames, window).view(1, -1)
        )
        produced = torch.cat([produced, new], dim=1)
    assert torch.equal(labels_of(out), produced[:, :num_frames])  # rounds appended in order, cut to length


def test_rounds_after_the_first_are_given_generated_frames(stubbed):
    """The regression in words: from round 2 on, no given frame is a context frame."""
    module, recorder = stubbed
    context = labelled(-torch.arange(1, 3).view(1, 2).float())
    module.rollout(context, num_frames=12, window=4, given_frames=2, steps=1)
    assert len(recorder.rounds) == 5
    assert torch.all(recorder.rounds[0]["given"] < 0)  # round 1: the context
    for record in recorder.rounds[1:]:
        assert torch.all(record["given"] > 0), record["given"].tolist()
