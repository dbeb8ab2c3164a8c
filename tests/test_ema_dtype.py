"""EMA of a bf16 model keeps float32 shadows: small updates that bf16 would round away accumulate.

Driven through a real ``lightning.Trainer`` fit with ``precision="bf16-true"`` (the module's weights
are bf16) and read back only through behaviour: the ``ema_state_dict`` entry of a saved checkpoint.
Each optimizer step sets the weights to ``base + k * ulp`` (``k`` in 1..3, ``ulp`` the bf16 spacing
at ``base``), so every EMA increment ``(1 - decay) * (w - shadow)`` is about 1e-3 ulp: lost if the
shadow is bf16, kept if it is float32. A float64 hand computation is the reference.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from vdiff.callbacks.ema import EMA

DECAY = 0.999
STEPS = 300
BASE = torch.tensor([1.0, -3.0, 0.0625, 40.0, 0.7])  # bf16-representable but 0.7 (rounded on conversion)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at x (8 significant bits)."""
    return 2.0 ** (torch.floor(torch.log2(x.abs())) - 7)


class BF16Weights(L.LightningModule):
    """One weight vector set to a prescribed bf16 value at every step (the optimizer changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(BASE.clone())
        self.seen: list[torch.Tensor] = []  # the weights after every optimizer step, float64

    def training_step(self, batch, batch_idx):
        assert self.w.dtype == torch.bfloat16  # bf16-true converted the module
        with torch.no_grad():
            base = BASE.to(torch.bfloat16).double()
            k = 1 + batch_idx % 3
            self.w.copy_((base + k * bf16_ulp(base)).to(torch.bfloat16))
        return (self.w.float() * 0.0).sum()  # zero gradient: the step leaves w as set

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.seen.append(self.w.detach().double().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.zeros(STEPS, 1), batch_size=1)


def test_bf16_model_gets_float32_shadows_that_keep_sub_ulp_updates(tmp_path):
    module = BF16Weights()
    ema = EMA(decay=DECAY, warmup=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-true", max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ema], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module)
    assert module.w.dtype == torch.bfloat16 and len(module.seen) == STEPS

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    shadows = checkpoint["ema_state_dict"]
    assert set(shadows) == {"w"}
    shadow = shadows["w"]
    assert shadow.dtype == torch.float32, f"EMA shadow saved as {shadow.dtype}"
    assert checkpoint["state_dict"]["w"].dtype == torch.bfloat16  # the trained weights stay bf16

    # Reference: the shadow starts at the weights of fit start, then one update per optimizer step.
    expected = BASE.to(torch.bfloat16).double()
    for w in module.seen:
        expected = DECAY * expected + (1.0 - DECAY) * w
    start = BASE.to(torch.bfloat16).double()
    moved = expected - start  # ~0.5 ulp: what a bf16 shadow loses (it never leaves `start`)
    assert torch.all(moved.abs() > 0.3 * bf16_ulp(start))
    torch.testing.assert_close(shadow.double(), expected, rtol=2e-6, atol=0.0)
    assert torch.all((shadow.double() - start).abs() > 0.9 * moved.abs())
