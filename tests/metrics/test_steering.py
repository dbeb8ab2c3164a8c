"""lateral_shift: known shifts (whole and sub-pixel, both ways) are measured with their sign (+ = content moves
right), bands of rows are measured apart, flat content gives 0, and on vdiff's synthetic drives a left turn
(+ steering) gives a positive shift."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.metrics.steering import band_rows, lateral_shift, lateral_shifts


def smooth_image(height: int = 24, width: int = 48, seed: int = 0, max_freq: int = 8) -> torch.Tensor:
    """A random band-limited grey image (H, W), periodic along W (frequencies below ``max_freq`` cycles a width)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.zeros(height, width // 2 + 1, dtype=torch.complex64)
    spectrum[:, 1:max_freq] = torch.complex(
        torch.randn(height, max_freq - 1, generator=g), torch.randn(height, max_freq - 1, generator=g)
    )
    image = torch.fft.irfft(spectrum, n=width, dim=1)
    return image / image.std()


def shifted(image: torch.Tensor, shift: float) -> torch.Tensor:
    """``image`` moved RIGHT by ``shift`` pixels (exact for band-limited periodic content): out(x) = image(x - shift)."""
    width = image.shape[-1]
    k = torch.fft.rfftfreq(width, d=1.0)  # cycles per pixel
    phase = torch.exp(-2j * math.pi * k * shift).to(torch.complex64)
    return torch.fft.irfft(torch.fft.rfft(image, dim=-1) * phase, n=width, dim=-1)


def moving_video(per_frame: float, frames: int = 6, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """(1, T, C, H, W): a smooth image moving right by ``per_frame`` pixels each frame."""
    image = smooth_image(seed=seed)
    video = torch.stack([shifted(image, per_frame * t) for t in range(frames)])  # (T, H, W)
    return video[None, :, None].expand(-1, -1, channels, -1, -1).contiguous()


@pytest.mark.parametrize("per_frame", [-2.6, -1.0, -0.35, 0.2, 0.75, 1.5, 3.0])
def test_known_shifts_are_measured_with_their_sign_to_sub_pixel(per_frame):
    measured = lateral_shift(moving_video(per_frame), max_shift=4)
    assert measured.shape == (1,)
    assert float(measured) == pytest.approx(per_frame, abs=0.04)


@pytest.mark.parametrize("per_frame", [0.02, -0.02, 0.03, -0.03, 0.13, -0.37, 1.01, -1.68])
def test_shifts_between_grid_points_are_refined_towards_the_truth(per_frame):
    """Off the 0.05 px grid, the parabola's vertex moves the best grid point towards the true shift: within 0.006 px
    (a refinement the wrong way lands 0.02-0.04 px off, and for +-0.02 px on the wrong side of zero)."""
    measured = float(lateral_shift(moving_video(per_frame), max_shift=4))
    assert measured == pytest.approx(per_frame, abs=0.006)
    assert math.copysign(1.0, measured) == math.copysign(1.0, per_frame)


def test_a_bar_moving_right_is_positive_and_left_negative():
    video = torch.zeros(2, 3, 1, 8, 32)
    for t in range(3):
        video[0, t, :, :, 10 + 2 * t] = 1.0  # moves right 2 px per frame
        video[1, t, :, :, 20 - t] = 1.0  # moves left 1 px per frame
    video = torch.nn.functional.avg_pool2d(video.flatten(0, 1), (1, 3), 1, (0, 1)).view(2, 3, 1, 8, 32)
    per_pair = lateral_shifts(video)
    assert per_pair.shape == (2, 2)
    torch.testing.assert_close(per_pair, torch.tensor([[2.0, 2.0], [-1.0, -1.0]]), atol=0.05, rtol=0)


def test_each_clip_of_a_batch_and_each_band_of_rows_is_measured_apart():
    right, left = moving_video(1.25, seed=1), moving_video(-0.5, seed=2)
    batch = torch.cat([right, left])  # (2, T, C, H, W)
    torch.testing.assert_close(lateral_shift(batch), torch.tensor([1.25, -0.5]), atol=0.04, rtol=0)
    stacked = torch.cat([right, left], dim=3)  # the top half moves right, the bottom half left
    assert float(lateral_shift(stacked, rows=(0.0, 0.5))) == pytest.approx(1.25, abs=0.04)
    assert float(lateral_shift(stacked, rows=(0.5, 1.0))) == pytest.approx(-0.5, abs=0.04)


def test_frames_select_the_pairs_averaged():
    image = smooth_image()
    steps = [0.0, 0.0, 1.0, 2.0, 3.0]  # still, then moving right 1 px a frame
    video = torch.stack([shifted(image, s) for s in steps])[None, :, None]
    torch.testing.assert_close(
        lateral_shifts(video, max_shift=3), torch.tensor([[0.0, 1.0, 1.0, 1.0]]), atol=0.04, rtol=0
    )
    assert float(lateral_shift(video, frames=slice(1, None), max_shift=3)) == pytest.approx(1.0, abs=0.04)


def test_flat_content_has_no_shift_and_bad_arguments_are_named():
    flat = torch.ones(2, 4, 3, 16, 32)
    assert torch.equal(lateral_shift(flat), torch.zeros(2))
    vertical_gradient = torch.linspace(-1, 1, 16)[None, None, None, :, None].expand(1, 3, 3, 16, 32)
    assert torch.equal(lateral_shift(vertical_gradient), torch.zeros(1))  # a sky: no horizontal structure
    with pytest.raises(ValueError, match="T >= 2"):
        lateral_shift(torch.zeros(1, 1, 3, 8, 32))
    with pytest.raises(ValueError, match="rows"):
        lateral_shift(flat, rows=(0.6, 0.4))
    with pytest.raises(ValueError, match="max_shift"):
        lateral_shift(flat, max_shift=20)
    assert band_rows(32, (0.4, 0.65)) == slice(13, 21) and band_rows(32, None) == slice(0, 32)


@pytest.mark.parametrize("steering", [90.0, -90.0])
def test_on_synthetic_drives_a_left_turn_moves_the_horizon_band_right(steering):
    from vdiff.data.synthetic import render_drive

    frames, actions = render_drive(8, 32, seed=3, speed=6.0, steering=steering, num_cars=0, num_bouncers=0)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 127.5 - 1  # (1, T, 3, H, W)
    shift = float(lateral_shift(video, rows=(0.2, 0.4)))  # the hills above the horizon (row 40%)
    assert math.copysign(1.0, shift) == math.copysign(1.0, actions["steering"][0]) == math.copysign(1.0, steering)
    # The camera yaws by speed * kappa / fps a frame, which moves distant content focal * that many pixels.
    kappa = math.tan(math.radians(abs(steering)) / 15.0) / 2.7
    expected = 16.0 / math.tan(math.radians(45.0)) * 6.0 * kappa / 10.0
    assert abs(shift) == pytest.approx(expected, rel=0.25)


@pytest.mark.parametrize("steering", [200.0, -200.0, 60.0, -60.0])
def test_on_open_ground_the_skyline_band_reads_the_turn_from_one_frame_pair(steering):
    """The Vista quickstart's measurement: open ground under a tall skyline, 5 fps, ONE pair of 32x32 frames (its
    clips are a given frame and a generated one), the band of rows from 10% of the height to the horizon."""
    from vdiff.data.synthetic import render_drive

    options = dict(road=False, ground_texture=2.0, hill_height=3.0, hill_haze=0.0, num_cars=0, num_bouncers=0,
                   post_spacing=0.0, tree_spacing=0.0, fov_deg=60.0, horizon=0.45)
    for seed in range(4):
        frames, _ = render_drive(2, 32, seed=seed, fps=5.0, speed=4.5, steering=steering, **options)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 127.5 - 1
        shift = float(lateral_shift(video, rows=(0.1, 0.45)))
        assert math.copysign(1.0, shift) == math.copysign(1.0, steering), (seed, shift)
        if abs(steering) == 200.0:  # f * yaw per frame: 27.7 px * tan(200/15 deg)/2.7 m * 0.9 m
            assert abs(shift) == pytest.approx(27.7 * math.tan(math.radians(200.0 / 15.0)) / 2.7 * 0.9, rel=0.3)
