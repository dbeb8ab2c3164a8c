"""``vdiff data motion-buckets``: fits the buckets to a shard set's stored motion scores from the jsons alone (the
videos are never read), saves the JSON, prints a histogram; refuses a set without scores or with mixed units."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.models.test_conditioners import lognormal
from vdiff.cli import main
from vdiff.data.motion_buckets import (
    NoMotionScores,
    fit_shard_buckets,
    load_motion_buckets,
    motion_buckets_dict,
    motion_buckets_from_dict,
    read_motion_scores,
    save_motion_buckets,
)
from vdiff.data.schema import VideoMeta
from vdiff.data.shards import ShardWriter
from vdiff.models.conditioners import DEFAULT_MOTION_BUCKETS, fit_motion_buckets

NOT_A_VIDEO = b"\x00 not an mp4: the tool must never decode it " * 20


def write_set(folder, scores, units=(2.0, 128), per_shard: int = 7) -> None:
    """Video samples whose mp4s are garbage and whose jsons carry ``scores`` (None: no score)."""
    with ShardWriter(folder, max_count=per_shard) as writer:
        for i, score in enumerate(scores):
            extra = {} if score is None else {"motion_score": score, "motion_fps": units[0], "motion_size": units[1]}
            meta = VideoMeta(fps=8.0, width=16, height=16, num_frames=4, source="t", extra=extra)
            writer.write_video(f"c{i:04d}", NOT_A_VIDEO, meta)


def test_fits_saves_and_prints_from_the_jsons(tmp_path, capsys):
    scores = [round(0.1 * 1.07**i, 4) for i in range(60)]
    write_set(tmp_path / "set", [*scores, None, None])
    out = tmp_path / "b" / "buckets.json"
    assert main(["data", "motion-buckets", str(tmp_path / "set"), "--out", str(out), "--rows", "8"]) == 0
    printed = capsys.readouterr().out
    buckets = load_motion_buckets(out)
    expected = fit_motion_buckets(torch.tensor(scores, dtype=torch.float64), source=buckets.source)
    assert buckets == expected and (buckets.flow_fps, buckets.flow_size) == (2.0, 128)
    assert json.loads(out.read_text())["format"] == "vdiff.motion_buckets"
    assert "motion scores of 60 clips in 9 shard(s), 2 without a score left out" in printed
    rows = [line.split() for line in printed.splitlines() if line[:4].strip().isdigit() and "-" in line[:9]]
    assert len(rows) == 8 and [r[0] for r in rows][:2] == ["0-31", "32-63"]
    counts = [int(r[1]) for r in rows]
    assert sum(counts) == 60 and max(counts) - min(counts) <= 2  # quantile buckets: equally populated
    assert rows[0][2] == f"{min(scores):.3g}" and rows[-1][4] == f"{max(scores):.3g}"


def _shell(monkeypatch, *args: str) -> int:
    """``vdiff ARGS`` as from the shell (a user error is one line and exit status 2)."""
    monkeypatch.setattr(sys, "argv", ["vdiff", *args])
    monkeypatch.delenv("VDIFF_DEBUG", raising=False)
    return main()


def test_refuses_a_set_without_scores(tmp_path, capsys, monkeypatch):
    write_set(tmp_path / "plain", [None] * 5)
    code = _shell(monkeypatch, "data", "motion-buckets", str(tmp_path / "plain"), "--out", str(tmp_path / "b.json"))
    assert code == 2 and not (tmp_path / "b.json").exists()
    err = capsys.readouterr().err
    assert "none of the 5 samples in 1 shard(s) has a motion score" in err and "vdiff data shards" in err
    with pytest.raises(NoMotionScores):
        fit_shard_buckets(read_motion_scores(str(tmp_path / "plain")))


def test_refuses_mixed_units_and_counts_bad_jsons(tmp_path, capsys, monkeypatch):
    write_set(tmp_path / "a", [1.0, 2.0, 3.0])
    write_set(tmp_path / "b", [1.5, 2.5], units=(4.0, 128))
    code = _shell(monkeypatch, "data", "motion-buckets", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                  str(tmp_path / "x.json"))  # fmt: skip
    assert code == 2 and "different units" in capsys.readouterr().err
    with ShardWriter(tmp_path / "c") as writer:
        writer.write_raw("broken", {"mp4": NOT_A_VIDEO, "json": b"{not json"})
    found = read_motion_scores([str(tmp_path / "a"), str(tmp_path / "c")])
    assert found.scores == [1.0, 2.0, 3.0] and found.bad == {"bad_json": 1} and found.samples == 3


def test_motion_buckets_json_round_trip(tmp_path):
    """The file format lives in the data layer (vdiff.models.conditioners.MotionBuckets knows no file)."""
    buckets = fit_motion_buckets(lognormal(1000, 4), source="unit test")
    path = save_motion_buckets(buckets, tmp_path / "sub" / "buckets.json")
    again = load_motion_buckets(path)
    assert again == buckets
    probe = lognormal(100, 5)
    assert torch.equal(again(probe), buckets(probe))
    data = json.loads(path.read_text())
    assert data["format"] == "vdiff.motion_buckets" and data["num_buckets"] == 256 and len(data["scores"]) == 257
    assert motion_buckets_from_dict(motion_buckets_dict(DEFAULT_MOTION_BUCKETS)) == DEFAULT_MOTION_BUCKETS
    (tmp_path / "extra.json").write_text(json.dumps({**data, "gamma": 2}))
    with pytest.raises(ValueError, match=r"extra.json: unknown field\(s\) \['gamma'\]"):
        load_motion_buckets(tmp_path / "extra.json")
    (tmp_path / "bad.json").write_text(json.dumps({**data, "scores": data["scores"][::-1]}))
    with pytest.raises(ValueError, match="bad.json: .*strictly increasing"):
        load_motion_buckets(tmp_path / "bad.json")
    (tmp_path / "newer.json").write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(ValueError, match="newer.json: version 2; this vdiff reads version 1"):
        load_motion_buckets(tmp_path / "newer.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: a motion-buckets file holds a JSON object"):
        load_motion_buckets(tmp_path / "list.json")
    with pytest.raises(ValueError, match="missing.json: not a readable motion-buckets JSON file"):
        load_motion_buckets(tmp_path / "missing.json")
