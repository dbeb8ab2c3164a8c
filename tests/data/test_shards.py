"""Shard writing (count/size limits, manifest totals) and shard spec expansion."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from vdiff.data.schema import MANIFEST_NAME, Manifest, SchemaError, VideoMeta
from vdiff.data.shards import (
    ShardWriter,
    count_samples,
    expand_shard_spec,
    iter_raw_samples,
    load_manifests,
    manifest_sample_counts,
    read_json_meta,
)
from vdiff.data.video_io import decode_frames, encode_video

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def mp4() -> bytes:
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    return encode_video(frames, fps=10)


def meta(num_frames: int = 4, source: str = "test", **actions) -> VideoMeta:
    return VideoMeta(fps=10, width=16, height=16, num_frames=num_frames, source=source, actions=actions)


def write_set(folder, mp4, num: int, frames_of=lambda i: 4, **kwargs) -> Manifest:
    with ShardWriter(folder, **kwargs) as writer:
        for i in range(num):
            writer.write_video(f"clip{i:04d}", mp4, meta(frames_of(i)))
        assert writer.num_samples == num
    return writer.close()


def test_count_limit_and_manifest_totals(tmp_path, mp4):
    manifest = write_set(tmp_path / "set", mp4, 7, frames_of=lambda i: 4 + i, max_count=3)
    assert [s.path for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert [s.num_frames for s in manifest.shards] == [4 + 5 + 6, 7 + 8 + 9, 10]
    saved = json.loads((tmp_path / "set" / MANIFEST_NAME).read_text())
    assert saved["total_samples"] == 7 and saved["total_frames"] == sum(range(4, 11))
    assert not list((tmp_path / "set").glob("*.tmp"))
    keys = [key for shard in expand_shard_spec(tmp_path / "set") for key, _ in iter_raw_samples(shard)]
    assert keys == [f"clip{i:04d}" for i in range(7)]


def test_size_limit(tmp_path, mp4):
    sample_bytes = 512 + -(-len(mp4) // 512) * 512 + 1024  # mp4 + json members, header blocks included
    manifest = write_set(tmp_path / "set", mp4, 6, max_size=2 * sample_bytes + 100)
    assert [s.num_samples for s in manifest.shards] == [2, 2, 2]
    for shard in expand_shard_spec(tmp_path / "set"):
        # the writer's limit counts member data; tar adds end blocks and padding to a 10 KiB record
        assert os.path.getsize(shard) <= 2 * sample_bytes + 100 + 10240
    # one sample larger than max_size still gets written, in a shard of its own
    single = write_set(tmp_path / "tiny", mp4, 2, max_size=10)
    assert [s.num_samples for s in single.shards] == [1, 1]


def test_samples_round_trip(tmp_path, mp4):
    with ShardWriter(tmp_path / "set") as writer:
        writer.write_video("a", mp4, meta(speed=[1.0, 2.0, None, 4.0]))
    (shard,) = expand_shard_spec(tmp_path / "set")
    ((key, files),) = list(iter_raw_samples(shard))
    assert key == "a" and set(files) == {"mp4", "json"}
    assert files["mp4"] == mp4
    loaded = read_json_meta(files)
    assert loaded.actions["speed"] == [1.0, 2.0, None, 4.0] and loaded.sample_type == "video"
    assert decode_frames(files["mp4"], [0, 3]).shape == (2, 16, 16, 3)


def test_latent_samples(tmp_path):
    mean, std = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2)
    first = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    with ShardWriter(tmp_path / "lat", sample_type="latent", extra={"autoencoder": "tiny"}) as writer:
        writer.write_latent("a", mean, std, first, meta(12), image_embed=torch.randn(8))
        writer.write_latent("b", mean, std, first, meta(12))
        with pytest.raises(ValueError, match="writes 'latent' samples"):
            writer.write_video("c", b"x", meta())
    manifest = Manifest.load(tmp_path / "lat")
    assert manifest.sample_type == "latent" and manifest.extra == {"autoencoder": "tiny"} and manifest.num_frames == 24
    samples = dict(iter_raw_samples(expand_shard_spec(tmp_path / "lat")[0]))
    assert set(samples["a"]) == {"json", "latents.safetensors", "first_frame.png", "image_embed.safetensors"}
    assert set(samples["b"]) == {"json", "latents.safetensors", "first_frame.png"}
    tensors = load_safetensors(samples["a"]["latents.safetensors"])
    assert tensors["mean"].dtype == torch.float16 and tensors["mean"].shape == (3, 4, 2, 2)
    assert (tensors["std"].float() - std).abs().max() < 1e-3  # fp16 rounding of values in [0, 1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples["a"]["first_frame.png"]))), first)
    assert read_json_meta(samples["a"]).sample_type == "latent"


def test_writer_rejects_bad_keys_and_samples(tmp_path, mp4):
    with ShardWriter(tmp_path / "set") as writer:
        for bad in ("a.b", "", "/abs", "with space"):
            with pytest.raises(ValueError, match="key"):
                writer.write_video(bad, mp4, meta())
        writer.write_video("ok", mp4, meta())
        with pytest.raises(ValueError, match="already written"):
            writer.write_video("ok", mp4, meta())
        with pytest.raises(SchemaError, match="num_frames"):
            writer.write_video("neg", mp4, meta(num_frames=0))
        with pytest.raises(ValueError, match="mp4 is empty"):
            writer.write_video("empty", b"", meta())
    assert count_samples(tmp_path / "set") == (1, 4)
    with pytest.raises(FileExistsError, match="already holds shards"):
        ShardWriter(tmp_path / "set")


def test_write_raw_counts_frames_from_json(tmp_path, mp4):
    with ShardWriter(tmp_path / "set") as writer:
        writer.write_raw("good", {"mp4": mp4, "json": meta(9).to_json().encode()})
        writer.write_raw("nojson", {"mp4": mp4})
        writer.write_raw("badjson", {"mp4": mp4, "json": b"{not json"})
    assert count_samples(tmp_path / "set") == (3, 9)


@pytest.fixture
def two_sets(tmp_path, mp4):
    write_set(tmp_path / "a", mp4, 5, max_count=1)
    write_set(tmp_path / "b", mp4, 4, max_count=2, prefix="part")
    return tmp_path


def test_expand_folder_manifest_brace_glob_tar_and_lists(two_sets):
    root = str(two_sets)
    a = [f"{root}/a/shard-{i:06d}.tar" for i in range(5)]
    b = [f"{root}/b/part-{i:06d}.tar" for i in range(2)]
    assert expand_shard_spec(f"{root}/a") == a
    assert expand_shard_spec(two_sets / "a" / MANIFEST_NAME) == a
    assert expand_shard_spec(f"{root}/a/shard-{{000001..000003}}.tar") == a[1:4]
    assert expand_shard_spec(f"{root}/*/*.tar") == sorted(a + b)
    assert expand_shard_spec(a[2]) == [a[2]]
    assert expand_shard_spec([f"{root}/b", a[0], f"{root}/a/shard-{{000000..000001}}.tar"]) == sorted(a[:2] + b)
    # relative paths are normalised, duplicates removed
    assert expand_shard_spec([f"{root}/a/../a/shard-000000.tar", a[0]]) == [a[0]]


def test_expand_errors_name_the_spec(two_sets):
    root = str(two_sets)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_shard_spec(f"{root}/nothing_here")
    with pytest.raises(FileNotFoundError, match=r"no-such-\*"):
        expand_shard_spec(f"{root}/no-such-*.tar")
    with pytest.raises(FileNotFoundError, match="2 of 3 shards do not exist"):
        expand_shard_spec(f"{root}/a/shard-{{000004..000006}}.tar")
    with pytest.raises(FileNotFoundError, match=r"subfolders \['a', 'b'\]"):
        expand_shard_spec(root)
    with pytest.raises(ValueError, match="empty shard spec"):
        expand_shard_spec([])
    (two_sets / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        expand_shard_spec(two_sets / "notes.txt")


def test_counts_from_manifests_and_fallback(two_sets):
    root = two_sets
    assert count_samples(root / "a") == (5, 20)
    assert count_samples([root / "a", root / "b"]) == (9, 36)
    assert count_samples(f"{root}/a/shard-{{000000..000001}}.tar") == (2, 8)  # only the named shards
    manifests = load_manifests([root / "a", root / "b"])
    assert manifests is not None and [m.num_samples for m in manifests] == [5, 4]
    (root / "b" / MANIFEST_NAME).unlink()
    assert load_manifests([root / "a", root / "b"]) is None
    assert count_samples(root / "b") == (4, 16)  # counted from the tars themselves


def test_truncated_tar_raises_naming_the_file(tmp_path, mp4):
    write_set(tmp_path / "set", mp4, 3)
    (shard,) = expand_shard_spec(tmp_path / "set")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="shard-000000.tar"):
        list(iter_raw_samples(shard))


def test_shards_are_deterministic(tmp_path, mp4):
    write_set(tmp_path / "x", mp4, 3)
    write_set(tmp_path / "y", mp4, 3)
    assert (tmp_path / "x/shard-000000.tar").read_bytes() == (tmp_path / "y/shard-000000.tar").read_bytes()


def test_error_inside_with_keeps_shards_but_writes_no_manifest(tmp_path, mp4):
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "set", max_count=2) as writer:
        for i in range(3):
            writer.write_video(f"c{i}", mp4, meta())
        raise RuntimeError("boom")
    assert not (tmp_path / "set" / MANIFEST_NAME).exists()
    assert not list((tmp_path / "set").glob("*.tmp"))
    assert count_samples(tmp_path / "set") == (3, 12)  # counted from the tars
    with pytest.raises(RuntimeError, match="wrote no manifest"):
        writer.close()


def test_manifest_sample_counts_lists_only_shards_in_a_manifest(two_sets):
    root = two_sets
    a_shards, b_shards = expand_shard_spec(root / "a"), expand_shard_spec(root / "b")
    assert manifest_sample_counts(b_shards) == dict(zip(b_shards, [2, 2]))
    (root / "b" / MANIFEST_NAME).unlink()
    counts = manifest_sample_counts(a_shards + b_shards)
    assert counts == dict(zip(a_shards, [1] * 5))
