"""URL downloads of metric and auxiliary weights (vdiff.weights.download, vdiff.weights.registry), against a local
HTTP server in the test process (no test reaches the internet): pinned sha256 (full and torchvision-style prefix)
checked, corrupt and truncated downloads refused and never left where a loader would take them, a killed download
resumed with an HTTP Range request, offline (HF_HUB_OFFLINE=1) and unreachable servers named in one line with the URL
and the folder, the loaders (FVD's I3D by its file name, LPIPS' backbone) fetching on first use."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torchvision

from tests.weights.servers import FileServer
from vdiff.weights import registry
from vdiff.weights.download import (
    DownloadError,
    HashMismatchError,
    WeightsUnavailableError,
    download,
    recorded_digest,
)
from vdiff.weights.i3d import find_feature_weights
from vdiff.weights.safetensors_io import MissingWeightsError, resolve_weights_path

PAYLOAD = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture
def server():
    s = FileServer()
    s.files["i3d_torchscript.pt"] = PAYLOAD
    yield s
    s.close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads on (tests run with HF_HUB_OFFLINE=1), into a cache folder of this test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("VDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VDIFF_WEIGHTS_CACHE", raising=False)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    return tmp_path / "cache" / "weights"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_download_is_hash_checked_written_atomically_and_recorded(server, online, capsys):
    target = online / "i3d_torchscript.pt"
    path = download(f"{server.url}/i3d_torchscript.pt", target, sha(PAYLOAD))
    assert path == target and target.read_bytes() == PAYLOAD
    assert recorded_digest(target) == sha(PAYLOAD)
    assert not target.with_name("i3d_torchscript.pt.partial").exists()
    assert "i3d_torchscript.pt" in capsys.readouterr().err  # the progress bar, on stderr
    assert download(f"{server.url}/i3d_torchscript.pt", target, sha(PAYLOAD)) == target
    assert len(server.requests) == 1  # a file in place is not fetched again
    # A torchvision-style prefix pin works the same way.
    assert download(f"{server.url}/i3d_torchscript.pt", online / "b.pt", sha(PAYLOAD)[:8]).read_bytes() == PAYLOAD


@pytest.mark.parametrize("pin", ["full", "prefix"])
def test_a_corrupt_download_is_deleted_and_both_hashes_are_named(server, online, pin):
    server.modes["i3d_torchscript.pt"] = "corrupt"
    target = online / "i3d_torchscript.pt"
    expected = sha(PAYLOAD) if pin == "full" else sha(PAYLOAD)[:8]
    with pytest.raises(HashMismatchError) as err:
        download(f"{server.url}/i3d_torchscript.pt", target, expected)
    message = str(err.value)
    got = sha(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF]))
    assert got in message and expected in message and "\n" not in message
    assert not target.exists() and not target.with_name("i3d_torchscript.pt.partial").exists()


def test_a_killed_download_leaves_no_file_that_passes_and_resumes_with_a_range_request(server, online):
    server.modes["i3d_torchscript.pt"] = "truncate"
    target = online / "i3d_torchscript.pt"
    url = f"{server.url}/i3d_torchscript.pt"
    with pytest.raises(DownloadError, match="run again to resume") as err:
        download(url, target, sha(PAYLOAD))
    assert not isinstance(err.value, HashMismatchError)
    partial = target.with_name("i3d_torchscript.pt.partial")
    assert not target.exists() and partial.stat().st_size == len(PAYLOAD) // 2
    with pytest.raises(MissingWeightsError):  # what a loader looks for is not there: the partial file is not taken
        resolve_weights_path(target)
    assert download(url, target, sha(PAYLOAD)).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("i3d_torchscript.pt", f"bytes={len(PAYLOAD) // 2}-")
    assert not partial.exists()


def test_a_server_that_ignores_range_sends_the_whole_file_again(server, online):
    target = online / "i3d_torchscript.pt"
    target.parent.mkdir(parents=True)
    target.with_name("i3d_torchscript.pt.partial").write_bytes(b"stale bytes of another file")
    server.modes["i3d_torchscript.pt"] = "norange"
    assert download(f"{server.url}/i3d_torchscript.pt", target, sha(PAYLOAD)).read_bytes() == PAYLOAD


def test_a_partial_file_that_is_already_complete_is_finished_without_new_bytes(server, online):
    target = online / "i3d_torchscript.pt"
    target.parent.mkdir(parents=True)
    target.with_name("i3d_torchscript.pt.partial").write_bytes(PAYLOAD)
    assert download(f"{server.url}/i3d_torchscript.pt", target, sha(PAYLOAD)).read_bytes() == PAYLOAD
    assert server.requests == [("i3d_torchscript.pt", f"bytes={len(PAYLOAD)}-")]


def test_offline_and_unreachable_name_the_url_and_the_folder_in_one_line(server, online, monkeypatch):
    target = online / "i3d_torchscript.pt"
    url = f"{server.url}/i3d_torchscript.pt"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        download(url, target, hint="vdiff weights download i3d-torchscript")
    message = str(err.value)
    assert url in message and str(target) in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert "vdiff weights download i3d-torchscript" in message
    assert server.requests == [] and not online.exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    server.close()  # nothing listens there now
    with pytest.raises(WeightsUnavailableError, match="cannot be reached") as err:
        download(url, target)
    assert url in str(err.value) and str(target) in str(err.value)
    with pytest.raises(DownloadError, match="HTTP 404"):
        s = FileServer()
        try:
            download(f"{s.url}/nothing.pt", target)
        finally:
            s.close()


@pytest.fixture
def local_presets(server, monkeypatch):
    """The I3D preset pointing at the local server, pinned to the served bytes."""
    i3d = dataclasses.replace(registry.PRESETS["i3d-torchscript"], source=f"{server.url}/i3d_torchscript.pt",
                              sha256=sha(PAYLOAD))  # fmt: skip
    monkeypatch.setitem(registry.PRESETS, "i3d-torchscript", i3d)
    return i3d


def test_fvd_weights_named_by_file_name_are_downloaded_on_first_use(server, online, local_presets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = find_feature_weights("i3d_torchscript")  # the default name: not here, not under $VDIFF_WEIGHTS
    assert path == online / "i3d_torchscript.pt" and path.read_bytes() == PAYLOAD
    assert resolve_weights_path("i3d-torchscript") == path  # the preset's name works too; no second request
    assert len(server.requests) == 1
    # A local file keeps priority; a path with a folder in it is the user's own file and is never downloaded.
    (tmp_path / "i3d_torchscript.pt").write_bytes(b"mine")
    assert resolve_weights_path("i3d_torchscript.pt").read_bytes() == b"mine"
    with pytest.raises(MissingWeightsError, match="nowhere/i3d_torchscript.pt"):
        find_feature_weights("i3d_torchscript", "nowhere/i3d_torchscript.pt")
    assert len(server.requests) == 1


def test_offline_a_missing_preset_says_what_to_fetch_and_where(server, online, local_presets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        find_feature_weights("i3d_torchscript")
    message = str(err.value)
    for needle in ("i3d_torchscript.pt", local_presets.source, str(online), "HF_HUB_OFFLINE=1",
                   "vdiff weights download i3d-torchscript", "$VDIFF_WEIGHTS is not set"):  # fmt: skip
        assert needle in message, needle
    assert "\n" not in message and server.requests == []


def test_the_lpips_backbone_is_downloaded_checked_and_gives_torchmetrics_own_lpips(online, monkeypatch, tmp_path):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from vdiff.metrics.lpips import LPIPS, LPIPS_BACKBONE_FILES, lpips_backbone_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torchvision's own cache: empty
    torch.manual_seed(0)
    backbone = tmp_path / "served.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), backbone)
    data = backbone.read_bytes()
    s = FileServer()
    s.files["squeeze.pth"] = data
    try:
        preset = dataclasses.replace(registry.PRESETS["lpips-squeeze"], source=f"{s.url}/squeeze.pth",
                                     sha256=sha(data)[:8])  # fmt: skip
        monkeypatch.setitem(registry.PRESETS, "lpips-squeeze", preset)
        path = registry.lpips_backbone("squeeze")
        assert path == online / "squeezenet1_1-b8a52dc0.pth" and path.read_bytes() == data
        # A wrong pin refuses the same bytes (the prefix is really checked).
        wrong = dataclasses.replace(preset, sha256="00000000" if not sha(data).startswith("0") else "11111111")
        monkeypatch.setitem(registry.PRESETS, "lpips-squeeze", wrong)
        path.unlink()
        with pytest.raises(HashMismatchError):
            registry.lpips_backbone("squeeze")
    finally:
        s.close()
    # The same network as torchmetrics builds from torchvision's cache.
    assert registry.PRESETS["lpips-squeeze"].file == LPIPS_BACKBONE_FILES["squeeze"]
    reference_file = lpips_backbone_path("squeeze")
    reference_file.parent.mkdir(parents=True)
    reference_file.write_bytes(data)
    reference = LearnedPerceptualImagePatchSimilarity(net_type="squeeze", reduction="none").net
    ours = LPIPS("squeeze", backbone=backbone)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours(x, y), reference(x, y).flatten(), rtol=0, atol=0)
    assert registry.lpips_backbone("squeeze") == reference_file  # torchvision's cache first, when it has the file


def test_every_url_preset_names_a_file_and_pins_only_published_hashes():
    for preset in registry.PRESETS.values():
        assert preset.purpose and preset.licence and preset.size, preset.name
        if preset.is_hub:
            assert preset.sha256 is None and not preset.file, preset.name
            continue
        assert preset.file and "/" not in preset.file and preset.source.startswith("https://"), preset.name
        if preset.sha256 is not None:  # only the prefixes the publisher puts in the file name (and checks)
            assert preset.sha256 in preset.file and preset.source.endswith(preset.file), preset.name
        else:
            assert preset.note, preset.name  # why there is no pin
    assert {p.file for p in registry.PRESETS.values() if p.name.startswith("lpips-")} == {
        "alexnet-owt-7be5be79.pth", "vgg16-397923af.pth", "squeezenet1_1-b8a52dc0.pth"}  # fmt: skip


def test_a_web_page_instead_of_the_file_is_refused_and_nothing_is_recorded(server, online):
    """An unpinned file (no published hash) would record whatever arrives first: a file host's HTML page (Google
    Drive's virus-scan confirmation, a login wall) must never become the cached weights."""
    server.modes["i3d_torchscript.pt"] = "page"
    target = online / "i3d_torchscript.pt"
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/i3d_torchscript.pt", target, None)
    message = str(err.value)
    assert "web page (text/html)" in message and "i3d_torchscript.pt" in message and "\n" not in message
    assert not target.exists() and recorded_digest(target) is None
    assert not target.with_name("i3d_torchscript.pt.partial").exists()
    server.modes["i3d_torchscript.pt"] = "ok"  # the link fixed: the real file arrives
    assert download(f"{server.url}/i3d_torchscript.pt", target, None).read_bytes() == PAYLOAD


