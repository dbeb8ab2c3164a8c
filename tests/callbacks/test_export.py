"""vdiff export: EMA or trained weights of a checkpoint's network as safetensors that load strictly
into a fresh network (VDT) with the module's outputs; LoRA merged (plain names, same output) or kept
separate (base + peft folders); autoencoder checkpoints in the vdiff and diffusers layouts."""

from __future__ import annotations

import argparse
import json

import lightning as L
import pytest
import torch
from safetensors import safe_open

from tests.callbacks.test_lora import Pretrained, probe, tiny_module
from tests.lit.test_network_hook import Clips
from vdiff import export as export_tool
from vdiff.callbacks.ema import EMA
from vdiff.callbacks.lora import LoRA
from vdiff.lit.adapters import VDT_TEMPORAL_ATTENTION, LoRAAdapter, load_adapter
from vdiff.lit.module_loading import load_module
from vdiff.models.vdt import VDT
from vdiff.weights.vdt import load_vdt_checkpoint


def train(tmp_path, callbacks) -> str:
    module = tiny_module()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Pretrained(), *callbacks, EMA(decay=0.5)], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Clips(), batch_size=None))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    export_tool.add_arguments(parser)
    return export_tool.run(parser.parse_args(list(argv)))


def fresh_vdt(path) -> VDT:
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["vdiff_config"])
    from vdiff.models.vdt import VDTConfig

    return load_vdt_checkpoint(VDT(VDTConfig(**config)), path).eval()


def test_export_ema_and_trained_weights(tmp_path):
    ckpt = train(tmp_path, [])
    assert cli("--ema", ckpt, str(tmp_path / "ema.safetensors")) == 0
    assert cli(ckpt, str(tmp_path / "trained.safetensors")) == 0
    for name, use_ema in (("ema", True), ("trained", False)):
        net = fresh_vdt(tmp_path / f"{name}.safetensors")  # strict load into a fresh VDT
        torch.testing.assert_close(probe(net), probe(load_module(ckpt, use_ema=use_ema).net))
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:
        assert f.metadata()["vdiff_weights"] == "ema" and f.metadata()["vdiff_module"] == "vdiff.lit.vdt.VDTModule"
    with pytest.raises(ValueError, match="no diffusers layout"):
        cli("--layout", "diffusers", ckpt, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no LoRA"):
        cli("--merge-lora", ckpt, str(tmp_path / "y.safetensors"))


def test_export_lora_merged_and_separate(tmp_path):
    ckpt = train(tmp_path, [LoRA(adapters={"temporal": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=4)})])
    expected = probe(load_module(ckpt, use_ema=True).net)
    cli("--ema", "--merge-lora", ckpt, str(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(probe(fresh_vdt(tmp_path / "merged.safetensors")), expected, atol=1e-5, rtol=1e-5)

    written = export_tool.export(ckpt, tmp_path / "base.safetensors", ema=True)
    assert tmp_path / "base_lora" / "temporal" in written
    net = fresh_vdt(tmp_path / "base.safetensors")  # plain names: the base, adapters unloaded
    load_adapter(net, tmp_path / "base_lora" / "temporal", "temporal")
    torch.testing.assert_close(probe(net.eval()), expected)


def test_export_autoencoder_in_vdiff_and_diffusers_layouts(tmp_path):
    from vdiff.lit.autoencoder import AutoencoderModule
    from vdiff.weights.autoencoder import load_autoencoder

    torch.manual_seed(0)
    module = AutoencoderModule(net="tiny", lpips_weight=0.0)
    module.configure_model()
    state = module.state_dict()
    ema = {k: v + 0.01 for k, v in state.items() if k.startswith("autoencoder.") and v.is_floating_point()}
    checkpoint = {"state_dict": state, "hyper_parameters": dict(module.hparams), "ema_state_dict": ema,
                  "vdiff_module": "vdiff.lit.autoencoder.AutoencoderModule"}  # fmt: skip
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ae.ckpt")

    cli("--ema", str(tmp_path / "ae.ckpt"), str(tmp_path / "ae.safetensors"))
    cli("--ema", "--layout", "diffusers", str(tmp_path / "ae.ckpt"), str(tmp_path / "ae_diffusers"))
    assert (tmp_path / "ae_diffusers" / "config.json").is_file()
    for path, layout in ((tmp_path / "ae.safetensors", "vdiff"), (tmp_path / "ae_diffusers", "diffusers")):
        loaded = load_autoencoder(path, layout=layout).state_dict()
        for key, value in ema.items():
            torch.testing.assert_close(loaded[key[len("autoencoder.") :]], value, msg=f"{layout} {key}")
