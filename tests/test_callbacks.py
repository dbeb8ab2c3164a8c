"""EMA (update rule, swapping, checkpoint round trip) driven hook by hook, and SampleVideos' frame markers.

Trainer-driven EMA tests (Lightning parity, accumulation, resume, placement, sharding) are in tests/callbacks/.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vdiff.callbacks.ema import EMA
from vdiff.lit.checkpointing import load_ema_weights
from vdiff.lit.frame_marks import GENERATED_COLOUR, GIVEN_COLOUR, mark_frames


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    def ema_named_parameters(self):
        return [(f"layer.{n}", p) for n, p in self.layer.named_parameters()]


def step(ema: EMA, trainer, module, batch_idx: int, optimizer_step: bool = True) -> None:
    """One training batch as Lightning calls the hooks, the "optimizer" adding 1 to the weight;
    ``optimizer_step`` False = an accumulation batch."""
    ema.on_train_batch_start(trainer, module, None, batch_idx)
    if optimizer_step:
        ema.on_before_optimizer_step(trainer, module, None)
        with torch.no_grad():
            module.layer.weight.add_(1.0)
        trainer.global_step += 1
    ema.on_train_batch_end(trainer, module, None, None, batch_idx)


def test_ema_follows_the_update_rule_swaps_and_round_trips():
    module, ema = Tiny(), EMA(decay=0.9, warmup=False)
    trainer = SimpleNamespace(global_step=0, sanity_checking=False, is_global_zero=True)
    ema.on_fit_start(trainer, module)
    start = module.layer.weight.detach().clone()
    expected = start.clone()
    for batch_idx in range(3):
        step(ema, trainer, module, batch_idx)
        expected = 0.9 * expected + 0.1 * module.layer.weight.detach()
    assert torch.allclose(ema.shadow["layer.weight"], expected, atol=1e-6)
    assert set(ema.shadow) == {"layer.weight", "layer.bias"}  # the frozen layer is not tracked
    step(ema, trainer, module, 3, optimizer_step=False)  # no optimizer step in this batch (accumulation): no update
    assert ema.num_updates == 3 and torch.allclose(ema.shadow["layer.weight"], expected, atol=1e-6)

    trained = module.layer.weight.detach().clone()
    ema.swap_in(module)
    assert torch.allclose(module.layer.weight, expected, atol=1e-6)
    ema.swap_out(module)
    assert torch.equal(module.layer.weight, trained)

    checkpoint: dict = {}
    ema.on_save_checkpoint(trainer, module, checkpoint)
    assert set(checkpoint["ema_state_dict"]) == {"layer.weight", "layer.bias"}
    fresh = Tiny()
    assert load_ema_weights(fresh, checkpoint)
    assert torch.allclose(fresh.layer.weight, expected, atol=1e-6)

    # Shadows are saved once, by name; the callback state holds only counters.
    assert not any(isinstance(v, (torch.Tensor, list, dict)) for v in ema.state_dict().values())
    resumed = EMA(decay=0.9, warmup=False)
    resumed.load_state_dict(ema.state_dict())
    resumed.on_load_checkpoint(trainer, Tiny(), checkpoint)
    resumed.on_fit_start(trainer, Tiny())
    resumed.on_train_batch_start(trainer, Tiny(), None, 0)
    assert resumed.num_updates == 3 and torch.allclose(resumed.shadow["layer.weight"], expected, atol=1e-6)


def test_ema_warmup_decay_grows_towards_the_target():
    ema = EMA(decay=0.999, warmup=True)
    values = [ema.current_decay(n) for n in (0, 10, 1000, 100000)]
    assert values[0] == 0.1 and values == sorted(values) and values[-1] == 0.999
    # An update covering k steps uses the product of their per-step decays.
    assert ema.update_decay(3) == ema.current_decay(0) * ema.current_decay(1) * ema.current_decay(2)


def test_mark_frames_paints_given_green_and_generated_red():
    video = torch.full((1, 2, 3, 6, 6), 0.5)
    marked = mark_frames(video, torch.tensor([[True, False]]))
    assert marked[0, 0, :, 0, 0].tolist() == list(GIVEN_COLOUR)
    assert marked[0, 1, :, -1, 3].tolist() == list(GENERATED_COLOUR)
    assert torch.equal(marked[:, :, :, 1:-1, 1:-1], video[:, :, :, 1:-1, 1:-1])
