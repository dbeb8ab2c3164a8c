import argparse
import json

import av
import numpy as np
import pytest

from tests.convert.helpers import frame_index_from_level, indexed_video, moving_video, read_shard_set
from vdiff.data.convert import folder
from vdiff.data.convert.folder import ClipOptions, build_folder_shards
from vdiff.data.schema import Manifest
from vdiff.data.video_io import encode_video


def write(path, frames, fps=10.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(frames, fps))


def write_mkv(path, frames, fps=10):
    """A Matroska/MPEG-4 Part 2 input (not what our encoder writes) to check other containers decode."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def test_scene_cuts_split_clips_and_short_tails_are_dropped(tmp_path):
    spliced = np.concatenate([moving_video(0, 25, shift=2), moving_video(1, 25, shift=2, variant=1)])  # cut at 25
    write(tmp_path / "src" / "spliced.mp4", spliced)
    report = build_folder_shards(tmp_path / "src", tmp_path / "out", ClipOptions(clip_frames=10))
    samples = read_shard_set(tmp_path / "out")
    metas = sorted((m.extra["first_frame"], m.extra["scene"]) for _, m in samples.values())
    # scene 0: frames 0-9, 10-19 (20-24 too short); scene 1: 25-34, 35-44 (45-49 too short)
    assert metas == [(0, 0), (10, 0), (25, 1), (35, 1)]
    assert report.clips_kept == 4 and report.dropped["too_short"] == 2
    for frames, meta in samples.values():
        first = meta.extra["first_frame"]
        assert frames.shape == (10, 48, 64, 3) and meta.fps == 10.0 and meta.actions == {}
        errors = {
            offset: np.abs(frames.astype(int) - spliced[first + offset : first + offset + 10].astype(int)).mean()
            for offset in (-1, 0, 1)
            if 0 <= first + offset <= len(spliced) - 10
        }
        assert errors[0] < 5 and errors[0] == min(errors.values()), f"clip at {first} is not source frames {first}.."


def test_fps_resampling_and_max_side(tmp_path):
    source = indexed_video(40, height=48, width=80, level_step=6)  # 30 fps, 1.33 s
    write(tmp_path / "src" / "a" / "fast.mp4", source, fps=30.0)
    options = ClipOptions(clip_frames=12, fps=10.0, max_side=40, scene_detector="none", motion=False)
    build_folder_shards(tmp_path / "src", tmp_path / "out", options)
    ((frames, meta),) = read_shard_set(tmp_path / "out").values()
    assert meta.fps == 10.0 and (meta.height, meta.width) == (24, 40) and frames.shape == (12, 24, 40, 3)
    assert [frame_index_from_level(f, level_step=6) for f in frames] == list(range(0, 36, 3))  # every third frame
    assert meta.extra["input"] == "a/fast.mp4"


def test_static_clips_are_filtered_by_motion(tmp_path):
    write(tmp_path / "src" / "moving.mp4", moving_video(2, 20, shift=2))
    write(tmp_path / "src" / "static.mp4", np.repeat(moving_video(3, 1), 20, axis=0))
    report = build_folder_shards(tmp_path / "src", tmp_path / "out", ClipOptions(clip_frames=10, min_motion=0.5))
    samples = read_shard_set(tmp_path / "out")
    assert {m.extra["input"] for _, m in samples.values()} == {"moving.mp4"}
    assert all(m.extra["motion_score"] > 0.5 for _, m in samples.values())
    assert report.dropped["static"] == 2 and report.clips_kept == 2


def test_corrupt_inputs_are_reported_and_skipped(tmp_path):
    write(tmp_path / "src" / "good.mp4", moving_video(4, 10))
    write_mkv(tmp_path / "src" / "other.mkv", moving_video(5, 10))
    (tmp_path / "src" / "garbage.mov").write_bytes(b"not a video" * 50)
    (tmp_path / "src" / "empty.webm").write_bytes(b"")
    good = encode_video(moving_video(6, 10), 10.0)
    (tmp_path / "src" / "truncated.avi").write_bytes(good[: len(good) // 3])
    report = build_folder_shards(tmp_path / "src", tmp_path / "out", ClipOptions(clip_frames=10, motion=False))
    failed = {rel: reason for rel, reason, _ in report.failed}
    assert set(failed) == {"garbage.mov", "empty.webm", "truncated.avi"}
    assert failed["empty.webm"] == "empty"
    inputs = {m.extra["input"] for _, m in read_shard_set(tmp_path / "out").values()}
    assert inputs == {"good.mp4", "other.mkv"}
    assert "FAILED garbage.mov" in report.summary()


def test_resume_skips_finished_inputs(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "one.mp4", moving_video(7, 20))
    write(src / "two.mp4", moving_video(8, 20))
    options = ClipOptions(clip_frames=10, motion=False)
    first = build_folder_shards(src, out, options, commit_every=1)
    assert (first.inputs_converted, first.inputs_skipped, first.clips_kept) == (2, 0, 4)
    # An interrupted later run left a half-written part behind; a new input appeared.
    (out / "part0099-000000.tar.tmp").write_bytes(b"partial")
    write(src / "three.mp4", moving_video(9, 20))
    second = build_folder_shards(src, out, options)
    assert (second.inputs_converted, second.inputs_skipped, second.clips_kept) == (1, 2, 2)
    assert not (out / "part0099-000000.tar.tmp").exists()
    samples = read_shard_set(out)  # the manifest covers the parts of both runs, keys unique
    assert len(samples) == 6 == Manifest.load(out).num_samples == second.total_clips
    assert {m.extra["input"] for _, m in samples.values()} == {"one.mp4", "two.mp4", "three.mp4"}
    state = json.loads((out / folder.STATE_NAME).read_text())
    assert sorted(state["done"]) == ["one.mp4", "three.mp4", "two.mp4"]
    with pytest.raises(ValueError, match="clip_frames"):
        build_folder_shards(src, out, ClipOptions(clip_frames=5, motion=False))


def test_two_workers_give_the_same_clips(tmp_path):
    for i in range(3):
        write(tmp_path / "src" / f"v{i}.mp4", moving_video(10 + i, 20))
    options = ClipOptions(clip_frames=10, motion=False)
    one = build_folder_shards(tmp_path / "src", tmp_path / "one", options, workers=1)
    two = build_folder_shards(tmp_path / "src", tmp_path / "two", options, workers=2)
    assert one.clips_kept == two.clips_kept == 6
    a, b = read_shard_set(tmp_path / "one"), read_shard_set(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for key in a:  # x264 may take other decisions in another process (threading): compare content
        assert a[key][1].extra == b[key][1].extra
        assert np.abs(a[key][0].astype(int) - b[key][0].astype(int)).mean() < 1.5


def test_cli_arguments(tmp_path):
    write(tmp_path / "src" / "v.mp4", moving_video(13, 20))
    parser = argparse.ArgumentParser()
    folder.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--clip-frames", "10", "--no-curation"])
    assert folder.run(args) == 0
    assert Manifest.load(tmp_path / "out").num_samples == 2


def test_a_folder_without_inputs_is_an_error(tmp_path):
    (tmp_path / "src" / "notes").mkdir(parents=True)
    (tmp_path / "src" / "notes" / "readme.txt").write_text("no video here")
    with pytest.raises(FileNotFoundError, match=r"src holds no video file \(.mp4 .* and no folder of images"):
        build_folder_shards(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no manifest of 0 clips


def test_assign_splits_by_input():
    videos = [f"drive/{i:02d}.mp4" for i in range(20)]
    split = folder.assign_splits(videos, 0.25, seed=0)
    assert len(split["val"]) == 5 and len(split["train"]) == 15  # round(0.25 * 20)
    assert set(split["train"]).isdisjoint(split["val"]) and set(split["train"]) | set(split["val"]) == set(videos)
    assert folder.assign_splits(videos[::-1], 0.25, seed=0) == split  # the order does not matter, the seed does
    assert len({tuple(folder.assign_splits(videos, 0.25, seed=s)["val"]) for s in range(5)}) > 1
    assert len(folder.assign_splits(videos, 0.001)["val"]) == 1 and len(folder.assign_splits(videos, 0.999)["train"]) == 1
    # an earlier split is kept; the new inputs bring val to round(0.25 * 24) = 6
    more = folder.assign_splits([*videos, "new/a.mp4", "new/b.mp4", "new/c.mp4", "new/d.mp4"], 0.25, 0, recorded=split)
    assert set(split["val"]) <= set(more["val"]) and set(split["train"]) <= set(more["train"]) and len(more["val"]) == 6
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
            folder.assign_splits(videos, bad)
    with pytest.raises(ValueError, match="at least 2 inputs"):
        folder.assign_splits(videos[:1], 0.5)


def test_val_fraction_holds_out_whole_videos(tmp_path):
    from vdiff.cli import main

    for i in range(4):
        write(tmp_path / "src" / f"v{i}.mp4", moving_video(20 + i, 12))
    args = ["data", "shards", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--clip-frames", "4",
            "--no-curation", "--val-fraction", "0.5", "--split-seed", "3"]  # fmt: skip
    assert main(args) == 0
    inputs = {split: {m.extra["input"] for _, m in read_shard_set(tmp_path / "out" / split).values()}
              for split in ("train", "val")}  # fmt: skip
    assert len(inputs["train"]) == len(inputs["val"]) == 2 and inputs["train"].isdisjoint(inputs["val"])
    for split in ("train", "val"):  # every clip of a video is in its video's split: 3 clips of 4 frames each
        assert Manifest.load(tmp_path / "out" / split).num_samples == 6
    recorded = json.loads((tmp_path / "out" / folder.SPLIT_NAME).read_text())
    assert {k: set(recorded[k]) for k in ("train", "val")} == inputs and recorded["seed"] == 3
    assert recorded == {**folder.assign_splits([f"v{i}.mp4" for i in range(4)], 0.5, 3), "val_fraction": 0.5, "seed": 3}
    with pytest.raises(ValueError, match=r"was split with --val-fraction 0.5 --split-seed 3"):
        main([*args[:-1], "4"])
    write(tmp_path / "src" / "v4.mp4", moving_video(30, 12))  # a rerun keeps the split and places the new video
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / folder.SPLIT_NAME).read_text())
    assert set(recorded["val"]) <= set(again["val"]) and set(recorded["train"]) <= set(again["train"])
    assert len(again["train"]) + len(again["val"]) == 5
