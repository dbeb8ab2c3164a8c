"""Small deterministic LightningModules and a two-process launcher for the callback tests."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WORLD_SIZE = 2


def regression_data(n: int = 20, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.stack([x[:, 0] * 2 - x[:, 1], x[:, 2] * x[:, 3]], dim=1)
    return TensorDataset(x, y)


class Regression(L.LightningModule):
    """A two-layer MLP behind a frozen linear layer; the loss depends on the data only (no noise), so
    runs are reproducible and data-parallel runs match a single process with the same global batch.

    ``seen`` holds the trained parameters (float64) after every optimizer step, ``seen[0]`` those at the
    start of training; ``val_w`` what validation saw."""

    def __init__(self, lr: float = 0.1, batch_size: int = 4, n: int = 20, rank_split: bool = False, val: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.layer = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        self.lr, self.batch_size, self.n, self.rank_split, self.val = lr, batch_size, n, rank_split, val
        self.seen: list[dict[str, torch.Tensor]] = []
        self.val_w: list[float] = []
        self._step_before = 0

    def forward(self, x):
        return self.layer(self.frozen(x))

    def tracked(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().double().clone() for n, p in self.named_parameters() if p.requires_grad}

    def on_train_start(self) -> None:
        if not self.seen:
            self.seen.append(self.tracked())

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_before = self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer.global_step > self._step_before:
            self.seen.append(self.tracked())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self(x), y), batch_size=len(x))  # a forward: FSDP unshards the root
        w = self.layer[0].weight.detach().double().sum()
        self.val_w.append(float(w))
        self.log("val/w", w, batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        data = regression_data(self.n)
        batch = self.batch_size
        if self.rank_split and self.trainer.world_size > 1:  # each rank a contiguous half of every global batch
            per_rank = batch // self.trainer.world_size
            rank = self.trainer.global_rank
            index = [
                i
                for start in range(0, self.n, batch)
                for i in range(start + rank * per_rank, start + (rank + 1) * per_rank)
            ]
            data = torch.utils.data.Subset(data, index)
            batch = per_rank
        return DataLoader(data, batch_size=batch, shuffle=False)

    def val_dataloader(self):
        return DataLoader(regression_data(4, seed=2), batch_size=4) if self.val else []


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def expected_ema(seen: list[dict[str, torch.Tensor]], decays: list[float]) -> dict[str, torch.Tensor]:
    """float64 reference: shadow = seen[0], then shadow = d * shadow + (1 - d) * seen[i] per update."""
    shadow = {n: t.clone() for n, t in seen[0].items()}
    for weights, d in zip(seen[1:], decays):
        shadow = {n: d * shadow[n] + (1 - d) * weights[n] for n in shadow}
    return shadow


# ---------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, fn, port: int, out: str, args: tuple) -> None:
    # The environment of an externally launched rank: Lightning's LightningEnvironment then neither
    # launches processes nor picks a port; each rank builds its own Trainer(devices=2).
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(WORLD_SIZE),
            "RANK": str(rank),
        }
    )
    result = fn(rank, *args)
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_two_ranks(tmp_path: Path, fn, *args, timeout_s: float = 300) -> list:
    """Run ``fn(rank, *args)`` in two forked processes (gloo); returns what each returned."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    context = mp.start_processes(
        _rank_entry, args=(fn, free_port(), str(out), args), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"two-rank run did not finish in {timeout_s} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
