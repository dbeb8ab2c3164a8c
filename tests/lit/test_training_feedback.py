"""What `vdiff fit` shows while it trains: a progress bar over steps with the time left (not `Epoch 19/-2`), and a
time budget (`trainer.max_time`) that says in one line when it ends training before `max_steps`."""

from __future__ import annotations

import re
import time
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.demos.boring_classes import BoringModel

from vdiff.lit.cli import build_lightning_cli
from vdiff.lit.progress import StepProgressBar
from vdiff.lit.time_budget import TimeBudget

REPO = Path(__file__).resolve().parents[2]


class _SlowBoring(BoringModel):
    """64 batches an epoch (BoringModel's data); each step takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    def training_step(self, batch, batch_idx):
        if self.delay:
            time.sleep(self.delay)
        return super().training_step(batch, batch_idx)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                     limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks, **kwargs)


def test_bar_counts_steps_to_max_steps_across_epochs(tmp_path, capsys):
    bar = StepProgressBar()
    trainer = _trainer(tmp_path, [bar], max_steps=150, limit_train_batches=40)  # 4 epochs of 40 batches
    trainer.fit(_SlowBoring())
    out = capsys.readouterr().out
    assert trainer.global_step == 150
    assert bar.train_progress_bar.total == 150 and bar.train_progress_bar.n == 150
    final = re.split(r"[\r\n]", out.strip())[-1]
    assert final.startswith("Training: 100%") and "150/150" in final, final
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", final) and "step/s" in final and "epoch=3" in final, final
    assert "Epoch" not in out and "/-" not in out  # no `Epoch 19/-2`
    # the bar went up through the epochs in one line, never back to 0 at an epoch's start
    counts = [int(n) for n in re.findall(r"\|\s*(\d+)/150", out)]
    assert counts == sorted(counts) and max(counts) == 150 and 60 in counts, counts


def test_bar_of_a_resumed_run_starts_at_its_step(tmp_path, capsys):
    trainer = _trainer(tmp_path, [StepProgressBar()], max_steps=30, limit_train_batches=10)
    trainer.fit(_SlowBoring())
    checkpoint = tmp_path / "at30.ckpt"
    trainer.save_checkpoint(checkpoint)
    capsys.readouterr()
    bar = StepProgressBar()
    _trainer(tmp_path, [bar], max_steps=40, limit_train_batches=10).fit(_SlowBoring(), ckpt_path=checkpoint)
    out = capsys.readouterr().out
    assert bar.train_progress_bar.initial == 30 and bar.train_progress_bar.n == 40
    counts = [int(n) for n in re.findall(r"\|\s*(\d+)/40", out)]
    assert counts[0] == 30 and counts[-1] == 40 and counts == sorted(counts), counts  # from step 30, not from 0


def test_an_epoch_limited_run_names_its_epochs(tmp_path, capsys):
    _trainer(tmp_path, [StepProgressBar()], max_epochs=2, limit_train_batches=5).fit(_SlowBoring())
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "5/5" in out


def test_time_budget_says_in_one_line_that_it_ended_training_early(tmp_path, capsys):
    budget = TimeBudget({"seconds": 1})
    trainer = _trainer(tmp_path, [budget], max_steps=200, enable_progress_bar=False)
    trainer.fit(_SlowBoring(delay=0.1))
    err = capsys.readouterr().err
    assert 0 < trainer.global_step < 200 and budget.stopped_at == trainer.global_step
    lines = [line for line in err.splitlines() if "time budget" in line]
    assert lines == [
        f"the time budget trainer.max_time=0:00:01 ended training at step {trainer.global_step} of max_steps 200; "
        "--trainer.max_time null trains them all"
    ], err


def test_time_budget_is_quiet_when_the_steps_end_first(tmp_path, capsys):
    budget = TimeBudget({"minutes": 5})
    trainer = _trainer(tmp_path, [budget], max_steps=3, enable_progress_bar=False)
    trainer.fit(_SlowBoring())
    assert trainer.global_step == 3 and budget.stopped_at is None
    assert "time budget" not in capsys.readouterr().err


QUICKSTART_CLI = ["-c", str(REPO / "recipes" / "quickstart.yaml")]


@pytest.mark.parametrize("max_time", [None, "00:00:01:00"])
def test_cli_installs_the_step_bar_and_turns_max_time_into_a_time_budget(max_time, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = [] if max_time is None else ["--trainer.max_time", max_time]
    cli = build_lightning_cli([*QUICKSTART_CLI, "--trainer.max_steps", "20", *extra], run=False)
    trainer = cli.trainer
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
    if max_time is None:
        assert timers == []
    else:
        assert len(timers) == 1 and isinstance(timers[0], TimeBudget) and timers[0]._duration == 60
    assert trainer.max_steps == 20


def test_cli_keeps_a_recipes_own_progress_bar_or_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_lightning_cli([*QUICKSTART_CLI, "--trainer.enable_progress_bar", "false"], run=False)
    assert cli.trainer.progress_bar_callback is None
    own = '[{"class_path": "lightning.pytorch.callbacks.RichProgressBar"}]'
    cli = build_lightning_cli([*QUICKSTART_CLI, "--trainer.callbacks", own], run=False)
    assert type(cli.trainer.progress_bar_callback).__name__ == "RichProgressBar"


# ---------------------------------------------------------------- Lightning's warnings that vdiff triggers on purpose

EVAL_MODE = "module(s) in eval mode at the start of training"


def _fit_tiny_vdt(tmp_path, module) -> list[str]:
    """Fit ``module`` one step on one batch; the warnings it raised."""
    import warnings

    from torch.utils.data import DataLoader

    from tests.lit.test_vdt_module import moving_square_batch

    filters = list(warnings.filters)
    trainer = _trainer(tmp_path, [], max_steps=1, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=DataLoader([moving_square_batch()], batch_size=None))
    assert warnings.filters == filters  # nothing vdiff set outlives the check it was for
    return [str(w.message) for w in caught]


def test_the_frozen_autoencoder_in_eval_mode_is_not_a_warning(tmp_path):
    from tests.lit.test_vdt_module import tiny_module

    assert not [m for m in _fit_tiny_vdt(tmp_path, tiny_module()) if EVAL_MODE in m]


def test_a_network_left_in_eval_mode_is_still_a_warning(tmp_path):
    from tests.lit.test_vdt_module import tiny_module

    module = tiny_module()
    module.net.blocks[0].eval()
    expected = 1 + len(list(module.net.blocks[0].modules()))  # the autoencoder and the block's modules
    warned = [m for m in _fit_tiny_vdt(tmp_path, module) if EVAL_MODE in m]
    assert len(warned) == 1 and warned[0].startswith(f"Found {expected} module(s)"), warned


def test_a_vista_module_keeps_its_action_encoder_out_of_the_hyperparameters_without_a_warning(recwarn):
    from tests.lit.test_vista_module import tiny_vista

    module = tiny_vista()
    assert not [w for w in recwarn if "action_encoder" in str(w.message)]
    assert "action_encoder" not in module.hparams and "image_encoder" not in module.hparams


def test_the_cli_does_not_advertise_lightnings_cloud_logger(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        build_lightning_cli([*QUICKSTART_CLI], run=False)
    assert not [r for r in caplog.records if "litlogger" in r.getMessage()]
    assert any("GPU available" in r.getMessage() for r in caplog.records)  # Lightning's other lines still show
    assert not any(isinstance(f, logging.Filter) and type(f).__name__ == "_WithoutLightningTips"
                   for f in logging.getLogger("lightning.pytorch.utilities.rank_zero").filters)
