"""The Scaling switches and strategies that need no second process: fused AdamW selection, what the FSDP1
strategy wraps (the block classes each network declares), a tensor-parallel mesh refused, the defaults
without a Scaling callback, and every strategy block under recipes/strategy parsing on top of a model recipe."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.scale.helpers import cpu_trainer, placeholder_loader, step_module
from vdiff.lit.scaling import BlockFSDPStrategy, Scaling, block_classes, blocks_of, scaling_of, use_fused_adamw
from vdiff.models.unet_svd import SpatioTemporalResBlock, SpatioTemporalTransformer, UNetSVD, UNetSVDConfig
from vdiff.models.vdt import VDTBlock

REPO = Path(__file__).resolve().parents[2]
STRATEGIES = sorted((REPO / "recipes" / "strategy").glob("*.yaml"))


def test_fused_adamw_on_request_and_on_cuda_only_by_default(tmp_path):
    module = step_module()
    assert not use_fused_adamw(module, None, torch.device("cpu"))
    assert module.optimizer_factory is None
    assert use_fused_adamw(module, None, torch.device("cuda", 0))
    assert module.optimizer_factory.keywords == {**module.optimizer_settings.adamw_options(), "fused": True}
    assert not use_fused_adamw(module, True, torch.device("cpu"))  # already set: left alone
    named = step_module()
    named.optimizer_factory = lambda groups: torch.optim.SGD(groups, lr=0.1)
    assert not use_fused_adamw(named, True, torch.device("cuda", 0))  # a recipe's own optimizer wins

    # Through a Trainer on CPU: fused_adamw=True gives AdamW with the fused CPU kernel and the module's groups.
    module = step_module()
    trainer = cpu_trainer(tmp_path, 1, callbacks=[Scaling(fused_adamw=True)])
    trainer.fit(module, train_dataloaders=placeholder_loader())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [module.optimizer_settings.weight_decay, 0.0]


def test_defaults_without_a_scaling_callback(tmp_path):
    assert vars(scaling_of(None)) == vars(Scaling())
    module = step_module()
    trainer = cpu_trainer(tmp_path, 1)
    trainer.fit(module, train_dataloaders=placeholder_loader())
    assert not module.net.gradient_checkpointing
    assert not trainer.optimizers[0].defaults["fused"]  # CPU: torch's default AdamW


def test_block_classes_declared_by_each_network():
    module = step_module()
    assert block_classes(module.net) == (VDTBlock,)
    assert len(blocks_of(module.net)) == module.net.config.depth
    unet = UNetSVD(UNetSVDConfig.from_name("tiny"))
    assert set(block_classes(unet)) == {SpatioTemporalResBlock, SpatioTemporalTransformer}
    assert blocks_of(unet) and all(isinstance(b, UNetSVD.block_classes()) for b in blocks_of(unet))


def test_fsdp1_strategy_wraps_the_declared_blocks():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = BlockFSDPStrategy(activation_checkpointing=True)
    module = step_module()
    assert strategy.block_policy(module) == {VDTBlock}
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "sharded"
    assert "auto_wrap_policy" not in strategy.kwargs  # decided at setup, from the module's network
    assert isinstance(ModuleWrapPolicy(strategy.block_policy(module)), ModuleWrapPolicy)
    with pytest.raises(ValueError, match="declares no block_classes"):
        strategy.block_policy(L.LightningModule())
    # FSDP1 needs an accelerator: refused on CPU before training, pointing at the CPU path.
    with pytest.raises(ValueError, match="needs GPUs.*model_parallel_cpu.yaml"):
        cpu_trainer(".", 1, strategy=BlockFSDPStrategy()).fit(step_module(), train_dataloaders=placeholder_loader())


def test_a_tensor_parallel_mesh_is_refused():
    from vdiff.lit.scaling import data_parallel_mesh

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Dim", (), {"size": lambda self: 2})()

    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        data_parallel_mesh(Mesh())


@pytest.mark.parametrize("block", STRATEGIES, ids=lambda p: p.stem)
def test_every_strategy_block_parses_on_top_of_a_model_recipe(block, capsys):
    from vdiff.cli import main

    assert block.stem in {"ddp", "fsdp", "model_parallel", "model_parallel_cpu"}
    text = block.read_text()
    assert text.startswith("#") and "vdiff fit -c" in text  # documented with a command
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(REPO / "recipes" / "vdt_cityscapes.yaml"), "-c", str(block), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(text)["trainer"]
    strategy = printed["trainer"]["strategy"]
    if isinstance(wanted["strategy"], str):
        assert strategy == wanted["strategy"]
    else:
        assert strategy["class_path"] == wanted["strategy"]["class_path"]
        assert {k: strategy["init_args"][k] for k in wanted["strategy"]["init_args"]} == wanted["strategy"]["init_args"]
    assert printed["trainer"]["callbacks"]  # the model recipe's callbacks are kept
