"""``vdiff encode``: video shards -> latent shards (contents, json, first frame), resume, settings guard, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.data.conftest import write_videos
from vdiff.cli import main as vdiff_main
from vdiff.data.schema import FIRST_FRAME_EXT, LATENTS_EXT, META_EXT, Manifest, VideoMeta
from vdiff.data.shards import expand_shard_spec, iter_raw_samples
from vdiff.data.video_io import decode_frames
from vdiff.encode import ShardEncoder, autoencoder_info, encode_shards
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder import save_autoencoder


@pytest.fixture(scope="module")
def tiny_ae() -> VideoAutoencoder:
    torch.manual_seed(0)
    return VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    keys = write_videos(out, 6, num_frames=12, height=32, width=32, per_shard=3, actions=True)
    return out, keys


def _encoder(ae, **kw) -> ShardEncoder:
    return ShardEncoder(ae, autoencoder_info(ae, "tiny.safetensors"), batch_size=4, **kw)


def test_encode_writes_posterior_first_frame_and_json(tiny_ae, videos, tmp_path):
    src, keys = videos
    stats = encode_shards(str(src), tmp_path / "lat", _encoder(tiny_ae, clip_frames=8, clip_stride=4), log=False)
    assert (stats.videos, stats.clips, stats.frames, stats.bad_samples) == (6, 6 * 2, 6 * 2 * 8, 0)
    manifest = Manifest.load(tmp_path / "lat")
    assert manifest.sample_type == "latent" and manifest.num_samples == 12
    assert manifest.extra["latent"]["latent_channels"] == 4 and manifest.extra["encode"]["params"]["clip_frames"] == 8
    originals = {k: f for shard in expand_shard_spec(str(src)) for k, f in iter_raw_samples(shard)}
    from safetensors.torch import load

    seen = 0
    for shard in expand_shard_spec(str(tmp_path / "lat")):
        for key, files in iter_raw_samples(shard):
            seen += 1
            source_key, clip = key.split("/clip")
            start = 4 * int(clip)
            meta = VideoMeta.from_json(files[META_EXT])
            source_meta = VideoMeta.from_json(originals[source_key][META_EXT])
            assert meta.sample_type == "latent" and meta.num_frames == 8 and meta.fps == source_meta.fps
            assert meta.extra["latent"]["source_frames"] == [start, start + 8]
            assert meta.extra["latent"]["weights"] == "tiny.safetensors"
            assert meta.actions == {k: v[start : start + 8] for k, v in source_meta.actions.items()}  # no crop
            frames = decode_frames(originals[source_key]["mp4"], list(range(12)))
            png = np.asarray(__import__("PIL.Image").Image.open(__import__("io").BytesIO(files[FIRST_FRAME_EXT])))
            assert np.array_equal(png, frames[start])  # the clean first frame of the clip, lossless
            tensors = load(files[LATENTS_EXT])
            assert tensors["mean"].dtype == torch.float16 and tensors["mean"].shape == (8, 4, 16, 16)
            video = torch.from_numpy(frames[start : start + 8]).permute(0, 3, 1, 2)[None].float() / 127.5 - 1
            with torch.no_grad():
                posterior = tiny_ae.encode(video)
            torch.testing.assert_close(tensors["mean"].float(), posterior.mean[0], rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(tensors["std"].float(), posterior.std[0], rtol=2e-3, atol=2e-3)
    assert seen == 12


def test_encode_resize_crop_moves_goals(tiny_ae, tmp_path):
    src = tmp_path / "wide"
    write_videos(src, 1, num_frames=4, height=32, width=48, per_shard=1, actions=True)
    encode_shards(str(src), tmp_path / "lat", _encoder(tiny_ae, size=(16, 16)), log=False)
    (shard,) = expand_shard_spec(str(tmp_path / "lat"))
    ((key, files),) = list(iter_raw_samples(shard))
    meta = VideoMeta.from_json(files[META_EXT])
    assert (meta.height, meta.width, meta.num_frames) == (16, 16, 4)
    (src_shard,) = expand_shard_spec(str(src))
    original = VideoMeta.from_json(next(iter_raw_samples(src_shard))[1][META_EXT])
    for before, after in zip(original.actions["goal"], meta.actions["goal"]):
        # 32x48 -> cover 16x24 -> center crop 16x16 (4 columns cut each side)
        x = (before[0] * 24 - 4) / 16
        assert (after is None) == (not 0 <= x <= 1)
        if after is not None:
            assert after == pytest.approx([x, before[1]], abs=1e-6)


def test_encode_resume_skips_finished_shards_and_refuses_other_settings(tiny_ae, videos, tmp_path, capsys):
    src, _ = videos
    out = tmp_path / "lat"
    first = encode_shards(str(src), out, _encoder(tiny_ae), log=False)
    assert (first.shards_done, first.shards_skipped, first.clips) == (2, 0, 6)
    tars = sorted(p.name for p in out.glob("*.tar"))
    stamps = {name: os.stat(out / name).st_mtime_ns for name in tars}
    again = encode_shards(str(src), out, _encoder(tiny_ae), log=False)
    assert (again.shards_done, again.shards_skipped, again.clips) == (0, 2, 0)
    assert {name: os.stat(out / name).st_mtime_ns for name in tars} == stamps
    # An interrupted run: the second shard never finished (its partial folder is left, not in the manifest).
    manifest = json.loads((out / "manifest.json").read_text())
    lost = manifest["extra"]["encode"]["done"].pop("shard-000001")
    manifest["shards"] = [s for s in manifest["shards"] if s["path"] not in lost]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in lost:
        (out / name).unlink()
    (out / ".partial-shard-000001").mkdir()
    resumed = encode_shards(str(src), out, _encoder(tiny_ae), log=False)
    assert (resumed.shards_done, resumed.shards_skipped, resumed.clips) == (1, 1, 3)
    assert not (out / ".partial-shard-000001").exists()
    assert Manifest.load(out).num_samples == 6 and sorted(p.name for p in out.glob("*.tar")) == tars
    with pytest.raises(ValueError, match="clip_frames"):
        encode_shards(str(src), out, _encoder(tiny_ae, clip_frames=4), log=False)


def test_vdiff_encode_cli_prints_throughput(tiny_ae, videos, tmp_path, capsys):
    src, _ = videos
    weights = tmp_path / "tiny.safetensors"
    save_autoencoder(tiny_ae, weights)
    code = vdiff_main(["encode", "--input", str(src), "--out", str(tmp_path / "lat"), "--weights", str(weights),
                       "--clip-frames", "12", "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "frames/s" in printed and "encoded 2 shard(s)" in printed
    assert Manifest.load(tmp_path / "lat").num_samples == 6
    # The same autoencoder as a diffusers folder (layout detected) encodes the same latents.
    save_autoencoder(tiny_ae, tmp_path / "tiny_diffusers", layout="diffusers")
    assert vdiff_main(["encode", "--input", str(src), "--out", str(tmp_path / "lat2"), "--weights",
                       str(tmp_path / "tiny_diffusers"), "--clip-frames", "12", "--batch-size", "2", "--device", "cpu"]) == 0
    from safetensors.torch import load

    def latents(folder):
        return {k: load(f[LATENTS_EXT])["mean"] for shard in expand_shard_spec(str(folder))
                for k, f in iter_raw_samples(shard)}

    first, second = latents(tmp_path / "lat"), latents(tmp_path / "lat2")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        vdiff_main(["encode", "--input", str(src), "--out", str(tmp_path / "x"), "--weights",
                    str(tmp_path / "missing.safetensors")])
