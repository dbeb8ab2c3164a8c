"""LoRA targets come from the network: ``LoRA()`` with no arguments adapts q/k/v/out of every attention of VDT,
UNet-SVD (svd_tiny's size) and Vista and trains only the adapters; every preset a network declares adapts
exactly its modules; an unknown preset is refused with the network's preset names."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch

from tests.callbacks.test_lora import tiny_module as tiny_vdt_module
from tests.lit.test_network_hook import Clips
from tests.lit.test_svd_module import NET as SVD_TINY_NET
from tests.lit.test_svd_module import clip_batch
from tests.lit.test_vista_module import ENCODER, driving_batch
from tests.lit.test_vista_module import NET as VISTA_NET
from vdiff.callbacks.lora import LoRA
from vdiff.lit.adapters import LoRAAdapter, adapter_names, inject_adapters, tuner_layers
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.svd import SVDModule
from vdiff.lit.vista import VistaModule
from vdiff.models.actions import ActionEncoder
from vdiff.models.conditioners import CLIPImageEmbedder
from vdiff.models.unet_svd import UNetSVD
from vdiff.models.vdt import VDT, VDTConfig

# What every family's default ("attention") preset adapts: the last two parts of each adapted module's name.
VDT_ATTENTION = {"attn.qkv", "attn.proj", "temporal_attn.qkv", "temporal_attn.proj"}
UNET_ATTENTION = {"attn1.qkv", "attn1.proj", "attn2.q", "attn2.kv", "attn2.proj"}


class Randomize(L.Callback):
    """Stands in for pretrained weights (zero-initialised outputs would stop every gradient to the adapters);
    runs in the network hook before LoRA."""

    def configure_network(self, trainer, pl_module):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in pl_module.net.parameters():
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


class Snapshot(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        for seed in range(10):
            yield self.make(seed)


def svd_module():
    return SVDModule(net=SVD_TINY_NET, image_encoder=CLIPImageEmbedder("tiny"), optimizer=OptimizerSettings(lr=1e-2))


def vista_module():
    return VistaModule(net=VISTA_NET, image_encoder=CLIPImageEmbedder("tiny"), action_encoder=ActionEncoder(**ENCODER),
                       optimizer=OptimizerSettings(lr=1e-2))


FAMILIES = {
    "vdt": (tiny_vdt_module, lambda: Clips(), VDT_ATTENTION),
    "svd": (svd_module, lambda: Batches(lambda seed: clip_batch(seed=seed)), UNET_ATTENTION),
    "vista": (vista_module, lambda: Batches(lambda seed: driving_batch()), UNET_ATTENTION),
}


def fit_one_step(module, data, lora: LoRA, tmp_path) -> Snapshot:
    snap = Snapshot()
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Randomize(), lora, snap], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return snap


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_without_arguments_adapts_every_attention_and_trains_only_the_adapters(family, tmp_path):
    make_module, data, expected = FAMILIES[family]
    module, lora = make_module(), LoRA()
    snap = fit_one_step(module, data(), lora, tmp_path)

    adapted = [name for name, _ in tuner_layers(module.net)]
    assert adapter_names(module.net) == ["default"] and adapted
    assert {".".join(name.split(".")[-2:]) for name in adapted} == expected  # q/k/v/out of every attention
    if family != "vdt":  # spatial and temporal transformer blocks alike
        assert any(".temporal_blocks." in n for n in adapted) and any(re.search(r"\.blocks\.\d", n) for n in adapted)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), snap.before[n])}
    assert changed and changed <= trainable  # one step moved adapters and nothing else


def test_vista_preset_trains_the_action_projections_beside_the_adapters(tmp_path):
    module = vista_module()
    snap = fit_one_step(module, Batches(lambda seed: driving_batch()), LoRA(preset="vista", rank=4), tmp_path)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    actions = {n for n in trainable if n.endswith(".action_kv.weight")}
    assert actions and trainable - actions and all(".lora_" in n for n in trainable - actions)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), snap.before[n])}
    assert changed <= trainable and actions & changed


def networks():
    yield VDT(VDTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=8, in_channels=3, learn_sigma=False))
    yield UNetSVD(SVD_TINY_NET)
    yield UNetSVD(VISTA_NET.replace(action_dim=16, cond_frame_time_embed=True))  # with Vista's additions


@pytest.mark.parametrize("net", list(networks()), ids=["vdt", "unet-svd", "vista"])
def test_every_preset_by_name_adapts_exactly_its_modules(net):
    names = [name for name, _ in net.named_modules()]
    for preset, targets in type(net).LORA_PRESETS.items():
        fresh = type(net)(net.config)
        inject_adapters(fresh, {"default": LoRAAdapter(preset=preset, rank=2).peft_config(fresh)})
        adapted = sorted(name for name, _ in tuner_layers(fresh))
        assert adapted, preset
        assert adapted == sorted(n for n in names if re.fullmatch(targets.modules, n)), preset


@pytest.mark.parametrize("net", list(networks())[:2], ids=["vdt", "unet-svd"])
def test_an_unknown_preset_is_refused_with_the_networks_presets(net):
    with pytest.raises(ValueError, match=r"unknown preset 'mlp-only' .*attention, .*attention\+mlp"):
        LoRAAdapter(preset="mlp-only").peft_config(net)
    with pytest.raises(ValueError, match="target_modules or preset, not both"):
        LoRAAdapter(target_modules=".*qkv", preset="attention")