def test_a_vdt_release_is_fetched_by_its_preset_name_and_loads_strictly(online, monkeypatch, tmp_path):
    """`vdiff weights download vdt-sky-timelapse` / load_vdt_checkpoint(model, "vdt-sky-timelapse"): the reference's
    DiT-style training checkpoint ({model, ema, args}: an argparse.Namespace pickled beside the tensors) is fetched
    from its (here: local) address into the weights cache and its EMA weights load strictly."""
    import argparse
    import io

    from vdiff.models.vdt import VDT, VDTConfig
    from vdiff.weights.vdt import load_vdt_checkpoint

    config = VDTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       num_frames=4, learn_sigma=False)  # fmt: skip
    torch.manual_seed(0)
    reference = VDT(config)
    params = dict(reference.named_parameters())
    ema = {k: v + 0.5 if k in params else v for k, v in reference.state_dict().items()}  # buffers: fixed tables
    buffer = io.BytesIO()
    torch.save({"model": reference.state_dict(), "ema": ema, "args": argparse.Namespace(model="VDT-L/2")}, buffer)
    preset = registry.PRESETS["vdt-sky-timelapse"]
    assert preset.source.startswith("https://drive.usercontent.google.com/download?id=") and "confirm=t" in preset.source
    s = FileServer()
    try:
        s.files[preset.file] = buffer.getvalue()
        monkeypatch.setitem(registry.PRESETS, preset.name, dataclasses.replace(preset, source=f"{s.url}/{preset.file}"))
        monkeypatch.chdir(tmp_path)
        model = load_vdt_checkpoint(VDT(config), "vdt-sky-timelapse")
    finally:
        s.close()
    assert (online / preset.file).is_file() and recorded_digest(online / preset.file) == sha(buffer.getvalue())
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key
