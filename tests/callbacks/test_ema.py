"""EMA through a real Lightning Trainer: the update rule against a float64 hand computation and
against Lightning's own EMAWeightAveraging / WeightAveraging, one update per optimizer step under
gradient accumulation, CPU placement (background thread) equal to device placement, exact resume,
swapping without copies, and validation of the trained weights beside the averaged ones."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

from tests.callbacks.helpers import Regression, expected_ema, quiet_trainer
from vdiff.callbacks.ema import EMA
from vdiff.lit.checkpointing import EMA_KEY


def per_step(decay: float, warmup: bool, n: int) -> float:
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def fit(tmp_path, ema: EMA, steps: int, **trainer_kwargs) -> tuple[Regression, dict]:
    module = Regression()
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[ema], **trainer_kwargs)
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    return module, checkpoint


@pytest.mark.parametrize("placement", ["device", "cpu"])
@pytest.mark.parametrize(("warmup", "every"), [(False, 1), (True, 1), (True, 3)])
def test_ema_equals_the_hand_computation(tmp_path, placement, warmup, every):
    decay, steps = 0.8, 7
    module, checkpoint = fit(tmp_path, EMA(decay=decay, warmup=warmup, update_every=every, placement=placement), steps)
    shadows = checkpoint[EMA_KEY]
    assert set(shadows) == {n for n, p in module.named_parameters() if p.requires_grad}  # frozen layer never copied
    assert all(s.dtype == torch.float32 for s in shadows.values())
    # Updates at steps every, 2*every, ...; each covers `every` steps: d = product of their per-step decays.
    seen = [module.seen[0]] + [module.seen[s] for s in range(every, steps + 1, every)]
    decays = [math.prod(per_step(decay, warmup, i * every + j) for j in range(every)) for i in range(len(seen) - 1)]
    expected = expected_ema(seen, decays)
    for name, value in expected.items():
        torch.testing.assert_close(shadows[name].double(), value, rtol=1e-6, atol=1e-7)
    assert checkpoint["callbacks"]["EMA"]["num_updates"] == steps // every
    if every == 3:  # d = decay**k without warm-up: the k-step rule
        assert EMA(decay=0.9, warmup=False, update_every=3).update_decay(3) == pytest.approx(0.9**3)


def test_cpu_placement_equals_device_placement_bit_for_bit(tmp_path):
    _, device = fit(tmp_path / "d", EMA(decay=0.9, placement="device"), 9)
    _, cpu = fit(tmp_path / "c", EMA(decay=0.9, placement="cpu"), 9)
    assert all(torch.equal(device[EMA_KEY][n], cpu[EMA_KEY][n]) for n in device[EMA_KEY])


class SameRule(WeightAveraging):
    """Lightning's WeightAveraging with vdiff's rule (warm-up, d = product of k per-step decays)."""

    def __init__(self, decay: float, every: int) -> None:
        def avg_fn(average, current, num_averaged):
            n0 = (int(num_averaged) - 1) * every  # Lightning counts its first (copying) update
            d = math.prod(per_step(decay, True, n0 + j) for j in range(every))
            return d * average + (1 - d) * current

        super().__init__(avg_fn=avg_fn, use_buffers=False)
        self.every = every

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        return step_idx is not None and step_idx % self.every == 0


@pytest.mark.parametrize("rule", ["EMAWeightAveraging", "WeightAveraging(same rule, k=3)"])
def test_ema_equals_lightnings_weight_averaging(tmp_path, rule):
    if rule == "EMAWeightAveraging":
        ours, theirs = EMA(decay=0.9, warmup=False, start_step=1), EMAWeightAveraging(decay=0.9)
    else:
        ours, theirs = EMA(decay=0.9, warmup=True, start_step=1, update_every=3), SameRule(0.9, 3)
    module = Regression()
    quiet_trainer(tmp_path, max_steps=10, callbacks=[ours, theirs]).fit(module)
    averaged = dict(theirs._average_model.module.named_parameters())
    assert set(ours.shadow) <= set(averaged)
    for name, shadow in ours.shadow.items():
        torch.testing.assert_close(shadow, averaged[name].detach(), rtol=1e-6, atol=1e-7)
    # Lightning copies its average into the model at the end of training: the same numbers again.
    torch.testing.assert_close(ours.shadow["layer.0.weight"], module.layer[0].weight.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("placement", ["device", "cpu"])
def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path, placement):
    ema = EMA(decay=0.7, warmup=False, placement=placement)
    module, checkpoint = fit(tmp_path, ema, 4, accumulate_grad_batches=2)
    assert len(module.seen) == 5  # 8 batches, 4 optimizer steps
    assert ema.num_updates == ema.steps == 4
    expected = expected_ema(module.seen, [0.7] * 4)
    for name, value in expected.items():
        torch.testing.assert_close(checkpoint[EMA_KEY][name].double(), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("placement", ["device", "cpu"])
def test_resume_is_exact(tmp_path, placement):
    def ema():
        return EMA(decay=0.9, warmup=True, start_step=2, update_every=2, placement=placement)

    # 20 samples / batch 4 = 5 batches per epoch: the 2-step update schedule straddles the epoch boundary.
    straight = Regression()
    quiet_trainer(tmp_path / "straight", max_epochs=2, callbacks=[first := ema()]).fit(straight)

    part = Regression()
    trainer = quiet_trainer(tmp_path / "part", max_epochs=1, callbacks=[ema()])
    trainer.fit(part)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Regression()
    quiet_trainer(tmp_path / "resumed", max_epochs=2, callbacks=[second := ema()]).fit(
        resumed, ckpt_path=tmp_path / "epoch1.ckpt"
    )

    assert (
        (second.steps, second.num_updates, second.steps_averaged)
        == (first.steps, first.num_updates, first.steps_averaged)
        == (10, 5, 8)
    )
    for name in first.shadow:
        assert torch.equal(first.shadow[name], second.shadow[name]), name
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_swap_exchanges_tensors_without_copies_and_restores_exactly(tmp_path):
    ema = EMA(decay=0.9)
    module, _ = fit(tmp_path, ema, 3)
    param = module.layer[0].weight
    trained = param.detach().clone()
    shadow = ema.shadow["layer.0.weight"]
    shadow_ptr, param_ptr = shadow.data_ptr(), param.data_ptr()
    ema.swap_in(module)
    assert param.data_ptr() == shadow_ptr and ema.shadow["layer.0.weight"].data_ptr() == param_ptr  # exchanged
    assert torch.equal(param.detach(), shadow)
    ema.swap_out(module)
    assert param.data_ptr() == param_ptr and torch.equal(param.detach(), trained)
    assert ema.shadow["layer.0.weight"].data_ptr() == shadow_ptr


def test_bf16_weights_swap_through_a_host_buffer_and_keep_fp32_shadows():
    module = Regression().to(torch.bfloat16)
    ema = EMA(decay=0.5, warmup=False)
    ema._materialize(None, module)
    ema.shadow = {n: s + 1e-3 for n, s in ema.shadow.items()}  # an fp32 average bf16 cannot hold
    before = {n: s.clone() for n, s in ema.shadow.items()}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    ema.swap_in(module)
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), before[n].to(torch.bfloat16))
    ema.swap_out(module)
    assert all(torch.equal(p.detach(), trained[n]) for n, p in module.named_parameters() if p.requires_grad)
    assert all(torch.equal(ema.shadow[n], before[n]) for n in before)


def test_validation_uses_the_average_and_validate_raw_logs_the_trained_weights(tmp_path):
    module = Regression(val=True, n=24)  # 6 batches: validation after steps 3 and 6
    ema = EMA(decay=0.99, warmup=False, validate_raw=True)
    trainer = quiet_trainer(tmp_path, max_steps=6, val_check_interval=3, callbacks=[ema])
    trainer.fit(module)
    # Validation ran twice per check (averaged, then trained weights); the logged values are the last check's.
    averaged, raw = module.val_w[-2], module.val_w[-1]
    assert raw == pytest.approx(float(module.layer[0].weight.detach().double().sum()))  # the trained weights, restored
    assert averaged == pytest.approx(float(ema.shadow["layer.0.weight"].double().sum()))
    assert averaged != pytest.approx(raw)
    metrics = trainer.callback_metrics
    assert float(metrics["val/w"]) == pytest.approx(averaged, rel=1e-6)
    assert float(metrics["val_raw/w"]) == pytest.approx(raw, rel=1e-6)
