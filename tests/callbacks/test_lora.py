"""LoRA through the network hook on a tiny VDT: only adapters (and named extras) reach the optimizer
and the EMA, the base stays frozen, several named adapters add up, checkpoints reload through
load_module (trained and EMA weights), peft-format folders beside the checkpoint load on a fresh
network (ours and peft's PeftModel), and merging equals the unmerged network."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from tests.lit.helpers import vdt_module
from tests.lit.test_network_hook import Clips
from vdiff.callbacks.ema import EMA
from vdiff.callbacks.lora import LoRA
from vdiff.lit.adapters import (
    LORA_KEY,
    VDT_TEMPORAL_ATTENTION,
    LoRAAdapter,
    adapter_names,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload_adapters,
    unmerge_adapters,
)
from vdiff.lit.checkpointing import EMA_KEY
from vdiff.lit.module_loading import load_module
from vdiff.models.vdt import VDT, VDTConfig
from vdiff.weights.peft_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_folder

TINY = dict(patch_size=8, depth=2, hidden_size=32, num_heads=2, learn_sigma=False, prediction="x0")
SPATIAL_ATTENTION = r"blocks\.\d+\.attn\.(qkv|proj)"
EXTRA = r"final_layer\.linear\.(weight|bias)"


def tiny_module(seed: int = 0):
    torch.manual_seed(seed)
    return vdt_module(**TINY, configure=False, mask_weights={"prediction": 1.0}, lr=1e-2, val_steps=2)


def two_adapters() -> LoRA:
    return LoRA(
        adapters={
            "temporal": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=4, alpha=8),
            "spatial": LoRAAdapter(SPATIAL_ATTENTION, rank=2, init=False),
        },
        extra_trainable=[EXTRA],
    )


class Pretrained(L.Callback):
    """Stands in for pretrained weights: adaLN-Zero's zero gates (and zero final layer) become small
    random values, so every branch, adapted or not, affects the output. Runs in the hook before LoRA."""

    def configure_network(self, trainer, pl_module):
        randomize(pl_module.net)


def randomize(net, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


class Snapshot(L.Callback):
    """The module's parameters when training starts (after the hook, before any step)."""

    def on_fit_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def probe(net, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        return net(x, t)


def test_only_adapters_and_extras_train_and_the_checkpoint_reloads(tmp_path):
    module, lora, ema, snap = tiny_module(), two_adapters(), EMA(decay=0.5), Snapshot()
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Pretrained(), lora, ema, snap], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Clips(), batch_size=None))

    net = module.net
    assert sorted(adapter_names(net)) == ["spatial", "temporal"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"net.{n}" for n in lora.trainable}
    assert all(".lora_" in n or "final_layer.linear" in n for n in trainable)
    assert any(".temporal_attn.qkv.lora_A.temporal." in n for n in trainable)
    assert any(".attn.proj.lora_B.spatial." in n for n in trainable)
    assert not any("temporal_attn" in n and ".spatial." in n for n in trainable)  # spatial regex: spatial only
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}
    assert set(ema.shadow) == trainable  # the EMA averages exactly what trains
    for name, param in module.named_parameters():
        changed = not torch.equal(param.detach(), snap.before[name])
        assert changed == (name in trainable), name  # the base stays frozen; adapters and extras train

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # hparams hold config objects
    entry = checkpoint[LORA_KEY]
    assert entry["network"] == "net" and set(entry["adapters"]) == {"temporal", "spatial"}
    assert entry["adapters"]["temporal"]["r"] == 4 and entry["extra_trainable"] == [EXTRA]
    assert set(checkpoint[EMA_KEY]) == trainable
    # peft-format folders beside the checkpoint: trained weights and EMA weights.
    for ema_folder in (False, True):
        for name in ("temporal", "spatial"):
            folder = adapter_folder(path, name, ema=ema_folder)
            assert (folder / ADAPTER_WEIGHTS).is_file(), folder
            assert json.loads((folder / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"

    # load_module injects the adapters again before loading (no trainer, so no hook).
    trained_out = probe(net.eval())
    loaded = load_module(str(path), use_ema=False)
    assert sorted(adapter_names(loaded.net)) == ["spatial", "temporal"]
    torch.testing.assert_close(probe(loaded.net), trained_out)
    with ema.averaged(module):
        averaged_out = probe(net)
    torch.testing.assert_close(probe(load_module(str(path)).net), averaged_out)
    assert not torch.allclose(averaged_out, trained_out)

    # The EMA adapter folders hold the averaged adapters: loaded on a fresh network they give the EMA
    # output (extras are not adapters; with the EMA's extras too).
    fresh = tiny_module()
    fresh.configure_model()  # no trainer: no hook, a plain network
    fresh.net.load_state_dict({k: v for k, v in loaded.net.state_dict().items() if ".lora_" not in k}, strict=False)
    for name in ("temporal", "spatial"):
        load_adapter(fresh.net, adapter_folder(path, name, ema=True), name)
    with torch.no_grad():
        for key, value in checkpoint[EMA_KEY].items():
            if "final_layer" in key:
                fresh.get_parameter(key).copy_(value)
    torch.testing.assert_close(probe(fresh.net.eval()), averaged_out)


def tiny_net(seed: int = 0) -> VDT:
    torch.manual_seed(seed)
    config = VDTConfig(patch_size=8, depth=2, hidden_size=32, num_heads=2, in_channels=3, learn_sigma=False)
    net = VDT(config)
    randomize(net)
    return net.eval()


def adapted(seed: int = 0) -> VDT:
    net = tiny_net(seed)
    configs = {
        "temporal": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=4, init=False).peft_config(),
        "all": LoRAAdapter(rank=2, alpha=4, init=False).peft_config(net),  # VDT's preset: every attention
    }
    inject_adapters(net, configs)
    return net.eval()


def test_merged_output_equals_unmerged():
    net = adapted()
    base = probe(tiny_net())
    out = probe(net)
    assert not torch.allclose(out, base, atol=1e-4)  # the (random-B) adapters change the output
    merge_adapters(net)
    torch.testing.assert_close(probe(net), out, atol=1e-5, rtol=1e-5)
    unmerge_adapters(net)
    torch.testing.assert_close(probe(net), out, atol=1e-5, rtol=1e-5)
    # Unloaded: a plain VDT with the original parameter names; merged it computes the adapted output.
    plain = unload_adapters(adapted(), merge=True)
    fresh = tiny_net(1)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(probe(fresh), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe(unload_adapters(adapted(), merge=False)), base)


def test_adapter_folders_round_trip_on_a_fresh_network_ours_and_peft(tmp_path):
    from peft import PeftModel

    net = adapted()
    out = probe(net)
    for name in ("temporal", "all"):
        save_adapter(net, name, tmp_path / name)
    fresh = tiny_net()  # the same base weights, no adapters
    for name in ("temporal", "all"):
        load_adapter(fresh, tmp_path / name, name)
    torch.testing.assert_close(probe(fresh.eval()), out)
    # peft reads the same folders (its own format): PeftModel.from_pretrained + load_adapter.
    peft_model = PeftModel.from_pretrained(tiny_net(), str(tmp_path / "temporal"), adapter_name="temporal")
    peft_model.load_adapter(str(tmp_path / "all"), adapter_name="all")
    peft_model.base_model.set_adapter(["temporal", "all"])
    torch.testing.assert_close(probe(peft_model.eval()), out)


def test_a_target_that_matches_nothing_and_a_bad_extra_are_errors():
    with pytest.raises(ValueError):
        inject_adapters(tiny_net(), {"x": LoRAAdapter(r"nothing\.here").peft_config()})
    module = tiny_module()
    module.net = module.build_network()
    with pytest.raises(ValueError, match="extra_trainable"):
        LoRA(extra_trainable=[r"no\.such\.param"]).configure_network(None, module)


def test_resume_injects_through_the_hook_and_refuses_other_adapters(tmp_path):
    def run(lora: LoRA, steps: int, ckpt_path=None, snap=None):
        module = tiny_module()
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[Pretrained(), lora, EMA(decay=0.5), *([snap] if snap else [])], default_root_dir=tmp_path,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(Clips(), batch_size=None)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
        return trainer, module

    trainer, _ = run(two_adapters(), 2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    saved = torch.load(tmp_path / "step2.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    snap = Snapshot()
    trainer, module = run(two_adapters(), 3, tmp_path / "step2.ckpt", snap)
    assert trainer.global_step == 3 and sorted(adapter_names(module.net)) == ["spatial", "temporal"]
    adapters = [k for k in saved if ".lora_" in k]
    assert adapters and all(
        torch.equal(snap.before[k], saved[k]) for k in adapters
    )  # restored into the injected adapters
    # A run with a differently scaled adapter is refused rather than silently resumed.
    other = LoRA(
        adapters={"temporal": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=4, alpha=2),
                  "spatial": LoRAAdapter(SPATIAL_ATTENTION, rank=2, init=False)},
        extra_trainable=[EXTRA],
    )  # fmt: skip
    with pytest.raises(ValueError, match="injected differently"):
        run(other, 3, tmp_path / "step2.ckpt")


def test_a_recipe_names_several_adapters():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=LoRA)
    config = parser.parse_string(
        """
        callback:
          class_path: vdiff.callbacks.LoRA
          init_args:
            adapters:
              temporal: {target_modules: '.*temporal_attn\\.(qkv|proj)', rank: 16, alpha: 16, init: gaussian}
              spatial: {target_modules: ['qkv', 'proj'], rank: 4, dropout: 0.1}
            extra_trainable: ['.*action.*']
        """
    )
    callback = parser.instantiate(config).callback
    assert callback.adapters["temporal"] == LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=16, alpha=16, init="gaussian")
    assert callback.adapters["spatial"].rank == 4 and callback.extra_trainable == [".*action.*"]


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "scale"),
    [(4, None, False, 1.0), (2, None, False, 1.0), (16, None, False, 1.0), (4, 8.0, False, 2.0), (4, 8.0, True, 4.0)],
)
def test_an_adapter_scales_its_update_by_alpha_over_rank_and_no_alpha_means_one(rank, alpha, rslora, scale):
    net = tiny_net()
    adapter = LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=rank, alpha=alpha, init=False, use_rslora=rslora)
    inject_adapters(net, {"a": adapter.peft_config(net)})
    layers = [module for name, module in net.named_modules() if name.endswith("temporal_attn.qkv")]
    assert len(layers) == 2 and all(layer.scaling["a"] == pytest.approx(scale) for layer in layers)
    layer = layers[0]  # the update it adds is scale * B A x (init=False: B is random, not zero)
    x = torch.randn(5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        update = layer(x) - layer.base_layer(x)
        expected = scale * layer.lora_B["a"](layer.lora_A["a"](x))
    assert update.abs().max() > 1e-3
    torch.testing.assert_close(update, expected, atol=1e-6, rtol=1e-5)
