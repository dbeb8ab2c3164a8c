"""Video I/O: encode/decode round trip, clip arithmetic, keyframe seeking, corrupt inputs."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from vdiff.data import video_io
from vdiff.data.video_io import (
    VideoDecodeError,
    clip_frame_indices,
    decode_all,
    decode_clip,
    decode_frames,
    encode_video,
    max_clip_start,
    probe,
)

pytestmark = pytest.mark.timeout(60)


def smooth_video(num_frames: int = 16, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Moving colour waves plus a moving white square (like a lane marking).

    Sharp edges between saturated colours would cap PSNR near 33 dB even losslessly: yuv420p halves
    chroma resolution. Luma edges are what the encoder, not the pixel format, must keep.
    """
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = 128 + 90 * np.sin((xx + 2 * t) / 12 + phase[0])
        frames[t, ..., 1] = 128 + 90 * np.cos((yy - t) / 10 + phase[1])
        frames[t, ..., 2] = 128 + 60 * np.sin((xx + yy + t) / 15 + phase[2])
        top, left = 4 + t % (height - 16), 4 + (2 * t) % (width - 16)
        frames[t, top : top + 8, left : left + 8] = (235, 235, 225)  # a white-ish marking: luma edges
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return smooth_video(num_frames=40)


@pytest.fixture(scope="module")
def mp4_small_gop(video) -> bytes:
    return encode_video(video, fps=10, gop_size=6)


# ----------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------


def test_round_trip_frame_count_shape_and_psnr():
    frames = smooth_video(num_frames=16)
    mp4 = encode_video(frames, fps=12)
    info = probe(mp4)
    assert (info.num_frames, info.width, info.height, info.codec) == (16, 64, 48, "h264")
    assert info.fps == pytest.approx(12)
    assert info.duration == pytest.approx(16 / 12, abs=1e-3)
    decoded = decode_frames(mp4, range(16))
    assert decoded.shape == (16, 48, 64, 3) and decoded.dtype == np.uint8
    assert psnr(decoded, frames) >= 35.0
    # every frame, not only on average
    assert min(psnr(decoded[t], frames[t]) for t in range(16)) >= 33.0
    np.testing.assert_array_equal(decode_all(mp4), decoded)


