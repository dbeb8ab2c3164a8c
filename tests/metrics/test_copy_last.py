"""copy_last_given_frame, the baseline every PSNR/SSIM gain is reported against, on hand-built clips.

Frame ``t`` of clip ``b`` is filled with ``100 * b + t`` plus a fixed spatial pattern, so the source of
every output frame (clip and index) can be read back from its values.
"""

from __future__ import annotations

import pytest
import torch

from vdiff.metrics.frames import copy_last_given_frame

T = 6
PATTERN = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5) / 1000.0  # (C, H, W), < 0.1


def labelled_video(batch: int, frames: int = T) -> torch.Tensor:
    """(B, T, 3, 4, 5): frame t of clip b holds 100 b + t + PATTERN."""
    label = 100.0 * torch.arange(batch).view(batch, 1) + torch.arange(frames).view(1, frames)  # (B, T)
    return label.view(batch, frames, 1, 1, 1) + PATTERN


def sources(out: torch.Tensor) -> list[list[int]]:
    """Read back which frame of the same clip each output frame was copied from."""
    batch, frames = out.shape[:2]
    label = (out - PATTERN).round()  # exact: every element of a frame holds the same label
    assert torch.all(label == label[:, :, :1, :1, :1]), "an output frame mixes several source frames"
    values = label[:, :, 0, 0, 0].long()  # (B, T)
    clip = values // 100
    assert torch.equal(clip, torch.arange(batch).view(batch, 1).expand(batch, frames)), "copied across clips"
    return (values % 100).tolist()


def mask(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


CASES = {
    # name: (given frames, the frame each output frame copies)
    "prediction, three given": ("111000", [0, 1, 2, 2, 2, 2]),
    "prediction, one given": ("100000", [0, 0, 0, 0, 0, 0]),
    "backward (given at the end)": ("000011", [4, 4, 4, 4, 4, 5]),
    "interpolation (first and last)": ("100001", [0, 0, 0, 0, 0, 5]),
    "scattered, none at the start": ("010100", [1, 1, 1, 3, 3, 3]),
    "every frame given": ("111111", [0, 1, 2, 3, 4, 5]),
    "nothing given": ("000000", [0, 1, 2, 3, 4, 5]),  # returned unchanged
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_frame_copies_the_latest_given_frame_at_or_before_it(name):
    bits, expected = CASES[name]
    video = labelled_video(1)
    out = copy_last_given_frame(video, mask(bits)[None])
    assert out.shape == video.shape and out.dtype == video.dtype
    assert sources(out) == [expected]


def test_a_batch_with_a_different_mask_per_clip():
    names = list(CASES)
    video = labelled_video(len(names))
    given = torch.stack([mask(CASES[n][0]) for n in names])  # (B, T)
    out = copy_last_given_frame(video, given)
    assert sources(out) == [CASES[n][1] for n in names]
    # given frames are returned exactly, and the input is not modified
    assert torch.equal(out[given], video[given])
    assert torch.equal(video, labelled_video(len(names)))


def test_the_baseline_is_the_last_given_frame_not_the_first():
    """The quickstart's headline gain is measured against this: with several distinct given frames,
    copying the first instead of the last would make the baseline much worse on a moving scene."""
    video = labelled_video(2, frames=8)
    given = torch.zeros(2, 8, dtype=torch.bool)
    given[:, :4] = True  # four given frames
    out = copy_last_given_frame(video, given)
    assert torch.equal(out[:, 4:], video[:, 3:4].expand(2, 4, 3, 4, 5))
    assert not torch.equal(out[:, 4:], video[:, 0:1].expand(2, 4, 3, 4, 5))
