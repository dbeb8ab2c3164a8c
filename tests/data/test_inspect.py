"""`vdiff data inspect`: counts, histograms and undecodable samples by reason on a set with injected bad samples."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from vdiff.data.inspect import add_arguments, inspect_shards, run
from vdiff.data.schema import VideoMeta
from vdiff.data.shards import ShardWriter
from vdiff.data.video_io import encode_video

pytestmark = pytest.mark.timeout(60)


def video(num_frames: int, height: int = 16, width: int = 16) -> np.ndarray:
    return np.random.default_rng(num_frames).integers(0, 255, (num_frames, height, width, 3), dtype=np.uint8)


def meta(num_frames: int, fps: float = 10, width: int = 16, height: int = 16, source: str = "synth", **actions):
    return VideoMeta(fps=fps, width=width, height=height, num_frames=num_frames, source=source, actions=actions)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect") / "set"
    clip8 = encode_video(video(8), fps=10)
    clip24_12 = encode_video(video(24, 16, 32), fps=12)
    odd = encode_video(video(4, 15, 17), fps=10, pix_fmt="yuv444p")
    with ShardWriter(folder, max_count=4) as writer:
        # 5 good samples: 3 synth at 10 fps (0.8 s), 2 nuscenes at 12 fps (2 s) with actions
        for i in range(3):
            writer.write_video(f"good{i}", clip8, meta(8, speed=[1.0] * 8))
        for i in range(2):
            steering = [0.5] * 24 if i == 0 else [None] * 24
            writer.write_video(f"nus{i}", clip24_12, meta(24, 12, 32, 16, "nuscenes", command=[1] * 24, steering=steering))
        # bad samples, one or more per reason
        writer.write_raw("zero", {"mp4": b"", "json": meta(8).to_json().encode()})
        writer.write_raw("text", {"mp4": b"not a video" * 50, "json": meta(8).to_json().encode()})
        writer.write_raw("trunc", {"mp4": clip8[: len(clip8) // 2], "json": meta(8).to_json().encode()})
        writer.write_raw("long1", {"mp4": clip8, "json": meta(20).to_json().encode()})
        writer.write_raw("long2", {"mp4": clip8, "json": meta(9).to_json().encode()})
        writer.write_raw("nojson", {"mp4": clip8})
        writer.write_raw("badjson", {"mp4": clip8, "json": b'{"fps": 10'})
        writer.write_raw("badfield", {"mp4": clip8, "json": json.dumps({**json.loads(meta(8).to_json()), "fps": -1}).encode()})
        writer.write_raw("odd", {"mp4": odd, "json": meta(4, width=17, height=15).to_json().encode()})
        writer.write_raw("novideo", {"json": meta(8).to_json().encode()})
    return folder


EXPECTED_BAD = {
    "empty": 1,
    "corrupt": 2,
    "too_short": 2,
    "missing_json": 1,
    "bad_json": 2,
    "odd_size": 1,
    "missing_video": 1,
}


def test_inspect_counts(shard_set):
    summary = inspect_shards(shard_set)
    assert summary["shards"] == 4
    assert summary["samples"] == 15
    assert summary["good_samples"] == 5
    assert summary["frames"] == 3 * 8 + 2 * 24
    assert summary["duration_s"] == pytest.approx(3 * 0.8 + 2 * 2.0)
    assert summary["fps"] == {"10": 3, "12": 2}
    assert summary["resolution"] == {"16x16": 3, "32x16": 2}
    assert summary["duration"] == {"0-1s": 3, "2-5s": 2}  # 2.0 s falls in [2, 5)
    assert summary["sources"] == {"synth": 3, "nuscenes": 2}
    assert summary["actions"] == {"command": 2, "speed": 3, "steering": 1}
    assert summary["undecodable"] == EXPECTED_BAD
    assert summary["undecodable_total"] == sum(EXPECTED_BAD.values())
    assert {b["key"] for b in summary["bad_samples"]} == {
        "zero", "text", "trunc", "long1", "long2", "nojson", "badjson", "badfield", "odd", "novideo"
    }


def test_inspect_decode_mode_agrees(shard_set):
    assert inspect_shards(shard_set, decode=True)["undecodable"] == EXPECTED_BAD


def _run(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_cli_text_and_json(shard_set, capsys):
    assert _run([str(shard_set)]) == 0
    text = capsys.readouterr().out
    assert "samples:          15 (5 usable, 10 undecodable)" in text
    assert "frames:           72" in text
    for line in ("too_short", "bad_json", "missing_json", "odd_size", "nuscenes", "32x16"):
        assert line in text
    assert _run([str(shard_set / "shard-{000000..000001}.tar"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 2 and summary["samples"] == 8


def test_cli_missing_spec_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):  # `vdiff` prints it as one line (tests/test_cli_errors.py)
        _run([str(tmp_path / "nowhere")])


def test_unreadable_shard_is_counted(tmp_path):
    with ShardWriter(tmp_path / "set") as writer:
        for i in range(3):
            writer.write_video(f"c{i}", encode_video(video(8), fps=10), meta(8))
    shard = tmp_path / "set" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    summary = inspect_shards(tmp_path / "set")
    assert summary["undecodable"].get("bad_shard") == 1
    assert summary["good_samples"] >= 1


# ----------------------------------------------------------------------------------------------
# A root folder whose shard sets sit in subfolders
# ----------------------------------------------------------------------------------------------


def test_frames_per_sample_histogram(shard_set, capsys):
    summary = inspect_shards(shard_set)
    assert summary["frames_per_sample"] == {"8": 3, "24": 2}  # good samples only, ordered by frame count
    assert _run([str(shard_set)]) == 0
    text = capsys.readouterr().out
    block = text[text.index("frames per sample:"):text.index("fps:")].splitlines()
    assert [line.split()[:2] for line in block[1:]] == [["8", "3"], ["24", "2"]]
    assert _run([str(shard_set), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames_per_sample"] == {"8": 3, "24": 2}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """The layout ``vdiff data synth --out ROOT --val-videos 2`` writes: ROOT/train and ROOT/val."""
    from vdiff.data.synthetic import ensure_synthetic_splits

    root = tmp_path_factory.mktemp("synth") / "root"
    manifests = ensure_synthetic_splits(root, num_videos=3, num_frames=4, size=16, seed=0, val_videos=2, max_count=2)
    return root, manifests


def test_root_reports_each_set_and_total(synth_root, capsys):
    root, manifests = synth_root
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    summary = inspect_shards(root)
    assert list(summary["sets"]) == [str(root / "train"), str(root / "val")]
    for split, manifest in manifests.items():
        one = summary["sets"][str(root / split)]
        assert one == inspect_shards(root / split)  # a set's entry is what inspecting it alone gives
        assert one["shards"] == len(manifest.shards)
        assert one["samples"] == one["good_samples"] == manifest.num_samples
        assert one["frames"] == manifest.num_frames
        assert one["frames_per_sample"] == {"4": manifest.num_samples}
    assert summary["shards"] == 2 + 1
    assert summary["samples"] == summary["good_samples"] == 3 + 2
    assert summary["frames"] == 4 * (3 + 2)
    assert summary["frames_per_sample"] == {"4": 5}
    assert summary["duration_s"] == pytest.approx(5 * 0.4)

    assert _run([str(root)]) == 0
    text = capsys.readouterr().out
    assert "shard sets:       2" in text
    rows = {line.split()[0]: line.split()[1:6] for line in text.splitlines() if line.strip().startswith(str(root))}
    assert rows == {str(root / "train"): ["2", "3", "3", "0", "12"], str(root / "val"): ["1", "2", "2", "0", "8"]}
    assert "total over all sets:" in text
    assert "samples:          5 (5 usable, 0 undecodable)" in text
    assert "frames:           20" in text

    assert _run([str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 5 and set(out["sets"]) == {str(root / "train"), str(root / "val")}


def test_nested_root_with_mixed_sets(shard_set, tmp_path):
    """Sets at different depths (cityscapes-style ROOT/city/train, a shards-style folder), a hidden
    partial folder and an empty folder: the sets are found, the rest ignored, and the totals add up."""
    root = tmp_path / "data"
    with ShardWriter(root / "city" / "train", max_count=2) as writer:
        for i in range(3):
            writer.write_video(f"c{i}", encode_video(video(16), fps=10), meta(16))
    with ShardWriter(root / ".val.partial-123") as writer:  # a run in progress: skipped
        writer.write_video("p", encode_video(video(8), fps=10), meta(8))
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "clips").symlink_to(shard_set, target_is_directory=True)

    summary = inspect_shards(root)
    assert list(summary["sets"]) == [str(root / "city" / "train"), str(root / "clips")]
    assert summary["sets"][str(root / "city" / "train")]["frames_per_sample"] == {"16": 3}
    alone = inspect_shards(shard_set)
    assert summary["samples"] == 3 + alone["samples"]
    assert summary["good_samples"] == 3 + alone["good_samples"]
    assert summary["frames"] == 3 * 16 + alone["frames"]
    assert summary["frames_per_sample"] == {"8": 3, "16": 3, "24": 2}
    assert summary["undecodable"] == EXPECTED_BAD
    # Naming the root and one of its sets reads that set once.
    assert inspect_shards([root, root / "city" / "train"])["samples"] == summary["samples"]


def test_root_without_sets_fails_naming_it(tmp_path, capsys, monkeypatch):
    from vdiff.cli import main

    root = tmp_path / "nosets"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("no shards here")
    with pytest.raises(FileNotFoundError, match="no shard set in .*nosets"):
        inspect_shards(root)
    monkeypatch.setattr(sys, "argv", ["vdiff", "data", "inspect", str(root)])  # from the shell: one line, status 2
    monkeypatch.delenv("VDIFF_DEBUG", raising=False)
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith("vdiff data inspect: error: no shard set in ") and str(root) in err and "manifest.json" in err
