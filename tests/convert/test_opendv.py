import argparse
import json

import pytest

from tests.convert.helpers import frame_index_from_level, indexed_video, read_shard_set
from vdiff.data.convert import opendv
from vdiff.data.convert.opendv import build_opendv_shards, load_trims
from vdiff.data.video_io import encode_video


def test_load_trims_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"vid1": {"start_discard": 90, "end_discard": 60}}))
    (tmp_path / "b.json").write_text(json.dumps([{"videoid": "vid2", "youtuber": "x", "start_discard": 5, "end_discard": 0}]))
    (tmp_path / "c.csv").write_text("video,start_discard,end_discard\nvid3,1.5,2\n")
    assert load_trims(tmp_path / "a.json")["vid1"] == opendv.Trim(90.0, 60.0)
    assert load_trims(tmp_path / "b.json")["vid2"] == opendv.Trim(5.0, 0.0)
    assert load_trims(tmp_path / "c.csv")["vid3"] == opendv.Trim(1.5, 2.0)
    (tmp_path / "bad.json").write_text(json.dumps({"vid": {"start_discard": -1}}))
    with pytest.raises(ValueError, match=r"bad.json\['vid'\]: start_discard must be a non-negative"):
        load_trims(tmp_path / "bad.json")


def test_trimmed_10hz_clips_without_actions(tmp_path):
    # 20 fps, 2 s: drop 0.5 s at the start and at the end -> 0.5 .. 1.5 s -> 11 frames at 10 Hz.
    source = indexed_video(40, height=32, width=48, level_step=6)
    (tmp_path / "src" / "channel").mkdir(parents=True)
    (tmp_path / "src" / "channel" / "drive.mp4").write_bytes(encode_video(source, 20.0))
    (tmp_path / "src" / "stray.mp4").write_bytes(encode_video(source[:10], 20.0))
    (tmp_path / "trim.json").write_text(json.dumps({"drive": {"start_discard": 0.5, "end_discard": 0.5}}))
    report = build_opendv_shards(tmp_path / "src", tmp_path / "out", tmp_path / "trim.json", clip_frames=5, scene_detector="none")
    assert [(rel, reason) for rel, reason, _ in report.failed] == [("stray.mp4", "no_trim")]
    samples = read_shard_set(tmp_path / "out")
    assert len(samples) == 2 and report.dropped["too_short"] == 1  # 5 + 5 frames kept, 1 left over
    for frames, meta in samples.values():
        assert meta.fps == 10.0 and meta.num_frames == 5 and meta.source == "opendv-youtube"
        assert meta.actions == {}  # every action invalid: ready to mix with nuScenes
        assert meta.extra["trim"] == [0.5, 0.5]
        first = meta.extra["first_frame"]
        # output frame j of the trimmed span is at 0.5 + j / 10 s = source frame 10 + 2 j
        assert [frame_index_from_level(f, level_step=6) for f in frames] == [10 + 2 * (first + j) for j in range(5)]


def test_cli(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "v.mp4").write_bytes(encode_video(indexed_video(40), 20.0))
    (tmp_path / "trim.csv").write_text("video,start_discard,end_discard\nv,0,0\n")
    parser = argparse.ArgumentParser()
    opendv.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "src"), "--trim", str(tmp_path / "trim.csv"), "--out", str(tmp_path / "out")])
    assert args.fps == 10.0 and args.clip_frames == 25
    args.clip_frames = 10
    assert opendv.run(args) == 0
    assert len(read_shard_set(tmp_path / "out")) == 2
    err = capsys.readouterr().err  # a progress bar over the inputs, with each input's line above it
    assert f"converting {tmp_path / 'src'}: 100%" in err and "1/1" in err and "v.mp4: 2 clips" in err
