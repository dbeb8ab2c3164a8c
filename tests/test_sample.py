"""`vdiff sample`: a checkpoint + input shards/video -> decodable mp4s of the expected length + PNG grid."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.lit.helpers import TINY_VDT, quiet_trainer, tiny_synthetic_data
from vdiff.cli import main
from vdiff.data.video_io import probe

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    cache = root / "cache"
    main(["fit", "-c", str(QUICKSTART), *TINY_VDT, *tiny_synthetic_data(cache), *quiet_trainer(root / "runs")])
    (checkpoint,) = (root / "runs").rglob("last.ckpt")
    (val,) = cache.glob("synthetic-drive-*/val")
    return checkpoint, val, root


def test_sample_writes_decodable_mp4s_and_grid(trained):
    checkpoint, val, root = trained
    out = root / "out"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(checkpoint),
                "--input",
                str(val),
                "--out",
                str(out),
                "--num-videos",
                "2",
                "--steps",
                "2",
                "--task",
                "prediction",
                "--given-frames",
                "2",
            ]
        )
        == 0
    )
    samples = sorted(out.glob("*-sample.mp4"))
    assert len(samples) == 2
    for path in samples:
        info = probe(path)
        assert info.num_frames == 8 and (info.height, info.width) == (32, 32)
        side_by_side = probe(path.with_name(path.name.replace("-sample", "")))
        assert side_by_side.num_frames == 8 and side_by_side.height == 64  # ground truth above sample
    grid = Image.open(out / "grid.png")
    assert grid.size == (8 * 32, 2 * 32)


def test_sample_rolls_out_beyond_the_clip_length(trained):
    checkpoint, val, root = trained
    out = root / "rollout"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(checkpoint),
                "--input",
                str(val),
                "--out",
                str(out),
                "--num-videos",
                "1",
                "--steps",
                "2",
                "--total-frames",
                "20",
                "--given-frames",
                "2",
            ]
        )
        == 0
    )
    (path,) = out.glob("*-sample.mp4")
    assert probe(path).num_frames == 20


def test_sample_from_a_video_file(trained, tmp_path):
    checkpoint, val, root = trained
    from vdiff.data.shards import expand_shard_spec, iter_raw_samples

    key, files = next(iter_raw_samples(expand_shard_spec(val)[0]))
    video = tmp_path / "clip.mp4"
    video.write_bytes(files["mp4"])
    assert (
        main(["sample", "--ckpt", str(checkpoint), "--input", str(video), "--out", str(tmp_path / "o"), "--steps", "2"])
        == 0
    )
    assert probe(tmp_path / "o" / "clip-sample.mp4").num_frames == 8


def test_sample_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        main(["sample", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", "x", "--out", str(tmp_path)])


def test_image_to_video_needs_svd_conditioning(trained, tmp_path):
    checkpoint, _, _ = trained
    picture = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(picture)
    with pytest.raises(ValueError) as error:
        main(["sample", "--ckpt", str(checkpoint), "--image", str(picture), "--out", str(tmp_path / "o")])
    assert str(error.value) == (
        "vdiff sample: --image/--frame need a checkpoint of a module with SVD's image conditioning (SVDModule); "
        f"{checkpoint} holds a VDTModule: sample it with --input and --task"
    )
    with pytest.raises(ValueError, match="give --image FILE or --input VIDEO --frame N, not both"):
        main(["sample", "--ckpt", str(checkpoint), "--image", str(picture), "--input", "v.mp4", "--out", str(tmp_path)])
    with pytest.raises(
        ValueError, match=r"give --input \(a video or shards\), --image FILE, or --input VIDEO --frame N"
    ):
        main(["sample", "--ckpt", str(checkpoint), "--out", str(tmp_path)])
