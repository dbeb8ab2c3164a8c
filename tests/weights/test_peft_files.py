"""peft's adapter files (vdiff.weights.peft_files): one writer and one path rule, shared by the LoRA callback,
``vdiff export`` and the Vista converter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import vdiff.weights.vista as vista
from tests.callbacks.test_lora import tiny_net
from vdiff.lit.adapters import VDT_TEMPORAL_ATTENTION, LoRAAdapter, inject_adapters, save_adapter
from vdiff.weights.peft_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_folder,
    config_dict,
    lora_folder,
    read_adapter_config,
    read_adapter_weights,
)


def test_one_path_rule_for_checkpoints_exports_and_converted_files(tmp_path):
    ckpt = tmp_path / "run" / "last.ckpt"
    assert lora_folder(ckpt) == tmp_path / "run" / "last_lora"
    assert adapter_folder(ckpt, "temporal") == tmp_path / "run" / "last_lora" / "temporal"
    assert adapter_folder(ckpt, "temporal", ema=True) == tmp_path / "run" / "last_lora_ema" / "temporal"
    out = tmp_path / "vista_unet.safetensors"  # an export, or the Vista converter's UNet: its one adapter
    assert adapter_folder(out) == tmp_path / "vista_unet_lora" / "default"
    assert vista.adapter_folder is adapter_folder  # the converter has no rule of its own
    for bad in ("../x", "/abs", "a/b", "", "a.b", ".."):
        with pytest.raises(ValueError, match="cannot name a folder"):
            adapter_folder(ckpt, bad)


def written_files(folder):
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        metadata = f.metadata()
    return (folder / ADAPTER_CONFIG).read_text(), metadata


def test_the_callbacks_and_the_vista_converters_adapters_are_written_alike(tmp_path):
    """Both go through write_adapter: the same JSON text for the config, the same safetensors metadata."""
    net = tiny_net()
    inject_adapters(net, {"temporal": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=2).peft_config()})
    ours = save_adapter(net, "temporal", adapter_folder(tmp_path / "last.ckpt", "temporal"))
    text, metadata = written_files(ours)
    assert text == json.dumps(config_dict(net.peft_config["temporal"]), indent=2, sort_keys=True) + "\n"
    assert metadata == {"format": "pt"}

    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.qkv"
    state = {f"base_model.model.{module}.lora_A.weight": torch.ones(6, 4),
             f"base_model.model.{module}.lora_B.weight": torch.zeros(12, 6)}  # fmt: skip
    lora = vista.VistaLoRA(state_dict=state, rank=2, scale=1.0, ranks={module: 6})
    folder = lora.save(adapter_folder(tmp_path / "vista_unet.safetensors"))
    assert folder == tmp_path / "vista_unet_lora" / "default"
    text, metadata = written_files(folder)
    assert text == json.dumps(config_dict(lora.peft_config()), indent=2, sort_keys=True) + "\n"
    assert metadata == {"format": "pt"}
    assert read_adapter_config(folder).rank_pattern == {r"attn1\.qkv": 6, r"attn2\.kv": 4}
    assert {k: v.shape for k, v in read_adapter_weights(folder).items()} == {k: v.shape for k, v in state.items()}


def test_a_broken_adapter_config_is_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "x_lora" / "default"
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"x_lora/default/adapter_config\.json: not a JSON adapter config"):
        read_adapter_config(folder)
    (folder / ADAPTER_CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"adapter_config\.json: an adapter config holds a JSON object, got list"):
        read_adapter_config(folder)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only LoRA adapters are supported, got peft_type 'IA3'"):
        read_adapter_config(folder)
    with pytest.raises(FileNotFoundError, match=r"no adapter config at .*missing_lora/default/adapter_config\.json"):
        read_adapter_config(tmp_path / "missing_lora" / "default")
