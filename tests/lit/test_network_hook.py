"""The network hook: callbacks that change the network (LoRA, adapters) see it in configure_model,
before optimizers are built, so what they add trains."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from tests.lit.helpers import vdt_module
from tests.lit.test_vdt_module import moving_square_batch


class GainedNetwork(nn.Module):
    """Wraps a denoiser and multiplies its output by a learned scalar (initialised to 1)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x, noise_level, cond=None, given_mask=None):
        return self.gain * self.inner(x, noise_level, cond, given_mask)


class AddGain(L.Callback):
    """A network-changing callback through the documented hook."""

    def __init__(self) -> None:
        self.calls = 0
        self.saw_optimizers = None

    def configure_network(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.calls += 1
        self.saw_optimizers = len(trainer.optimizers)
        pl_module.net = GainedNetwork(pl_module.net)


class Clips(torch.utils.data.IterableDataset):
    def __iter__(self):
        for seed in range(100):
            batch = moving_square_batch(batch=2, frames=4, size=16, seed=seed)
            yield {"video": batch["video"], "key": batch["key"]}


def test_a_callback_that_adds_a_parameter_trains_it(tmp_path):
    module = vdt_module(patch_size=8, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, prediction="x0",
                        configure=False, mask_weights={"prediction": 1.0}, lr=1e-2)
    hook = AddGain()
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[hook], default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(Clips(), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    assert hook.calls == 1 and hook.saw_optimizers == 0  # before optimizers were built
    assert isinstance(module.net, GainedNetwork)
    assert module.net.gain.item() != 1.0  # the added parameter reached the optimizer and trained
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(module.net.gain) in optimised
    # configure_model again (validate/test after fit) keeps the network and does not call the hook twice.
    module.configure_model()
    assert hook.calls == 1
