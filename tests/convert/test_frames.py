import numpy as np
import pytest

from tests.convert.helpers import frame_index_from_level, indexed_video
from vdiff.data.convert.frames import crop_box, resize_image
from vdiff.data.video_io import VideoDecodeError, clip_frame_indices, encode_video, iter_frames, output_size


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("frames") / "v.mp4"
    path.write_bytes(encode_video(indexed_video(40, level_step=6), 20.0))  # 2 s at 20 fps
    return path


@pytest.mark.parametrize("fps", [7.0, 10.0, 20.0])
def test_resampling_matches_clip_frame_indices(video_path, fps):
    frames = list(iter_frames(video_path, target_fps=fps))
    expected = clip_frame_indices(40, 20.0, len(frames), target_fps=fps)  # video_io's nearest-frame rule
    assert [frame_index_from_level(f.rgb, level_step=6) for f in frames] == expected
    # every output time whose nearest source frame exists, and no more
    assert len(frames) == 1 + max(k for k in range(100) if int(k * 20.0 / fps + 0.5) <= 39)


def test_time_range_and_size(video_path):
    frames = list(iter_frames(video_path, start_time=0.5, end_time=1.0, max_side=24))
    assert [frame_index_from_level(f.rgb, level_step=6) for f in frames] == list(range(10, 21))
    assert frames[0].rgb.shape == (16, 24, 3) and frames[0].time == pytest.approx(0.5)


def test_errors(tmp_path):
    (tmp_path / "bad.mkv").write_bytes(b"\x1a\x45\xdf\xa3 nonsense" * 10)
    with pytest.raises(VideoDecodeError) as info:
        list(iter_frames(tmp_path / "bad.mkv"))
    assert info.value.reason == "corrupt"
    with pytest.raises(FileNotFoundError):
        list(iter_frames(tmp_path / "missing.mp4"))


def test_image_helpers():
    assert output_size(1920, 1080, 512) == (288, 512) and output_size(33, 21, None) == (20, 32)
    assert crop_box(1024, 2048, 128, 128) == (0, 512, 1024, 1024)
    assert crop_box(900, 1600, 576, 576) == (0, 350, 900, 900)
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255
    assert resize_image(image, (10, 10), "crop").min() == 255  # the centre 20x20 is all white
    assert resize_image(image, (10, 10), "squash")[:, 0].max() == 0
