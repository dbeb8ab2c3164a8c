import cv2
import numpy as np
import pytest

from tests.convert.helpers import moving_video
from vdiff.data.convert.curation import detect_scene_cuts, motion_score


@pytest.mark.parametrize("kind", ["adaptive", "content"])
def test_scene_cuts_found_where_videos_were_spliced(kind):
    video = np.concatenate(
        [moving_video(0, 25), moving_video(1, 20, variant=1), moving_video(2, 25, variant=2)]
    )  # splices at frames 25 and 45
    assert detect_scene_cuts(video, fps=10.0, kind=kind) == [25, 45]


def test_no_cut_in_one_continuous_shot():
    assert detect_scene_cuts(moving_video(3, 40), fps=10.0) == []


def detailed_pan(num_frames: int, shift: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Blurred noise (fine detail Farneback can track) panning ``shift`` px per frame."""
    noise = np.random.default_rng(0).uniform(0, 255, (height, width + shift * num_frames, 3)).astype(np.float32)
    canvas = np.clip(cv2.GaussianBlur(noise, (0, 0), 1.5) * 3 - 255, 0, 255).astype(np.uint8)
    return np.stack([canvas[:, i * shift : i * shift + width] for i in range(num_frames)])


def test_motion_score_matches_the_known_translation():
    # 1 px per frame at 10 fps: pairs 0.5 s apart move 5 px at a shorter side of 48 px,
    # which the score expresses at a shorter side of 128 px: 5 * 128 / 48.
    expected = 5 * 128 / 48
    assert motion_score(detailed_pan(21, 1), fps=10.0) == pytest.approx(expected, rel=0.2)
    # 1 px per frame at 5 fps is half the motion per half second (pairs 2 frames = 0.4 s apart).
    assert motion_score(detailed_pan(11, 1), fps=5.0) == pytest.approx(expected / 2, rel=0.2)


def test_static_clip_scores_near_zero():
    still = np.repeat(moving_video(5, 1), 20, axis=0)
    assert motion_score(still, fps=10.0) < 0.05
    with pytest.raises(ValueError, match="at least 2 frames"):
        motion_score(still[:1], fps=10.0)