def test_encode_accepts_torch_and_fractional_fps(tmp_path):
    frames = torch.from_numpy(smooth_video(num_frames=6))
    mp4 = encode_video(frames, fps=30000 / 1001)  # NTSC, given as a float
    assert probe(mp4).fps == pytest.approx(30000 / 1001, rel=1e-9)
    assert probe(encode_video(frames, fps=29.97)).fps == pytest.approx(29.97, rel=1e-9)
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4)
    assert decode_frames(path, [0, 5]).shape == (2, 48, 64, 3)
    assert probe(str(path)).num_frames == 6
    assert probe(encode_video(frames.numpy(), fps=17)).fps == pytest.approx(17)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="H=47 W=64"):
        encode_video(np.zeros((2, 47, 64, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((2, 48, 64, 3), np.float32), fps=10)
    with pytest.raises(ValueError, match="shape"):
        encode_video(np.zeros((48, 64, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="fps"):
        encode_video(np.zeros((2, 48, 64, 3), np.uint8), fps=0)


def test_resize_on_decode(mp4_small_gop, video):
    small = decode_frames(mp4_small_gop, [3, 4], size=(24, 32))
    assert small.shape == (2, 24, 32, 3)
    reference = video[[3, 4]].reshape(2, 24, 2, 32, 2, 3).mean(axis=(2, 4))
    assert psnr(small, reference) > 25.0


def test_decode_clip_with_stride_and_fps(mp4_small_gop):
    full = decode_frames(mp4_small_gop, range(40))
    np.testing.assert_array_equal(decode_clip(mp4_small_gop, 5, start=7, stride=3), full[7:22:3])
    # 10 fps source resampled to 5 fps: every other frame
    np.testing.assert_array_equal(decode_clip(mp4_small_gop, 4, start=2, target_fps=5), full[[2, 4, 6, 8]])
    # 10 fps source at 20 fps: frames repeat
    np.testing.assert_array_equal(decode_clip(mp4_small_gop, 4, start=9, target_fps=20), full[[9, 10, 10, 11]])
    with pytest.raises(VideoDecodeError) as err:
        decode_clip(mp4_small_gop, 20, start=30)
    assert err.value.reason == "too_short"


# ----------------------------------------------------------------------------------------------
# Clip arithmetic
# ----------------------------------------------------------------------------------------------


def test_clip_indices_stride():
    assert clip_frame_indices(100, 30, 4) == [0, 1, 2, 3]
    assert clip_frame_indices(100, 30, 4, start=10, stride=5) == [10, 15, 20, 25]
    assert clip_frame_indices(10, 30, 5, start=1, stride=2) == [1, 3, 5, 7, 9]
    with pytest.raises(VideoDecodeError) as err:
        clip_frame_indices(10, 30, 5, start=2, stride=2)
    assert err.value.reason == "too_short"


def test_clip_indices_target_fps():
    # 30 fps at 10 fps: every third frame
    assert clip_frame_indices(100, 30, 5, target_fps=10) == [0, 3, 6, 9, 12]
    assert clip_frame_indices(100, 30, 3, start=4, target_fps=10) == [4, 7, 10]
    # 12 Hz -> 10 Hz: output times 0, 0.1, 0.2, ... s; nearest 12 Hz frames 0, 1.2, 2.4, 3.6, 4.8, 6.0
    assert clip_frame_indices(100, 12, 6, target_fps=10) == [0, 1, 2, 4, 5, 6]
    # 17 fps (Cityscapes) -> 10 fps: 0, 1.7, 3.4, 5.1, 6.8
    assert clip_frame_indices(100, 17, 5, target_fps=10) == [0, 2, 3, 5, 7]
    # upsampling repeats frames
    assert clip_frame_indices(100, 10, 4, target_fps=20) == [0, 1, 1, 2]


def test_max_clip_start_is_tight():
    for n, fps, t, stride, target in [(100, 30, 5, None, 10), (40, 12, 6, None, 10), (20, 10, 5, 3, None), (8, 10, 8, None, None)]:
        last = max_clip_start(n, fps, t, stride=stride, target_fps=target)
        assert clip_frame_indices(n, fps, t, start=last, stride=stride, target_fps=target)[-1] < n
        with pytest.raises(VideoDecodeError):
            clip_frame_indices(n, fps, t, start=last + 1, stride=stride, target_fps=target)
    assert max_clip_start(8, 10, 8) == 0
    assert max_clip_start(7, 10, 8) == -1
    assert max_clip_start(10, 30, 5, target_fps=10) == -1


def test_clip_arguments_are_checked():
    with pytest.raises(ValueError, match="either stride or target_fps"):
        clip_frame_indices(100, 30, 4, stride=2, target_fps=10)
    with pytest.raises(ValueError, match="stride"):
        clip_frame_indices(100, 30, 4, stride=0)
    with pytest.raises(ValueError, match="num_frames"):
        clip_frame_indices(100, 30, 0)


# ----------------------------------------------------------------------------------------------
# Seeking
# ----------------------------------------------------------------------------------------------


class _CountingContainer:
    """Wraps a PyAV input container and records the frame index of every packet it reads."""

    def __init__(self, container, counter: list[int]):
        self._container = container
        self._counter = counter

    def _record(self, items):
        for item in items:
            if item.pts is not None:
                self._counter.append(int(round(item.pts * item.time_base * 10)))  # frame index at 10 fps
            yield item

    def demux(self, *args, **kwargs):
        return self._record(self._container.demux(*args, **kwargs))

    def decode(self, *args, **kwargs):
        return self._record(self._container.decode(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._container, name)


@pytest.fixture
def decoded_indices(monkeypatch):
    seen: list[int] = []
    real_open = av.open
    monkeypatch.setattr(video_io.av, "open", lambda *a, **k: _CountingContainer(real_open(*a, **k), seen))
    return seen


def test_seek_matches_decoding_from_start(mp4_small_gop):
    reference = decode_all(mp4_small_gop)
    assert len(reference) == 40
    for indices in ([30, 31, 32, 33], [39], [17, 5, 17, 25], [6], [12, 13], [0, 39]):
        np.testing.assert_array_equal(decode_frames(mp4_small_gop, indices), reference[indices])


def test_seek_skips_frames_before_the_keyframe(mp4_small_gop, decoded_indices):
    clip = decode_frames(mp4_small_gop, [30, 32, 34])
    assert clip.shape == (3, 48, 64, 3)
    # gop 6: the keyframe at or before frame 30 is at most 6 frames earlier; reading stops soon
    # after frame 34 (B-frames make the decoder read a few packets ahead)
    assert decoded_indices, "decode_frames read no packet through the container"
    assert min(decoded_indices) >= 30 - 6
    assert max(decoded_indices) <= 34 + 4
    assert len(decoded_indices) <= 15


def test_decode_from_start_reads_only_up_to_the_clip(mp4_small_gop, decoded_indices):
    decode_frames(mp4_small_gop, [0, 3])
    assert min(decoded_indices) == 0
    assert max(decoded_indices) <= 3 + 4


def test_strided_clips_match_with_nonreference_frames_skipped():
    # x264's default B-frames: frames outside a strided clip may be dropped by the decoder
    frames = smooth_video(num_frames=60)
    mp4 = encode_video(frames, fps=30)
    reference = decode_all(mp4)
    for indices in (list(range(1, 60, 3)), list(range(10, 50, 2)), [5, 6, 40, 59]):
        np.testing.assert_array_equal(decode_frames(mp4, indices), reference[indices])
    np.testing.assert_array_equal(decode_clip(mp4, 10, start=4, target_fps=10), reference[4:34:3])


# ----------------------------------------------------------------------------------------------
# Corrupt inputs
# ----------------------------------------------------------------------------------------------


def _reason(fn, *args, **kwargs) -> str:
    with pytest.raises(VideoDecodeError) as err:
        fn(*args, **kwargs)
    return err.value.reason


def test_empty_inputs(tmp_path):
    assert _reason(decode_frames, b"", [0]) == "empty"
    assert _reason(probe, b"") == "empty"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert _reason(decode_frames, empty, [0]) == "empty"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        probe(tmp_path / "missing.mp4")


def test_non_video_and_truncated_bytes(mp4_small_gop):
    assert _reason(decode_frames, b"this is not a video at all" * 20, [0]) == "corrupt"
    assert _reason(probe, np.random.default_rng(0).bytes(5000)) == "corrupt"
    for fraction in (0.1, 0.5, 0.95):
        truncated = mp4_small_gop[: int(len(mp4_small_gop) * fraction)]
        assert _reason(decode_frames, truncated, [0, 1]) in {"corrupt", "too_short"}


def test_damaged_stream_never_crashes(mp4_small_gop):
    rng = np.random.default_rng(1)
    for _ in range(5):
        damaged = bytearray(mp4_small_gop)
        for pos in rng.integers(len(damaged) // 2, len(damaged) - 200, 30):
            damaged[pos] ^= 0xFF
        try:
            frames = decode_frames(bytes(damaged), range(0, 40, 4))
            assert frames.shape == (10, 48, 64, 3)
        except VideoDecodeError as err:
            assert err.reason in video_io.DECODE_ERROR_REASONS


def test_json_claims_more_frames_than_the_video_holds():
    mp4 = encode_video(smooth_video(num_frames=8), fps=10)
    claimed_frames = 20  # what a bad json would say
    assert _reason(decode_frames, mp4, range(claimed_frames)) == "too_short"
    assert _reason(decode_clip, mp4, 12) == "too_short"


def test_no_video_stream():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert _reason(probe, buffer.getvalue()) == "no_video_stream"
    assert _reason(decode_frames, buffer.getvalue(), [0]) == "no_video_stream"


def test_odd_size():
    odd = encode_video(np.full((3, 15, 17, 3), 100, np.uint8), fps=10, pix_fmt="yuv444p")
    assert (probe(odd).width, probe(odd).height) == (17, 15)
    assert _reason(decode_frames, odd, [0]) == "odd_size"
    assert decode_frames(odd, [0, 2], allow_odd_size=True).shape == (2, 15, 17, 3)
    assert decode_frames(odd, [0], size=(16, 16), allow_odd_size=True).shape == (1, 16, 16, 3)


def test_decode_error_pickles_with_reason():
    import pickle

    err = pickle.loads(pickle.dumps(VideoDecodeError("corrupt", "bad bytes")))
    assert err.reason == "corrupt" and "bad bytes" in str(err)
    with pytest.raises(ValueError, match="unknown VideoDecodeError reason"):
        VideoDecodeError("mystery", "x")
