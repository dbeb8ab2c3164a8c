"""`vdiff evaluate REAL GENERATED` on tiny folders of mp4s and on shard sets: the printed table and protocol,
pairing by name, given frames left out, the real-statistics cache."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch

from tests.lit.test_vdt_module import moving_square_batch
from tests.metrics.test_fid import write_stub_inception
from tests.metrics.test_fvd import write_stub_i3d
from vdiff.data.schema import VideoMeta
from vdiff.data.shards import ShardWriter
from vdiff.data.video_io import encode_video
from vdiff.evaluate import add_arguments, run

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
FRAMES, SIZE = 10, 32


def clips(noise: float, seed: int) -> dict[str, np.ndarray]:
    """Three uint8 clips ``(T, H, W, 3)`` by name: moving squares, plus noise for the 'generated' ones."""
    video = moving_square_batch(batch=3, frames=FRAMES, size=SIZE, seed=7)["video"]  # (3, T, 3, H, W)
    video = video + noise * torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    return {f"clip{i}": frames[i] for i in range(3)}


def write_folder(folder, videos: dict[str, np.ndarray]):
    folder.mkdir(parents=True)
    for name, frames in videos.items():
        (folder / f"{name}.mp4").write_bytes(encode_video(frames, fps=10))
    return folder


def write_shards(folder, videos: dict[str, np.ndarray]):
    with ShardWriter(folder, max_count=2) as writer:  # two shards
        for name, frames in videos.items():
            meta = VideoMeta(fps=10.0, width=SIZE, height=SIZE, num_frames=FRAMES, source="test")
            writer.write_video(name, encode_video(frames, fps=10), meta)
    return folder


ROW = re.compile(r"^(PSNR \(dB\)|SSIM|LPIPS \(\w+\)|FVD|FID) +(-?[\d.]+|nan) ")


def table_rows(text: str) -> dict[str, str]:
    """The result table's rows by metric name (protocol lines also start with "FVD"/"FID": not these)."""
    return {m.group(1): line for line in text.splitlines() if (m := ROW.match(line))}


def evaluate(capsys, *argv) -> str:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(a) for a in argv])) == 0
    return capsys.readouterr().out


@pytest.fixture
def sets(tmp_path):
    real, fake = clips(0.0, 0), clips(0.3, 1)
    return {
        "real": write_folder(tmp_path / "real", real),
        "fake": write_folder(tmp_path / "fake", fake),
        "real_shards": write_shards(tmp_path / "real_shards", real),
        "fake_shards": write_shards(tmp_path / "fake_shards", fake),
        "i3d": write_stub_i3d(tmp_path / "i3d_torchscript.pt"),
        "inception": write_stub_inception(tmp_path / "inception-2015-12-05.pt"),
        "cache": tmp_path / "stats",
    }


def test_evaluate_two_folders_prints_the_table_and_protocol(sets, capsys):
    args = [sets["real"], sets["fake"], "--fvd-weights", sets["i3d"], "--fid-weights", sets["inception"],
            "--given-frames", "1", "--fvd-num-frames", "9", "--stats-cache", sets["cache"], "--device", "cpu"]  # fmt: skip
    out = evaluate(capsys, *args)
    lines = out.splitlines()
    assert "vdiff evaluate (3 clips)" in out
    assert any(
        line.startswith("real: ") and "(mp4 folder, 3 clips)" in line and "paired by name: 3" in line for line in lines
    )
    assert "given frames: the first 1 of each clip" in out
    assert "FVD: StyleGAN-V's I3D TorchScript" in out and "clips: the first 9 of the generated frames only" in out
    assert "FID (clean-fid)" in out and "FVD real statistics: computed, saved to" in out
    rows = table_rows(out)
    assert set(rows) == {"PSNR (dB)", "SSIM", "FVD", "FID"}
    psnr = float(rows["PSNR (dB)"].split()[2])
    assert 5 < psnr < 40 and "3 clips" in rows["PSNR (dB)"]
    assert "3 real / 3 generated clips" in rows["FVD"] and "not comparable" in rows["FVD"]  # N = 3, not 2048
    assert "27 real / 27 generated frames" in rows["FID"]  # 3 clips x 9 generated frames

    again = evaluate(capsys, *args)  # the real statistics come from the cache now
    assert "FVD real statistics: read from" in again and "FID real statistics: read from" in again
    assert table_rows(again) == rows
    no_fid = [a for i, a in enumerate(args) if "--fid-weights" not in (a, args[i - 1])]
    other = evaluate(capsys, *no_fid, "--frames", "all", "--fvd-num-frames", "10")  # another protocol: a cache miss
    assert "FVD real statistics: computed, saved to" in other and "clips: the first 10 of the all frames" in other
    assert len(list(sets["cache"].iterdir())) == 3  # FVD under two protocols, FID under one


def test_evaluate_shard_sets_give_the_same_numbers_as_folders(sets, capsys):
    common = ["--fvd-weights", sets["i3d"], "--given-frames", "1", "--fvd-num-frames", "9", "--no-stats-cache",
              "--device", "cpu"]  # fmt: skip
    folders = evaluate(capsys, sets["real"], sets["fake"], *common)
    shards = evaluate(capsys, sets["real_shards"], sets["fake_shards"], *common)
    assert "(shard set, 3 clips)" in shards

    assert table_rows(folders) == table_rows(shards) and len(table_rows(shards)) == 3


def test_evaluate_without_pairs_or_weights_says_so(sets, tmp_path, capsys):
    other = write_folder(tmp_path / "other", {"unrelated": clips(0.0, 0)["clip0"]})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([str(sets["real"]), str(other), "--device", "cpu"])) == 1
    assert "nothing to score" in capsys.readouterr().out


def test_evaluate_shows_the_progress_of_each_pass_over_the_clips(sets, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = [sets["real_shards"], sets["fake_shards"], "--fvd-weights", sets["i3d"], "--given-frames", "1",
            "--fvd-num-frames", "9", "--no-stats-cache", "--device", "cpu"]  # fmt: skip
    assert run(parser.parse_args([str(a) for a in args])) == 0
    err = capsys.readouterr().err
    for bar in ("FVD features of the real clips", "FVD features of the generated clips", "PSNR/SSIM of clip pairs"):
        assert re.search(rf"{re.escape(bar)}: 100%\|[^|]*\| 3/3 ", err), (bar, err)
