"""Data parallelism on CPU: 2 DDP processes (gloo) with half the batch each train exactly like 1 process with
the whole batch (same data, same initial weights, same noise), and so does 1 process accumulating 2
micro-batches of half the batch."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.callbacks.helpers import run_two_ranks
from tests.scale.helpers import cpu_trainer, full_state, placeholder_loader, step_module

STEPS = 3


def single_process(root: Path, **trainer_kwargs) -> tuple[dict, list[float]]:
    module = step_module()
    cpu_trainer(root, STEPS, **trainer_kwargs).fit(module, train_dataloaders=placeholder_loader())
    return full_state(module), module.losses


def _ddp_rank(rank: int, root: str) -> dict:
    module = step_module()
    trainer = cpu_trainer(Path(root) / "ddp", STEPS, devices=2, strategy="ddp")
    trainer.fit(module, train_dataloaders=placeholder_loader())
    return {"weights": full_state(module), "losses": module.losses, "world": trainer.world_size}


def test_two_ddp_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    ranks = run_two_ranks(tmp_path, _ddp_rank, str(tmp_path))
    weights, losses = single_process(tmp_path / "single")
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # The one-process loss of a step is the mean of the two ranks' losses (each half of the same clips).
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    start = step_module()
    for result in ranks:
        for name, value in weights.items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-5, atol=2e-6, msg=name)
    assert any(not torch.equal(start.net.get_parameter(n).double(), v) for n, v in weights.items())  # it trained


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    weights, losses = single_process(tmp_path / "whole")
    accumulated, halves = single_process(tmp_path / "accumulated", accumulate_grad_batches=2)
    assert len(halves) == 2 * len(losses)
    mean = [(a + b) / 2 for a, b in zip(halves[::2], halves[1::2])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for name, value in weights.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=2e-6, msg=name)
