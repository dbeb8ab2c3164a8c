"""hf:// hub ids as weights paths (vdiff.weights.hub), with no test reaching the internet: against a local hub
endpoint (tests.weights.servers.FakeHub, through huggingface_hub itself: HF_ENDPOINT) a tiny SVD pipeline repo loads by
its id exactly as its local folder does, downloading only what the readers read (no fp16 variant, no root checkpoint,
no README); offline afterwards the cache alone answers; a gated repository is one line naming the page to accept and
huggingface-cli login; a cache laid out by hand as huggingface_hub lays it out (refs/main, snapshots/<commit>, blobs)
resolves offline and verifies against its blob names; what is not cached is one line naming the id, the cache folder
and the command that fetches it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import huggingface_hub.constants
import pytest
import torch

from tests.weights.servers import COMMIT, FakeHub, fill_hub_cache
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.models.conditioners import CLIPImageEmbedder, CLIPImageEmbedderConfig
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights.download import WeightsUnavailableError
from vdiff.weights.hub import (
    GatedWeightsError,
    HubId,
    hub_id_of_cached_path,
    parse_hub_id,
    resolve_hub_path,
    select_files,
    verify_cached,
)
from vdiff.weights.safetensors_io import resolve_weights_path, save_state_dict
from vdiff.weights.svd import SVDWeights, load_svd, save_svd

DECOYS = {  # files a pipeline repo holds that no reader reads: never downloaded (their bytes are not weights)
    "unet/diffusion_pytorch_model.fp16.safetensors": b"not read",
    "vae/diffusion_pytorch_model.fp16.safetensors": b"not read",
    "image_encoder/model.fp16.safetensors": b"not read",
    "svd.safetensors": b"the original single file: not part of the pipeline folder",
    "README.md": b"# tiny",
    "example.gif": b"GIF89a",
}


def test_hub_ids_parse_as_huggingface_hub_writes_them():
    assert parse_hub_id("hf://stabilityai/stable-video-diffusion-img2vid-xt") == HubId(
        "stabilityai/stable-video-diffusion-img2vid-xt"
    )
    assert parse_hub_id("hf://OpenDriveLab/Vista/vista.safetensors") == HubId("OpenDriveLab/Vista", None, "vista.safetensors")
    assert parse_hub_id("hf://org/name@v1.0/vae/") == HubId("org/name", "v1.0", "vae")
    assert parse_hub_id("hf://org/name@refs/pr/3/unet") == HubId("org/name", "refs/pr/3", "unet")
    assert parse_hub_id("hf:/org/name/unet") == HubId("org/name", None, "unet")  # what pathlib makes of hf://
    assert str(parse_hub_id("hf://org/name@abc/unet")) == "hf://org/name@abc/unet"
    assert parse_hub_id("hf://org/name/vae").is_file is False and parse_hub_id("hf://o/n/x.ckpt").is_file
    for bad in ("hf://org", "hf://datasets/org/name", "hf://org/name@/x", "hf://org/name/../x", "hf://o rg/n"):
        with pytest.raises(ValueError, match="hf://ORG/NAME"):
            parse_hub_id(bad)
    cached = f"/c/hub/models--org--my-model/snapshots/{COMMIT}/unet/config.json"
    assert hub_id_of_cached_path(cached) == HubId("org/my-model", COMMIT, "unet/config.json")
    assert hub_id_of_cached_path("/data/weights/unet/config.json") is None


def test_only_what_the_readers_read_is_selected():
    listing = [
        "model_index.json", "svd_xt.safetensors", "svd_xt_image_decoder.safetensors", "README.md", "output.gif",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "image_encoder/config.json", "image_encoder/model.safetensors", "image_encoder/model.fp16.safetensors",
        "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
        "big/config.json", "big/model.safetensors.index.json", "big/model-00001-of-00002.safetensors",
        "big/model-00002-of-00002.safetensors", "half/config.json", "half/diffusion_pytorch_model.fp16.safetensors",
    ]  # fmt: skip
    assert select_files(listing) == [
        "big/config.json", "big/model.safetensors.index.json", "feature_extractor/preprocessor_config.json",
        "half/config.json", "half/diffusion_pytorch_model.fp16.safetensors",  # the only weights there: the reader's pick
        "image_encoder/config.json", "image_encoder/model.safetensors", "model_index.json",
        "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert select_files(listing, "unet") == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert select_files(["open_clip_pytorch_model.bin", "open_clip_config.json"], "") == [
        "open_clip_config.json", "open_clip_pytorch_model.bin"]  # no config.json: a plain folder, all of it
    assert select_files(listing, "nowhere") == []


@pytest.fixture(scope="module")
def tiny_svd(tmp_path_factory):
    """A tiny random SVD pipeline folder (vdiff's tiny parts written in the diffusers layout by save_svd) and its files
    as a hub repository, with the decoys a real pipeline repository also holds."""
    torch.manual_seed(0)
    parts = SVDWeights(
        UNetSVD(UNetSVDConfig.from_name("tiny")),
        CLIPImageEmbedder(CLIPImageEmbedderConfig.from_name("tiny")),
        VideoAutoencoder(dataclasses.replace(AutoencoderConfig.from_name("tiny-svd"), num_res_blocks=2, use_quant_conv=True)),
    )
    folder = save_svd(parts, tmp_path_factory.mktemp("svd") / "tiny-svd", convert_norm_eps=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return folder, {**files, **DECOYS}


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test (HF_HOME), offline as every test is unless it says otherwise."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture
def fake_hub(tiny_svd, hub_home, monkeypatch):
    """The tiny pipeline as org/tiny-svd (and gated as org/gated-svd) on a local endpoint; downloads on."""
    hub = FakeHub({"org/tiny-svd": tiny_svd[1], "org/gated-svd": tiny_svd[1]}, gated=("org/gated-svd",))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read by the library at import
    yield hub
    hub.close()


def test_a_pipeline_repo_loads_by_its_id_as_its_folder_does_fetching_only_what_is_read(tiny_svd, fake_hub, hub_home,
                                                                                       monkeypatch):  # fmt: skip
    folder, files = tiny_svd
    weights = load_svd("hf://org/tiny-svd")
    local = load_svd(folder)
    for part in ("unet", "image_encoder", "autoencoder"):
        a, b = getattr(weights, part).state_dict(), getattr(local, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert weights.path == hub_home / "models--org--tiny-svd" / "snapshots" / COMMIT
    fetched = fake_hub.downloads()
    assert sorted(fetched) == sorted(n for n in files if n not in DECOYS)  # no fp16, no single file, no README
    # Offline afterwards, the cache alone answers: a part, the whole pipeline; nothing is requested.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(fake_hub.requests)
    assert resolve_weights_path("hf://org/tiny-svd/unet", allow_dir=True) == weights.path / "unet"
    assert load_svd("hf://org/tiny-svd").layout == "diffusers" and len(fake_hub.requests) == asked
    assert all(ok for _, ok, _ in verify_cached("hf://org/tiny-svd"))


def test_a_bare_model_file_brings_its_config_and_a_folder_is_not_a_file(tiny_svd, fake_hub, hub_home):
    from vdiff.weights.autoencoder import read_autoencoder

    read = read_autoencoder("hf://org/tiny-svd/vae/diffusion_pytorch_model.safetensors")
    assert read.config_file is not None and read.config_file.name == "config.json"  # fetched beside the weights
    assert sorted(fake_hub.downloads()) == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(IsADirectoryError, match="hf://org/tiny-svd/vae is a folder"):
        resolve_weights_path("hf://org/tiny-svd/vae", what="a file")


def test_gated_missing_and_wrong_ids_are_one_line_each(fake_hub, hub_home):
    with pytest.raises(GatedWeightsError) as err:
        resolve_hub_path("hf://org/gated-svd/unet", what="SVDModule net_weights")
    message = str(err.value)
    assert message.startswith("SVDModule net_weights: hf://org/gated-svd/unet: ")
    assert f"{fake_hub.url}/org/gated-svd" in message and "huggingface-cli login" in message and "\n" not in message
    assert not any(p.is_file() and "blobs" in p.parts for p in hub_home.rglob("*"))
    with pytest.raises(FileNotFoundError, match="no repository org/nothing"):
        resolve_hub_path("hf://org/nothing")
    with pytest.raises(FileNotFoundError, match="has no file unet/nothing.safetensors at main"):
        resolve_hub_path("hf://org/tiny-svd/unet/nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="has no folder 'nothing'"):
        resolve_hub_path("hf://org/tiny-svd/nothing")
    with pytest.raises(FileNotFoundError, match="has no revision 'v9'"):
        resolve_hub_path("hf://org/tiny-svd@v9/unet")


def test_a_prefilled_cache_resolves_offline_and_verifies_against_its_blob_names(hub_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail the test
    weights = tmp_path / "vista.safetensors"
    save_state_dict({"model.diffusion_model.x": torch.arange(6.0)}, weights)
    fill_hub_cache(hub_home, "OpenDriveLab/Vista", {"vista.safetensors": weights.read_bytes()})
    path = resolve_weights_path("hf://OpenDriveLab/Vista/vista.safetensors")
    assert path == hub_home / "models--OpenDriveLab--Vista" / "snapshots" / COMMIT / "vista.safetensors"
    assert resolve_weights_path(f"hf://OpenDriveLab/Vista@{COMMIT}/vista.safetensors") == path
    [(file, ok, detail)] = verify_cached("hf://OpenDriveLab/Vista/vista.safetensors")
    assert ok and detail == f"sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()}"
    blob = path.resolve()
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # corrupted on disk
    [(file, ok, detail)] = verify_cached("hf://OpenDriveLab/Vista/vista.safetensors")
    assert ok is False and blob.name in detail


def test_offline_an_uncached_id_says_what_to_fetch_where(hub_home, monkeypatch):
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights_path("hf://stabilityai/stable-video-diffusion-img2vid-xt/unet", what="SVDModule net_weights",
                             allow_dir=True)  # fmt: skip
    message = str(err.value)
    for needle in ("SVDModule net_weights: hf://stabilityai/stable-video-diffusion-img2vid-xt/unet",
                   str(hub_home / "models--stabilityai--stable-video-diffusion-img2vid-xt"), "HF_HUB_OFFLINE=1",
                   "vdiff weights download hf://stabilityai/stable-video-diffusion-img2vid-xt/unet",
                   "huggingface-cli download stabilityai/stable-video-diffusion-img2vid-xt"):  # fmt: skip
        assert needle in message, needle
    assert "\n" not in message and isinstance(err.value, FileNotFoundError)


def test_a_sharded_folder_brings_the_shards_its_index_names_and_not_the_fp16_ones(hub_home, monkeypatch):
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    half = "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"
    files = {
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": dict(zip("ab", shards))}).encode(),
        f"unet/{shards[0]}": b"1",
        f"unet/{shards[1]}": b"2",
        "unet/diffusion_pytorch_model.fp16.safetensors.index.json": json.dumps({"weight_map": {"a": half}}).encode(),
        f"unet/{half}": b"h",
    }
    hub = FakeHub({"org/sharded": files})
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        folder = resolve_hub_path("hf://org/sharded/unet")
        assert sorted(hub.downloads()) == sorted(f for f in files if f != f"unet/{half}")  # the fp16 index is json
        assert (folder / shards[1]).read_bytes() == b"2"
    finally:
        hub.close()
