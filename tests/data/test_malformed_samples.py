"""One bad sample never stops anything: every shape a sample's json can take ends in one SchemaError, which
training and evaluation skip and count (``bad_json``), ``vdiff data inspect`` reports, ``vdiff encode`` skips
and counts, and converters reading metadata files report or ignore, never an AttributeError, TypeError,
OverflowError or RecursionError."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.data.conftest import FPS, coordinate_frames
from vdiff.cli import main as vdiff_main
from vdiff.data import batch as B
from vdiff.data.convert.cityscapes import read_vehicle
from vdiff.data.convert.nuscenes import load_steering
from vdiff.data.datamodule import VideoDataModule
from vdiff.data.inspect import inspect_shards
from vdiff.data.schema import SchemaError, VideoMeta
from vdiff.data.shards import ShardWriter, count_samples
from vdiff.data.video_io import encode_video

GOOD = {"fps": FPS, "width": 32, "height": 32, "num_frames": 12, "source": "synth"}
DEEP = 200_000  # levels: deeper than any recursive parser follows


def _json(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def _frames(value) -> list:
    return [value] * GOOD["num_frames"]


# name -> the json bytes of a sample; every one must be refused with a SchemaError
MALFORMED: dict[str, bytes] = {
    # the five of the issue
    "actions_null": _json(actions=None),
    "actions_list": _json(actions=[1, 2, 3]),
    "schema_version_string": _json(schema_version="2"),
    "sample_type_list": _json(sample_type=["video"]),
    "nested_200000_levels": b"[" * DEEP + b"]" * DEEP,
    # the rest of what json can put in each field
    "nested_200000_in_extra": _json()[:-1] + b', "extra": {"x": ' + b"[" * DEEP + b"]" * DEEP + b"}}",
    "extra_nested_100": _json(extra={"x": json.loads("[" * 100 + "]" * 100)}),
    "not_utf8": b'{"fps": 10, "source": "\xff\xfe"}',
    "empty": b"",
    "truncated": _json()[:20],
    "top_level_list": b"[1, 2]",
    "top_level_string": b'"video"',
    "top_level_null": b"null",
    "missing_field": json.dumps({k: v for k, v in GOOD.items() if k != "fps"}).encode(),
    "unknown_field": _json(colour="red"),
    "integer_of_5000_digits": _json()[:-1] + b', "extra": {"n": ' + b"9" * 5000 + b"}}",
    "schema_version_null": _json(schema_version=None),
    "schema_version_float": _json(schema_version=1.5),
    "schema_version_bool": _json(schema_version=True),
    "schema_version_newer": _json(schema_version=99),
    "sample_type_unknown": _json(sample_type="audio"),
    "fps_string": _json(fps="10"),
    "fps_bool": _json(fps=True),
    "fps_nan": _json()[:-1] + b', "fps": NaN}',
    "fps_infinite_literal": _json()[:-1] + b', "fps": 1e400}',
    "fps_integer_beyond_float": _json(fps=10**400),
    "fps_denormal": _json(fps=5e-324),
    "width_float": _json(width=32.5),
    "width_bool": _json(width=True),
    "num_frames_huge": _json(num_frames=10**30),
    "height_zero": _json(height=0),
    "source_number": _json(source=5),
    "source_object": _json(source={"a": 1}),
    "extra_list": _json(extra=[1]),
    "motion_score_string": _json(extra={"motion_score": "fast"}),
    "motion_score_integer_beyond_float": _json(extra={"motion_score": 10**400}),
    "motion_fps_negative": _json(extra={"motion_score": 1.0, "motion_fps": -5}),
    "latent_info_list": _json(extra={"latent": [1]}),
    "latent_downsample_string": _json(extra={"latent": {"temporal_downsample": "x"}}),
    "image_embed_number": _json(extra={"image_embed": 5}),
    "actions_string": _json(actions="left"),
    "action_unknown": _json(actions={"throttle": _frames(1.0)}),
    "action_null": _json(actions={"speed": None}),
    "action_object": _json(actions={"speed": {"0": 1.0}}),
    "action_too_short": _json(actions={"speed": [1.0, 2.0]}),
    "action_entry_object": _json(actions={"speed": _frames({"a": 1})}),
    "action_entry_string": _json(actions={"speed": _frames("fast")}),
    "action_entry_nested_deep": _json(actions={"speed": _frames(json.loads("[" * 900 + "1" + "]" * 900))}),
    "action_entry_integer_beyond_float": _json(actions={"speed": _frames(10**400)}),
    "action_beyond_float32": _json(actions={"speed": _frames(1e39)}),
    "trajectory_wrong_shape": _json(actions={"trajectory": _frames([[1.0, 0.0]] * 3)}),
    "trajectory_ragged": _json(actions={"trajectory": _frames([[1.0, 0.0], [1.0], [2.0, 0.0], [3.0, 0.0]])}),
    "goal_scalar": _json(actions={"goal": _frames(0.5)}),
    "command_7": _json(actions={"command": _frames(7)}),
    "command_fraction": _json(actions={"command": _frames(1.5)}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_every_malformed_json_is_one_schema_error(name):
    with pytest.raises(SchemaError):  # any other exception fails the test
        VideoMeta.from_json(MALFORMED[name])


def test_a_well_formed_json_with_unknown_values_still_reads():
    nan, inf = float("nan"), float("inf")
    actions = {"speed": [None, nan, inf, *_frames(1.0)[3:]], "trajectory": [[[1.0, None]] * 4, *_frames(None)[1:]]}
    meta = VideoMeta.from_json(_json(actions=actions, extra={"motion_score": None, "free": {"deep": [[[1]]]}}))
    assert meta.extra["free"] == {"deep": [[[1]]]}
    from vdiff.data.transforms import clip_actions

    clip = clip_actions(meta.actions, [0, 1, 2, 3])
    assert clip["speed_valid"].tolist() == [False, False, False, True] and not clip["trajectory_valid"].any()


@pytest.fixture(scope="module")
def malformed_set(tmp_path_factory):
    """Good samples interleaved with one sample per malformed json (each with a good video)."""
    out = tmp_path_factory.mktemp("malformed")
    mp4 = encode_video(coordinate_frames(12, 32, 32), FPS, preset="ultrafast")
    good = []
    with ShardWriter(out, max_count=8) as writer:
        for i, name in enumerate(sorted(MALFORMED)):
            if i % 4 == 0:
                good.append(f"good{i:03d}")
                writer.write_video(good[-1], mp4, VideoMeta(**GOOD))
            writer.write_raw(name, {"mp4": mp4, "json": MALFORMED[name]})
    return out, good


def test_evaluation_skips_and_counts_every_malformed_sample(malformed_set):
    folder, good = malformed_set
    dm = VideoDataModule(val=str(folder), num_frames=8, size=16, val_batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="bad_json"):
        keys = [key for batch in dm.val_dataloader() for key in batch[B.KEY]]
    assert sorted(keys) == good
    assert {reason: n for reason, n in dm.skipped_counts().items() if n} == {"bad_json": len(MALFORMED)}


def test_training_goes_on_through_every_malformed_sample(malformed_set):
    folder, good = malformed_set
    dm = VideoDataModule(train=str(folder), num_frames=8, size=16, batch_size=4, num_workers=0, epoch_length=8,
                         shuffle_buffer=8)  # fmt: skip
    with pytest.warns(UserWarning, match="bad_json"):
        keys = [key for batch in dm.train_dataloader() for key in batch[B.KEY]]
    assert len(keys) == 32 and set(keys) <= set(good)
    counts = {reason: n for reason, n in dm.skipped_counts().items() if n}
    assert set(counts) == {"bad_json"} and counts["bad_json"] >= len(MALFORMED)  # each read at least once


def test_inspect_reports_every_malformed_sample(malformed_set, capsys):
    folder, good = malformed_set
    summary = inspect_shards(str(folder))
    assert summary["good_samples"] == len(good) and summary["undecodable"] == {"bad_json": len(MALFORMED)}
    (folder / "manifest.json").rename(folder / "manifest.away")  # the shards alone: frames counted from the jsons
    try:
        assert vdiff_main(["data", "inspect", str(folder)]) == 0
        assert count_samples(str(folder))[0] == len(MALFORMED) + len(good)
    finally:
        (folder / "manifest.away").rename(folder / "manifest.json")
    assert f"({len(good)} usable, {len(MALFORMED)} undecodable)" in capsys.readouterr().out


def test_encode_skips_and_counts_malformed_samples_and_keys(malformed_set, tmp_path):
    import tarfile

    import torch

    from vdiff.data.shards import iter_raw_samples
    from vdiff.encode import ShardEncoder, autoencoder_info, encode_shards
    from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder

    folder, good = malformed_set
    shard = sorted(folder.glob("*.tar"))[0]
    samples = list(iter_raw_samples(shard))
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "in.tar", "w") as tar:  # the first shard plus a sample whose key leaves the tar's folder
        mp4 = samples[0][1]["mp4"]
        for key, files in [*samples, ("../../escape", {"mp4": mp4, "json": _json()})]:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    torch.manual_seed(0)
    ae = VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()
    encoder = ShardEncoder(ae, autoencoder_info(ae, "tiny.safetensors"), batch_size=4)
    stats = encode_shards(str(src), tmp_path / "lat", encoder, log=False)
    bad_here = [key for key, _ in samples if key in MALFORMED]
    assert stats.bad_samples == len(bad_here) + 1 and stats.videos == len(samples) - len(bad_here)
    assert stats.bad == {"SchemaError": len(bad_here), "ValueError": 1}
    written = [key for path in sorted((tmp_path / "lat").glob("*.tar")) for key, _ in iter_raw_samples(path)]
    assert sorted(written) == sorted(key for key, _ in samples if key not in MALFORMED)


# ---------------------------------------------------------------------------------------------- converters

BAD_METADATA_FILES: dict[str, bytes] = {
    "nested": b"[" * DEEP + b"]" * DEEP,
    "not_utf8": b"\xff\xfe\x00",
    "not_json": b"{",
    "a_number": b"5",
    "objects_in_a_list": b'[{"utime": [1]}, 3, "x"]',
    "huge_numbers": b'[{"utime": 1e400, "value": 1e400, "steering": 1e400, "speed": 1e400, "yawRate": 1e400}]',
    "integer_beyond_float": b'[{"utime": 1, "value": ' + b"9" * 400 + b', "steering": ' + b"9" * 400 + b"}]",
    "nan": b'[{"utime": 1, "value": NaN, "steering": NaN}]',
}


@pytest.mark.parametrize("name", sorted(BAD_METADATA_FILES))
def test_cityscapes_vehicle_file_of_any_shape_gives_no_values(name, tmp_path):
    path = tmp_path / "x_vehicle.json"
    path.write_bytes(BAD_METADATA_FILES[name])
    assert read_vehicle(path) == (None, None)
    path.write_bytes(b'{"speed": ' + b"9" * 400 + b', "yawRate": 1e39}')  # beyond float32: unknown, not inf
    assert read_vehicle(path) == (None, None)


@pytest.mark.parametrize("name", sorted(BAD_METADATA_FILES))
@pytest.mark.parametrize("kind", ["steeranglefeedback", "vehicle_monitor"])
def test_nuscenes_can_bus_file_of_any_shape_is_one_value_error(name, kind, tmp_path):
    (tmp_path / f"scene-0001_{kind}.json").write_bytes(BAD_METADATA_FILES[name])
    with pytest.raises(ValueError, match=rf"CAN bus file .*scene-0001_{kind}\.json"):
        load_steering(tmp_path, "scene-0001")


def test_good_metadata_files_still_read(tmp_path):
    path = tmp_path / "x_vehicle.json"
    path.write_text(json.dumps({"speed": 3.5, "yawRate": -0.1}))
    assert read_vehicle(path) == (3.5, -0.1)
    (tmp_path / "scene-0001_vehicle_monitor.json").write_text(json.dumps([{"utime": 2, "steering": 4.0},
                                                                          {"utime": 1, "steering": 3.0}]))
    utime, degrees, kind = load_steering(tmp_path, "scene-0001")
    assert utime.tolist() == [1, 2] and np.allclose(degrees, [3.0, 4.0]) and kind == "vehicle_monitor"


TRIM_FILES = {  # file name -> contents of an OpenDV trim metadata file that is refused in one ValueError
    "nested.json": b"[" * DEEP + b"]" * DEEP,
    "not_utf8.json": b'{"v": {"start_discard": "\xff"}}',
    "integer_beyond_float.json": b'{"v": {"start_discard": ' + b"9" * 400 + b"}}",
    "not_utf8.csv": b"video,start_discard,end_discard\n\xff\xfe,1,2\n",
    "short_row.csv": b"video,start_discard,end_discard\nv1\n",
}


@pytest.mark.parametrize("name", sorted(TRIM_FILES))
def test_opendv_trim_file_of_any_shape_is_one_value_error(name, tmp_path):
    from vdiff.data.convert.opendv import load_trims

    path = tmp_path / name
    path.write_bytes(TRIM_FILES[name])
    with pytest.raises(ValueError, match=rf"{path.name}"):
        load_trims(path)
