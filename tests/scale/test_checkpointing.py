"""Activation checkpointing per block: the same loss and gradients as without it, and a lower peak memory
(the process's resident-set high-water mark over one training step, measured in a fresh process whose
allocator returns freed tensors to the system at once); the Scaling switch reaches the network through
configure_model; a network without its own switch gets torch's checkpoint wrapper on its block classes, with
unchanged state-dict keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from tests.scale.helpers import placeholder_loader, step_module
from vdiff.lit.scaling import Scaling, enable_activation_checkpointing

REPO = Path(__file__).resolve().parents[2]


def measured_network(checkpointing: bool):
    from vdiff.models.vdt import VDT, VDTConfig

    torch.manual_seed(0)
    net = VDT(VDTConfig(patch_size=2, hidden_size=64, depth=6, num_heads=2, in_channels=4, learn_sigma=False))
    with torch.no_grad():  # adaLN-Zero and the output layer start at zero: give every branch a say
        for name, p in net.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    if checkpointing:
        assert enable_activation_checkpointing(net) == "network"
    return net


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure() -> dict:
    """One training step with and without checkpointing: loss, gradients, peak RSS above the level before it."""
    torch.set_num_threads(1)
    x = torch.randn(2, 8, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10.0, 600.0])
    out = {}
    for checkpointing in (False, True):
        net = measured_network(checkpointing)
        for _ in range(2):  # the second step is measured (the first sizes caches and the allocator)
            net.zero_grad(set_to_none=True)
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            before = _rss()
            loss = net(x, t).square().mean()
            loss.backward()
            peak = _vm_hwm() - before
        grads = {n: p.grad.norm().item() for n, p in net.named_parameters()}
        out[str(checkpointing)] = {"loss": loss.item(), "peak": peak, "grads": grads}
    return out


def test_checkpointing_keeps_the_loss_and_lowers_peak_memory():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    code = "import json; from tests.scale.test_checkpointing import measure; print(json.dumps(measure()))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    off, on = runs["False"], runs["True"]
    assert on["loss"] == off["loss"]  # the same forward
    for name, value in off["grads"].items():
        assert abs(on["grads"][name] - value) <= 1e-5 * max(1.0, abs(value)), name
    # Without checkpointing the step stores every block's activations (about 35 MiB a block here); with it, one
    # block's at a time plus the block inputs.
    assert off["peak"] > 100 * 2**20, off["peak"]
    assert on["peak"] < 0.6 * off["peak"], (on["peak"], off["peak"])


def test_the_scaling_switch_reaches_the_network(tmp_path):
    module = step_module()
    assert not module.net.gradient_checkpointing
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Scaling(activation_checkpointing=True)], limit_val_batches=0)  # fmt: skip
    trainer.fit(module, train_dataloaders=placeholder_loader())
    assert module.net.gradient_checkpointing and module.net.config.gradient_checkpointing


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Plain(nn.Module):
    """A network that declares its blocks but has no checkpointing switch of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 1)

    @staticmethod
    def block_classes():
        return (Block,)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_networks_without_a_switch_get_the_checkpoint_wrapper():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    torch.manual_seed(0)
    net, x = Plain(), torch.randn(4, 8)
    keys = list(net.state_dict())
    net(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    assert enable_activation_checkpointing(net) == "checkpoint_wrapper"
    assert enable_activation_checkpointing(net) == "checkpoint_wrapper"  # idempotent: not wrapped twice
    assert sum(isinstance(m, CheckpointWrapper) for m in net.modules()) == 2
    assert list(net.state_dict()) == keys
    net(x).sum().backward()
    for name, p in net.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, grads[clean])
