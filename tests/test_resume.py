"""Crash and resume: `vdiff fit --ckpt_path last` after a SIGKILL continues the same run, in the same
version folder, to bitwise the weights, EMA shadows and optimizer state of an uninterrupted run;
checkpoint writes are atomic; nothing to resume fails before training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vdiff.lit.checkpointing import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    ResumeError,
    capture_rng_states,
    find_last_checkpoint,
    last_checkpoints_in,
    restore_rng_states,
    resume_plan,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MAX_STEPS = 12
EVERY = 3  # periodic checkpoints at steps 3, 6, 9 (validation runs right after each of them)


class SigkillAfterCheckpoints(L.Callback):
    """SIGKILLs its own process ``extra_steps`` training steps after the ``checkpoints``-th checkpoint,
    so the steps trained after that checkpoint are lost, as in a real crash."""

    def __init__(self, checkpoints: int = 3, extra_steps: int = 1) -> None:
        self.checkpoints = checkpoints
        self.extra_steps = extra_steps
        self.saved = 0
        self.kill_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved += 1
        if self.saved == self.checkpoints:
            self.kill_step = trainer.global_step + self.extra_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.kill_step is not None and trainer.global_step >= self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _fit_args(runs: Path, num_workers: int, kill: bool = False) -> list[str]:
    """The quickstart recipe, shrunk on the command line (trainer and data keys only)."""
    callbacks = [{"class_path": "vdiff.callbacks.EMA", "init_args": {"decay": 0.99, "warmup": False}}]
    if kill:
        callbacks.append({"class_path": "tests.test_resume.SigkillAfterCheckpoints", "init_args": {"checkpoints": 3}})
    return [
        "fit", "-c", str(QUICKSTART),
        "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.max_steps", str(MAX_STEPS),
        "--trainer.max_time", "null",
        "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", str(EVERY),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.deterministic", "true",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--checkpoint.every_n_train_steps", str(EVERY),
        "--data.init_args.num_videos", "8",
        "--data.init_args.val_videos", "4",
        "--data.init_args.video_frames", "12",
        "--data.init_args.video_size", "32",
        "--data.init_args.size", "32",
        "--data.init_args.val_batch_size", "4",
        "--data.init_args.shuffle_buffer", "4",
        "--data.init_args.synth_workers", "1",
        "--data.init_args.num_workers", str(num_workers),
    ]


def _vdiff(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VDIFF_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    vdiff = Path(sys.executable).with_name("vdiff")
    return subprocess.run([str(vdiff), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ema(ckpt: dict) -> dict[str, torch.Tensor]:
    if "ema_state_dict" in ckpt:
        return ckpt["ema_state_dict"]
    entry = next(v for k, v in ckpt["callbacks"].items() if "EMA" in k)  # the callback's own state
    shadow = entry["shadow"]
    return dict(enumerate(shadow)) if isinstance(shadow, list) else shadow


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _assert_bitwise_equal(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    for name, a, b in (
        ("weights", resumed["state_dict"], reference["state_dict"]),
        ("EMA shadows", _ema(resumed), _ema(reference)),
    ):
        assert a.keys() == b.keys(), name
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name} differ (max abs {_max_abs_diff(a, b):.3g}): {different[:5]}"
    opt_a, opt_b = resumed["optimizer_states"], reference["optimizer_states"]
    assert len(opt_a) == len(opt_b)
    for sa, sb in zip(opt_a, opt_b):
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for i in sa["state"]:
            for key, value in sa["state"][i].items():
                assert torch.equal(value, sb["state"][i][key]), f"optimizer state {i}/{key} differs"
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]


def _crash_and_resume(tmp_path: Path, num_workers: int, resume_with: str) -> tuple[dict, dict, Path, str]:
    """Uninterrupted run, killed run, resumed run; returns (resumed, reference) checkpoints, the
    killed run's folder and the resume's stderr."""
    cache = tmp_path / "cache"
    full = _vdiff(_fit_args(tmp_path / "full", num_workers), tmp_path, cache)
    assert full.returncode == 0, full.stderr[-3000:]

    runs = tmp_path / "runs"
    killed = _vdiff(_fit_args(runs, num_workers, kill=True), tmp_path, cache)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    version = runs / "quickstart" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3 * EVERY

    ckpt_arg = str(last) if resume_with == "path" else "last"
    resumed = _vdiff([*_fit_args(runs, num_workers), "--ckpt_path", ckpt_arg], tmp_path, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same run continued: one version folder, one last.ckpt (not last-v1.ckpt beside it)
    assert sorted(p.name for p in (runs / "quickstart").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (version / "checkpoints").iterdir()) == ["last.ckpt"]
    reference = torch.load(tmp_path / "full" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt",
                           map_location="cpu", weights_only=True)
    return torch.load(last, map_location="cpu", weights_only=True), reference, version, resumed.stderr


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def test_sigkilled_run_resumes_with_ckpt_path_last_to_the_uninterrupted_result(tmp_path):
    resumed, reference, version, stderr = _crash_and_resume(tmp_path, num_workers=0, resume_with="last")
    line = (f"vdiff fit: resuming from {version / 'checkpoints' / 'last.ckpt'} (epoch 4, step {3 * EVERY}); "
            f"writing to {version}")
    assert stderr.count("vdiff fit: resuming from") == 1
    assert line in stderr.splitlines(), stderr[-2000:]
    _assert_bitwise_equal(resumed, reference)
    # the event file of the resumed part lands in the same folder as the killed part's
    assert len(list(version.glob("events.out.tfevents.*"))) == 2


@pytest.mark.slow
def test_resume_with_two_workers_and_an_explicit_path_is_exact_too(tmp_path):
    resumed, reference, version, stderr = _crash_and_resume(tmp_path, num_workers=2, resume_with="path")
    assert f"writing to {version}" in stderr
    print(f"num_workers=2: max abs weight difference {_max_abs_diff(resumed['state_dict'], reference['state_dict'])}")
    _assert_bitwise_equal(resumed, reference)


def test_ckpt_path_last_without_a_run_fails_before_training(tmp_path):
    runs = tmp_path / "runs"
    result = _vdiff([*_fit_args(runs, 0), "--ckpt_path", "last"], tmp_path, tmp_path / "cache")
    assert result.returncode == 2
    folder = runs / "quickstart" / "version_*" / "checkpoints"
    assert result.stderr == (
        "Seed set to 0\n"
        f"vdiff fit: error: --ckpt_path last: nothing to resume, no last.ckpt in {folder}. Start a new run without "
        "--ckpt_path, or give a checkpoint file: --ckpt_path PATH.\n"
        "See `vdiff fit --help` for the options; VDIFF_DEBUG=1 shows the full traceback.\n"
    )
    assert not runs.exists() and not (tmp_path / "cache").exists()  # nothing was trained, logged or generated


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------


def test_last_checkpoint_is_the_highest_version_that_has_one(tmp_path):
    root = tmp_path / "runs" / "quickstart"
    for version, files in {0: ["last.ckpt"], 2: ["last.ckpt", "last.ckpt.tmp"], 3: [], 10: ["last.ckpt.tmp"]}.items():
        folder = root / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_bytes(b"x")
    os.utime(root / "version_0" / "checkpoints" / "last.ckpt", (time.time() + 100, time.time() + 100))
    # version_10 has only a leftover .tmp, version_3 nothing: version_2 wins (over a newer mtime in version_0)
    assert find_last_checkpoint(root) == root / "version_2" / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint(root, version=0) == root / "version_0" / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint(tmp_path / "nothing") is None
    plan = resume_plan("last", str(root), None, None)
    assert (plan.ckpt_path, plan.version, plan.log_dir) == (
        str(root / "version_2" / "checkpoints" / "last.ckpt"), 2, str(root / "version_2"))
    # an explicit file inside the tree continues its version folder; outside it, the logger's own choice
    explicit = resume_plan(str(root / "version_0" / "checkpoints" / "last.ckpt"), str(root), None, None)
    assert explicit.version == 0
    elsewhere = tmp_path / "elsewhere.ckpt"
    elsewhere.write_bytes(b"x")
    assert resume_plan(str(elsewhere), str(root), None, None).version is None
    with pytest.raises(ResumeError, match="nothing to resume"):
        resume_plan("last", str(tmp_path / "empty"), None, None)
    with pytest.raises(ResumeError, match="no such checkpoint file"):
        resume_plan(str(tmp_path / "missing.ckpt"), str(root), None, None)


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((256, 256), value)}, "global_step": int(value)}


def test_failure_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint(_checkpoint(2.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], _checkpoint(1.0)["state_dict"]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the partial .tmp is gone
    io.save_checkpoint(_checkpoint(3.0), path)
    assert io.load_checkpoint(path)["global_step"] == 3


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    """A real SIGKILL while the new checkpoint's bytes are being written."""
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from vdiff.lit.checkpointing import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"global_step": 1, "w": torch.ones(512, 512)}}, {str(path)!r})
        real_save = torch.save
        def save_then_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.flush()
            f.seek(f.tell() // 2)
            f.truncate()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        io.save_checkpoint({{"global_step": 2, "w": torch.zeros(512, 512)}}, {str(path)!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (tmp_path / "last.ckpt.tmp").exists()  # the killed write, left beside it
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(512, 512))
    assert last_checkpoints_in(tmp_path) == [path]  # the leftover .tmp is never resumed


class _Boring(BoringModel):
    def validation_step(self, batch, batch_idx):
        return None


def _boring_fit(tmp_path, checkpoint: AtomicModelCheckpoint, **trainer_kwargs) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=7, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[checkpoint], plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    trainer.fit(_Boring())


def test_last_ckpt_holds_the_final_step_with_periodic_checkpoints(tmp_path):
    checkpoint = AtomicModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0,
                                       every_n_train_steps=3)
    _boring_fit(tmp_path, checkpoint, limit_val_batches=0)
    # Lightning's ModelCheckpoint leaves step 6 there (it saves at the end only when nothing was saved)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 7


def test_last_ckpt_is_written_after_every_validation_without_top_k(tmp_path):
    class Count(L.Callback):
        steps: list[int] = []

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.steps.append(trainer.global_step)

    checkpoint = AtomicModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    trainer_kwargs = dict(val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1)
    counter = Count()
    trainer = L.Trainer(accelerator="cpu", max_steps=7, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[checkpoint, counter], **trainer_kwargs)
    trainer.fit(_Boring())
    assert counter.steps == [2, 4, 6, 7]  # after each validation, and the final state


def test_save_last_link_replaces_the_link_atomically(tmp_path):
    first, second = tmp_path / "step=1.ckpt", tmp_path / "step=2.ckpt"
    first.write_bytes(b"1")
    second.write_bytes(b"2")
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a, **k: None))
    link = tmp_path / "last.ckpt"
    AtomicModelCheckpoint._link_checkpoint(trainer, str(first), str(link))
    assert link.is_symlink() and link.read_bytes() == b"1"
    AtomicModelCheckpoint._link_checkpoint(trainer, str(second), str(link))
    assert link.is_symlink() and link.read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.randn(3), np.random.randn(3), random.random()
    state = capture_rng_states()
    expected = (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)])
    torch.save(state, tmp_path / "rng.pt")
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_sharded_checkpoint_folders_are_resumable(tmp_path):
    """Sharded strategies save a torch.distributed.checkpoint folder named like the file (with .metadata)."""
    from vdiff.lit.checkpointing import ResumeError, last_checkpoints_in, resume_plan

    checkpoints = tmp_path / "runs" / "demo" / "version_0" / "checkpoints"
    sharded = checkpoints / "last.ckpt"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(b"")
    (sharded / "__0_0.distcp").write_bytes(b"")
    assert last_checkpoints_in(checkpoints) == [sharded]
    (checkpoints / "last-v1.ckpt").mkdir()  # a folder without .metadata is not a checkpoint
    assert last_checkpoints_in(checkpoints) == [sharded]
    plan = resume_plan(str(sharded), str(tmp_path / "runs" / "demo"), None, None)
    assert plan.ckpt_path == str(sharded)
    with pytest.raises(ResumeError, match="no such checkpoint file"):
        resume_plan(str(checkpoints / "last-v1.ckpt"), str(tmp_path / "runs" / "demo"), None, None)
