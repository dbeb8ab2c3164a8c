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


def test_keys_from_data_never_choose_where_outputs_go(trained, tmp_path):
    """Shard keys ``../../x``, an absolute path, ``sub/dir/k``, two keys that read alike and a key repeated in
    two shards: every output stays inside --out under a plain, unique name, and the run completes."""
    import io
    import json
    import os
    import tarfile

    from vdiff.data.names import safe_name
    from vdiff.data.shards import expand_shard_spec, iter_raw_samples

    checkpoint, val, _ = trained
    _, files = next(iter_raw_samples(expand_shard_spec(val)[0]))
    keys = [["../../x", "/abs/vdiff-escape", "sub/dir/k", "a:b", "a?b", "dup"], ["dup"]]
    box = tmp_path / "box"
    (box / "in").mkdir(parents=True)
    for number, shard_keys in enumerate(keys):
        with tarfile.open(box / "in" / f"shard-{number:06d}.tar", "w") as tar:
            for key in shard_keys:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = box / "deep" / "out"
    before = {path for path in box.rglob("*") if path.is_file()}
    argv = ["sample", "--ckpt", str(checkpoint), "--input", str(box / "in" / "shard-{000000..000001}.tar"),
            "--out", str(out), "--num-videos", "7", "--steps", "1", "--task", "prediction", "--given-frames", "2"]
    assert main(argv) == 0
    written = {path for path in box.rglob("*") if path.is_file()} - before
    assert written and all(path.resolve().is_relative_to(out.resolve()) for path in written)
    assert not (box / "x-sample.mp4").exists() and not os.path.exists("/abs")
    summary = json.loads((out / "samples.json").read_text())
    assert summary["keys"] == [*keys[0], *keys[1]]
    names = summary["names"]
    assert len(set(names)) == 7 and names[-1] == "dup-2" and names[0] == safe_name("../../x")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["grid.png", "samples.json", *(f"{n}-sample.mp4" for n in names), *(f"{n}.mp4" for n in names)]
    )
    for name in names:
        assert probe(out / f"{name}-sample.mp4").num_frames == 8
