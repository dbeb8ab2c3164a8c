"""LoRA on two CPU processes (gloo). DDP: the adapters are injected before the wrap, train identically
on both ranks, and the checkpoint reloads through load_module. ModelParallelStrategy + fully_shard:
the adapters are injected before sharding, become DTensor shards beside the frozen base, train, and the
peft folders written beside the sharded checkpoint (gathered full tensors) load on a fresh, unsharded
network with the outputs the sharded one computes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tests.callbacks.helpers import run_two_ranks
from tests.callbacks.test_lora import SPATIAL_ATTENTION, Pretrained, probe, randomize, tiny_module
from tests.lit.test_network_hook import Clips
from vdiff.callbacks.ema import EMA
from vdiff.callbacks.lora import LoRA
from vdiff.lit.adapters import VDT_TEMPORAL_ATTENTION, LoRAAdapter, adapter_names, load_adapter
from vdiff.lit.module_loading import load_module
from vdiff.lit.scaling import is_dtensor
from vdiff.lit.vdt import VDTModule
from vdiff.weights.peft_files import adapter_folder


def lora() -> LoRA:
    return LoRA(
        adapters={
            "temporal": LoRAAdapter(VDT_TEMPORAL_ATTENTION, rank=4),
            "spatial": LoRAAdapter(SPATIAL_ATTENTION, rank=2),
        }
    )


def trainer(root: str, strategy, steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip


def loader():
    return torch.utils.data.DataLoader(Clips(), batch_size=None)


def adapter_values(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" in n}


class Wrapper(L.Callback):
    """Records how the strategy wrapped the module during training."""

    def on_train_start(self, trainer, pl_module):
        self.wrapped = type(trainer.strategy.model).__name__


def _ddp_rank(rank: int, root: str) -> dict:
    module, wrapper = tiny_module(), Wrapper()
    run = trainer(root, "ddp", 3, [Pretrained(), lora(), EMA(decay=0.5), wrapper])
    run.fit(module, train_dataloaders=loader())
    run.save_checkpoint(Path(root) / "ddp.ckpt")
    optimised = sum(p.numel() for group in run.optimizers[0].param_groups for p in group["params"])
    return {
        "adapters": adapter_values(module),
        "optimised": optimised,
        "wrapped": wrapper.wrapped,
        "out": probe(module.net.eval()),
    }


def test_lora_under_ddp(tmp_path):
    ranks = run_two_ranks(tmp_path, _ddp_rank, str(tmp_path))
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    first, second = ranks[0]["adapters"], ranks[1]["adapters"]
    assert first and all(torch.equal(first[n], second[n]) for n in first)  # replicas stay identical
    assert any(n.endswith("lora_B.temporal.weight") and first[n].abs().sum() > 0 for n in first)  # B left zero: trained
    assert ranks[0]["optimised"] == sum(v.numel() for v in first.values())  # adapters only
    loaded = load_module(str(tmp_path / "ddp.ckpt"), use_ema=False)
    torch.testing.assert_close(probe(loaded.net), ranks[0]["out"])


class ShardedVDT(VDTModule):
    """The tiny VDT, every block and the network sharded with fully_shard after the network hook."""

    def configure_model(self) -> None:
        super().configure_model()  # builds the network and runs the hook (LoRA injects here)
        from torch.distributed.fsdp import fully_shard

        if is_dtensor(next(self.net.parameters())):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def sharded_module() -> ShardedVDT:
    module = tiny_module()
    module.__class__ = ShardedVDT
    return module


def _sharded_rank(rank: int, root: str) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = sharded_module()
    callback = lora()
    run = trainer(
        root, ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 3, [Pretrained(), callback]
    )
    run.fit(module, train_dataloaders=loader())
    path = Path(root) / "sharded.ckpt"
    run.save_checkpoint(path)
    params = dict(module.named_parameters())
    adapters = [n for n in params if ".lora_" in n]
    module.net.eval()
    return {
        "adapters_sharded": all(is_dtensor(params[n]) for n in adapters),
        "base_frozen": all(not p.requires_grad for n, p in params.items() if ".lora_" not in n),
        "trainable": sorted(n for n, p in params.items() if p.requires_grad) == sorted(adapters),
        "out": probe(module.net),  # every rank takes part in FSDP's gathers
        "path": str(path),
    }


def test_lora_adapters_survive_sharding(tmp_path):
    ranks = run_two_ranks(tmp_path, _sharded_rank, str(tmp_path))
    for r in ranks:
        assert r["adapters_sharded"] and r["base_frozen"] and r["trainable"]
    torch.testing.assert_close(ranks[0]["out"], ranks[1]["out"])
    # A fresh, unsharded network (the same frozen base) with the gathered adapter folders computes the same.
    fresh = tiny_module()
    fresh.configure_model()
    randomize(fresh.net)
    before = probe(fresh.net.eval())
    for name in ("temporal", "spatial"):
        load_adapter(fresh.net, adapter_folder(ranks[0]["path"], name), name)
    assert sorted(adapter_names(fresh.net)) == ["spatial", "temporal"]
    after = probe(fresh.net.eval())
    assert not torch.allclose(after, before)  # the adapters trained
    torch.testing.assert_close(after, ranks[0]["out"], rtol=1e-5, atol=1e-5)
