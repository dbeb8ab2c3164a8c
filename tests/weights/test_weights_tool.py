"""``vdiff weights list|download|verify`` (vdiff.weights.tool) on local servers and hand-filled caches: every preset
listed with its source, size, licence, where it goes and whether it is cached; download fetches ahead of a job (and
offline says what it could not fetch, in one line from the command line); verify re-hashes URL files against their
pins and recorded digests and hub files against their blob names, exit status 1 on a mismatch."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from tests.weights.servers import FileServer, fill_hub_cache
from vdiff.cli import TOP_TOOLS, _run_tool, main
from vdiff.weights import registry
from vdiff.weights.safetensors_io import save_state_dict

PAYLOAD = b"torchscript archive bytes" * 1000


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty weights and Hugging Face caches for this test; offline unless a test turns downloads on."""
    monkeypatch.setenv("VDIFF_CACHE", str(tmp_path / "vdiff"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("VDIFF_WEIGHTS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "vdiff" / "weights", tmp_path / "hf" / "hub"


@pytest.fixture
def served_i3d(monkeypatch):
    server = FileServer()
    server.files["i3d.pt"] = PAYLOAD
    preset = dataclasses.replace(registry.PRESETS["i3d-torchscript"], source=f"{server.url}/i3d.pt")
    monkeypatch.setitem(registry.PRESETS, "i3d-torchscript", preset)
    yield server
    server.close()


def presets_listed(out: str) -> dict[str, str]:
    return {line.split("  (")[0]: line for line in out.splitlines() if line and not line.startswith((" ", "Hub "))}


def test_list_names_every_preset_with_its_facts_and_whether_it_is_cached(caches, capsys):
    weights_cache, hub_cache = caches
    assert "weights" in TOP_TOOLS
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    listed = presets_listed(out)
    assert set(listed) == set(registry.PRESETS)
    assert all("(not cached, " in line for line in listed.values())
    for preset in registry.PRESETS.values():
        assert preset.source in out and preset.licence in out and preset.size in listed[preset.name]
    assert str(weights_cache / "i3d_torchscript.pt") in out
    assert str(hub_cache / "models--stabilityai--stable-video-diffusion-img2vid-xt") in out
    assert "sha256 prefix 7be5be79" in out and "huggingface-cli login" in out
    # Cached now: a URL file in the weights cache, a hub file in the Hugging Face cache.
    weights_cache.mkdir(parents=True)
    (weights_cache / "i3d_torchscript.pt").write_bytes(PAYLOAD)
    fill_hub_cache(hub_cache, "OpenDriveLab/Vista", {"vista.safetensors": b"vista"})
    main(["weights", "list"])
    listed = presets_listed(capsys.readouterr().out)
    assert {name for name, line in listed.items() if "(cached, " in line} == {"i3d-torchscript", "vista"}


def test_download_fetches_ahead_and_offline_says_what_it_could_not_fetch(caches, served_i3d, monkeypatch, capsys):
    weights_cache, _ = caches
    with pytest.raises(OSError, match=r"1 of 1 could not be fetched: i3d-torchscript: .*HF_HUB_OFFLINE=1"):
        main(["weights", "download", "i3d-torchscript"])
    # From the command line: one line on stderr, exit status 2.
    text = TOP_TOOLS["weights"][1]
    assert _run_tool("vdiff.weights.tool", "vdiff weights", text, ["download", "i3d-torchscript"], catch=True) == 2
    err = capsys.readouterr().err
    assert err.count("vdiff weights: error: ") == 1 and served_i3d.url in err and str(weights_cache) in err
    assert served_i3d.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")  # a user's environment: vdiff itself does not turn downloads off
    assert main(["weights", "download", "i3d-torchscript"]) == 0
    assert (weights_cache / "i3d_torchscript.pt").read_bytes() == PAYLOAD
    assert f"i3d-torchscript: {weights_cache / 'i3d_torchscript.pt'}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no weights preset 'nonesuch'"):
        main(["weights", "download", "nonesuch"])


def test_verify_rehashes_cached_files_and_fails_on_a_mismatch(caches, served_i3d, monkeypatch, tmp_path, capsys):
    weights_cache, hub_cache = caches
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    main(["weights", "download", "i3d-torchscript"])  # records the digest beside the file
    vista = tmp_path / "vista.safetensors"
    save_state_dict({"x": torch.ones(3)}, vista)
    fill_hub_cache(hub_cache, "OpenDriveLab/Vista", {"vista.safetensors": vista.read_bytes()})
    capsys.readouterr()
    assert main(["weights", "verify"]) == 0  # every cached preset
    out = capsys.readouterr().out
    assert f"OK        {weights_cache / 'i3d_torchscript.pt'}  sha256 {hashlib.sha256(PAYLOAD).hexdigest()}" in out
    assert "vista.safetensors  sha256" in out and "2 files: 2 match, 0 do not" in out
    (weights_cache / "i3d_torchscript.pt").write_bytes(PAYLOAD + b"tampered")
    assert main(["weights", "verify", "i3d-torchscript", "hf://OpenDriveLab/Vista/vista.safetensors"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and f"recorded at download {hashlib.sha256(PAYLOAD).hexdigest()}" in out
    assert "2 files: 1 match, 1 do not" in out
    with pytest.raises(FileNotFoundError, match="svd-xt: nothing cached to verify"):
        main(["weights", "verify", "svd-xt"])


def test_recipes_name_public_weights_by_hub_id_that_presets_cover_and_the_readme_shows_them_first():
    import re
    from pathlib import Path

    import yaml

    from vdiff.weights.hub import parse_hub_id

    root = Path(__file__).resolve().parents[2]

    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    preset_repos = {parse_hub_id(p.source).repo_id for p in registry.PRESETS.values() if p.is_hub}
    named = {}
    for recipe in sorted((root / "recipes").glob("*.yaml")):
        ids = [s for s in strings(yaml.safe_load(recipe.read_text())) if s.startswith("hf://")]
        named[recipe.name] = ids
        for hub_id in ids:  # each parses, and a preset names its repository (`vdiff weights list` shows it)
            assert parse_hub_id(hub_id).repo_id in preset_repos, (recipe.name, hub_id)
    for recipe in ("svd_img2vid.yaml", "svd_xt.yaml", "svd_interpolate.yaml", "svd_multiview.yaml", "svd_from_sd21.yaml",
                   "svd_temporal_decoder.yaml", "vista.yaml", "vista_phase2.yaml", "vista_phase2_hires.yaml",
                   "vista_nuscenes_eval.yaml", "vdt_cityscapes.yaml"):  # fmt: skip
        assert named[recipe], f"{recipe} names no hub id"
    readme = (root / "README.md").read_text()
    svd = readme[readme.index("## Stable Video Diffusion"):readme.index("## Pretrained weights")]
    first = re.search(r"(hf://stabilityai/stable-video-diffusion|weights/stable-video-diffusion)", svd)
    assert first and first.group(1).startswith("hf://")  # the hub form first, the local form after it
    for name in registry.PRESETS:  # the README lists the presets (LPIPS' three as lpips-alex|vgg|squeeze)
        assert f"`{name}`" in readme or name.startswith("lpips-"), name
