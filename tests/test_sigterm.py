"""SIGTERM (what schedulers send before a time limit or a preemption): the run finishes the current step,
writes ``last.ckpt``, says so in one line, and exits with status 143; resuming from that checkpoint ends
where an uninterrupted run ends. In-process on a small Lightning model (fast), and end to end through
``vdiff fit`` in a subprocess (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from tests.test_resume import MAX_STEPS, _assert_bitwise_equal, _fit_args
from vdiff.callbacks.ema import EMA, EMA_KEY
from vdiff.lit.checkpointing import SIGTERM_EXIT_STATUS, AtomicCheckpointIO, AtomicModelCheckpoint, RNGState

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process at the end of training step ``step`` (or, with ``validation``, during
    the first batch of the validation that follows it), as a scheduler would."""

    def __init__(self, step: int, validation: bool = False, process_group: bool = False) -> None:
        self.step = step
        self.validation = validation
        self.process_group = process_group  # every process of the group, data loader workers too (as SLURM does)
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            if self.process_group:  # from another process, as slurmstepd sends it (not the workers' parent)
                subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"], check=False)
            else:
                os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.validation and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.validation and not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0:
            self._send()


class Model(BoringModel):
    """BoringModel whose training draws random numbers (noise on a constant input: a resumed epoch restarts
    its unstateful loader, constant batches keep the data identical), so an exact resume needs the random
    states; its validation has several batches."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch + torch.randn_like(batch), batch_idx)

    def train_dataloader(self):
        return DataLoader([torch.full((32,), 0.5)] * 64, batch_size=2)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.step(batch), batch_size=batch.shape[0])


def fit(folder: Path, *callbacks: L.Callback, ckpt_path: str | None = None, max_steps: int = STEPS) -> None:
    torch.manual_seed(0)
    checkpoint = AtomicModelCheckpoint(dirpath=str(folder), save_last=True, save_top_k=0, every_n_train_steps=3)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(folder), val_check_interval=4, check_val_every_n_epoch=None,
        limit_val_batches=3, callbacks=[EMA(decay=0.9, warmup=False), RNGState(), checkpoint, *callbacks],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(Model(), ckpt_path=ckpt_path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", EMA_KEY):
        assert a[key].keys() == b[key].keys()
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key}: {different}"


@pytest.mark.parametrize("during_validation", [False, True], ids=["after-a-step", "during-validation"])
def test_sigterm_writes_last_ckpt_exits_143_and_resumes_to_the_uninterrupted_result(
    tmp_path, capsys, during_validation
):
    fit(tmp_path / "full")
    reference = load(tmp_path / "full" / "last.ckpt")
    assert reference["global_step"] == STEPS

    # step 5 lies between the periodic checkpoints (3, 6, 9); step 8 is followed by a validation (every 4 steps)
    step = 8 if during_validation else 5
    folder = tmp_path / "stopped"
    with pytest.raises(SystemExit) as stopped:
        fit(folder, SigtermAt(step, validation=during_validation))
    assert stopped.value.code == SIGTERM_EXIT_STATUS == 143
    last = folder / "last.ckpt"
    line = f"vdiff: stopped by SIGTERM at step {step} (epoch 0): saved {last}; continue with --ckpt_path last (exit status 143)"
    assert line in capsys.readouterr().err.splitlines()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # Lightning put the default handler back

    # last.ckpt holds the step reached, with the trained weights (not the averaged ones validation swaps in)
    fit(tmp_path / "until_step", max_steps=step)
    assert_same_state(load(last), load(tmp_path / "until_step" / "last.ckpt"))

    fit(folder, ckpt_path=str(last))
    assert_same_state(load(last), reference)


def test_sigterm_during_validate_exits_143_and_writes_nothing(tmp_path, capsys):
    checkpoint = AtomicModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=3, callbacks=[checkpoint, SigtermAt(0, validation=True)])
    with pytest.raises(SystemExit) as stopped:
        trainer.validate(Model())
    assert stopped.value.code == 143
    assert "vdiff: stopped by SIGTERM at step 0 (epoch 0): not training, no checkpoint written (exit status 143)" in (
        capsys.readouterr().err.splitlines()
    )
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------------------------
# end to end: vdiff fit
# ------------------------------------------------------------------------------------------------


def _vdiff(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """``vdiff ARGS`` in its own session (process group), so that a SIGTERM to the group reaches only it."""
    env = {**os.environ, "VDIFF_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    vdiff = Path(sys.executable).with_name("vdiff")
    return subprocess.run([str(vdiff), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          start_new_session=True)


def _with_callback(args: list[str], callback: dict) -> list[str]:
    i = args.index("--trainer.callbacks") + 1
    return [*args[:i], json.dumps([*json.loads(args[i]), callback]), *args[i + 1 :]]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_vdiff_fit_stopped_by_sigterm_exits_143_and_resumes_to_the_uninterrupted_result(tmp_path, num_workers):
    """SIGTERM to the whole process group (data loader workers too, as SLURM sends it) at step 5, between
    the periodic checkpoints (3, 6, 9): exit status 143, last.ckpt at step 5, and `--ckpt_path last` ends
    bitwise where the uninterrupted run ends."""
    cache = tmp_path / "cache"
    full = _vdiff(_fit_args(tmp_path / "full", num_workers), tmp_path, cache)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = load(tmp_path / "full" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")

    runs = tmp_path / "runs"
    sigterm = {"class_path": "tests.test_sigterm.SigtermAt", "init_args": {"step": 5, "process_group": True}}
    stopped = _vdiff(_with_callback(_fit_args(runs, num_workers), sigterm), tmp_path, cache)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] == 5
    lines = [line for line in stopped.stderr.splitlines() if "SIGTERM" in line and line.startswith("vdiff")]
    assert len(lines) == 1 and lines[0].startswith("vdiff: stopped by SIGTERM at step 5 (epoch "), lines
    assert lines[0].endswith(f"saved {last}; continue with --ckpt_path last (exit status 143)"), lines

    resumed = _vdiff([*_fit_args(runs, num_workers), "--ckpt_path", "last"], tmp_path, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"vdiff fit: resuming from {last} (epoch " in resumed.stderr
    assert ", step 5); writing to" in resumed.stderr
    assert reference["global_step"] == MAX_STEPS
    _assert_bitwise_equal(load(last), reference)
