"""A truncated, empty or corrupt safetensors file fails with one message naming the file, through every
reader vdiff has; and no module opens a safetensors file around :func:`open_safetensors`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.callbacks.test_lora import tiny_net
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.callbacks.exported_module import is_export
from vdiff.callbacks.lora import (
    ADAPTER_WEIGHTS,
    VDT_TEMPORAL_ATTENTION,
    LoRAAdapter,
    inject_adapters,
    load_adapter,
    read_adapter_weights,
    save_adapter,
)
from vdiff.weights.autoencoder import read_autoencoder
from vdiff.weights.clip import read_clip_image_embedder
from vdiff.weights.inflate import read_image_unet
from vdiff.weights.safetensors_io import (
    WeightsFileError,
    load_keys,
    load_metadata,
    load_state_dict,
    open_safetensors,
    read_safetensors,
)
from vdiff.weights.svd import load_svd
from vdiff.weights.unet_svd import read_unet_svd
from vdiff.weights.vdt import read_vdt_state_dict
from vdiff.weights.vista import read_vista

PACKAGE = Path(__file__).resolve().parents[2] / "vdiff"


def _whole(path: Path) -> bytes:
    save_file({"a.weight": torch.arange(64.0).reshape(8, 8), "b": torch.ones(3)}, str(path), metadata={"k": "v"})
    return path.read_bytes()


CUTS = {
    "empty": lambda data: b"",
    "inside the length": lambda data: data[:5],
    "inside the header": lambda data: data[:20],
    "inside the tensors": lambda data: data[:-7],
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_cut_file_names_itself_in_every_reader(tmp_path, cut):
    data = _whole(tmp_path / "whole.safetensors")
    path = tmp_path / "weights.safetensors"
    path.write_bytes(CUTS[cut](data))
    readers = {
        "open_safetensors": open_safetensors,
        "read_safetensors": read_safetensors,
        "load_state_dict": load_state_dict,
        "load_state_dict(select)": lambda p: load_state_dict(p, select=lambda k: k.startswith("a")),
        "load_keys": load_keys,
        "load_metadata": load_metadata,
        "read_vdt_state_dict": read_vdt_state_dict,
        "read_unet_svd": read_unet_svd,
        "read_vista": read_vista,
        "load_svd": load_svd,
        "read_autoencoder": read_autoencoder,
        "read_clip_image_embedder": read_clip_image_embedder,
        "read_image_unet": read_image_unet,
    }
    for name, read in readers.items():
        with pytest.raises(WeightsFileError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path}: not a readable safetensors file ({len(CUTS[cut](data))} bytes; "), name
        assert "truncated" in message and "\n" not in message, name


def test_a_cut_adapter_file_names_itself(tmp_path):
    net = tiny_net()
    inject_adapters(net, {"default": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=2).peft_config()})
    folder = save_adapter(net, "default", tmp_path / "last_lora" / "default")
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(WeightsFileError, match=re.escape(f"{weights}: not a readable safetensors file (100 bytes")):
        read_adapter_weights(folder)
    with pytest.raises(WeightsFileError, match=re.escape(f"{weights}: not a readable safetensors file (100 bytes")):
        load_adapter(tiny_net(), folder)


def test_a_cut_export_names_itself_instead_of_being_read_as_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_whole(tmp_path / "whole.safetensors")[:20])
    with pytest.raises(WeightsFileError, match=re.escape(f"{path}: not a readable safetensors file (20 bytes")):
        load_module(str(path))
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"not safetensors")
    assert not is_export(checkpoint) and not is_export(tmp_path / "missing.ckpt")


def test_a_folder_in_place_of_the_file_names_it(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.mkdir()
    with pytest.raises(OSError, match=re.escape(str(path))):
        open_safetensors(path)


def test_whole_files_read_as_before(tmp_path):
    path = tmp_path / "w.safetensors"
    _whole(path)
    tensors = read_safetensors(path)
    assert torch.equal(tensors["a.weight"], torch.arange(64.0).reshape(8, 8)) and torch.equal(tensors["b"], torch.ones(3))
    assert list(read_safetensors(path, select=lambda k: k == "b")) == ["b"]
    assert sorted(load_keys(path)) == ["a.weight", "b"] and load_metadata(path) == {"k": "v"}
    with open_safetensors(path) as f:
        assert f.get_slice("a.weight").get_shape() == [8, 8]


def test_every_module_opens_safetensors_files_through_open_safetensors():
    """``safe_open`` / ``load_file`` name no file in their errors: only safetensors_io may call them."""
    pattern = re.compile(r"\bsafe_open\b|\bload_file\b|safetensors\.torch import[^\n]*\bload\b(?!_)")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "safetensors_io.py" and path.parent.name == "weights":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    # vdiff.data reads latents from bytes inside a shard sample (no file): a bad one is skipped and counted
    offenders = [o for o in offenders if not o.startswith("vdiff/data/latent_datamodule.py")]
    assert not offenders, "\n".join(offenders)
