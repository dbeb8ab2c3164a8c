"""Pieces shared by the scaling tests: a tiny VDT whose training data and noise are functions of the global
step (so any number of ranks, and a resumed run, see exactly what one uninterrupted process sees) and quiet
CPU trainers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tests.lit.helpers import vdt_module
from vdiff.lit.vdt import VDTModule

TINY = dict(patch_size=8, depth=2, hidden_size=32, num_heads=2, learn_sigma=True)
GLOBAL_BATCH = 4
FRAMES, SIZE = 4, 16


class StepVDT(VDTModule):
    """VDT whose step ``s`` trains on a global batch of ``GLOBAL_BATCH`` clips, noise and timesteps drawn from
    a generator seeded with ``s``; rank ``r`` of ``w`` takes clips ``[r B/w, (r+1) B/w)`` (split again over
    its micro-batches under gradient accumulation). The loss is a mean over clips, so DDP's gradient average
    over ``w`` ranks (or Lightning's accumulation) equals one process's gradient on all ``B`` clips.
    The loader's batches are placeholders. ``losses`` records this rank's loss per step."""

    def compute_loss(self, batch):
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        g = torch.Generator().manual_seed(1000 + step)
        shape = (GLOBAL_BATCH, FRAMES, self.latent_channels, SIZE, SIZE)
        x0 = torch.randn(shape, generator=g).clamp(-1, 1)
        noise = torch.randn(shape, generator=g)
        t = torch.randint(0, self.diffusion.num_timesteps, (GLOBAL_BATCH,), generator=g)
        mask = torch.zeros(GLOBAL_BATCH, FRAMES, 1, 1, 1, dtype=torch.bool)
        mask[:, :1] = True  # the first frame given
        # With gradient accumulation each rank's share is split again over its micro-batches.
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        micro = 0
        if torch.is_grad_enabled():
            micro = getattr(self, "_micro_batches", 0) % accumulate
            self._micro_batches = getattr(self, "_micro_batches", 0) + 1
        per = GLOBAL_BATCH // (world * accumulate)
        index = rank * accumulate + micro
        part = slice(index * per, (index + 1) * per)
        device = self.device
        losses = self.diffusion.training_losses(
            self.net, x0[part].to(device), {}, mask[part].to(device), noise=noise[part].to(device), t=t[part].to(device)
        )
        if not hasattr(self, "losses"):
            self.losses = []
        if torch.is_grad_enabled():
            self.losses.append(float(losses["loss"].detach()))
        return losses


def step_module(seed: int = 0, lr: float = 1e-3, **overrides) -> StepVDT:
    """A StepVDT with its network built (same seed, same weights on every rank and in every run)."""
    torch.manual_seed(seed)
    module = vdt_module(**{**TINY, **overrides}, configure=False, mask_weights={"prediction": 1.0}, lr=lr, val_steps=2)
    module.__class__ = StepVDT
    module.configure_model()
    return module


class Placeholders(torch.utils.data.Dataset):
    """Batches the StepVDT ignores (it makes its own from the step)."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> dict:
        return {"index": torch.tensor(index)}


def placeholder_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Placeholders(), batch_size=1)


def cpu_trainer(root: str | Path, steps: int, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


def full_state(module) -> dict[str, torch.Tensor]:
    """The network's parameters as full CPU tensors (DTensor shards gathered: every rank must call it)."""
    from vdiff.callbacks.ema import is_dtensor

    out = {}
    for name, p in module.net.named_parameters():
        value = p.full_tensor() if is_dtensor(p) else p
        out[name] = value.detach().double().cpu().clone()
    return out
