"""SteeringTest: forced steering on every frame, shifts measured on the generated frames, the printed table, the
min_agreement check, and a run on a real (tiny) VistaModule checkpoint."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader

from tests.lit.test_vista_module import NET, driving_batch
from tests.metrics.test_steering import shifted, smooth_image
from vdiff.callbacks.steering import SteeringTest, format_table, summarize, with_steering
from vdiff.lit.base import Generated
from vdiff.lit.module_loading import load_module


class StubWorldModel:
    """Generates clips that scroll ``gain * steering`` pixels per frame (+ = right, i.e. a left turn) after the given
    frames, or, with ``gain = 0``, at the clip's recorded rate regardless of the command."""

    def __init__(self, gain: float, given_frames: int = 1) -> None:
        self.gain = gain
        self.evaluation = SimpleNamespace(given_frames=given_frames)
        self.device = torch.device("cpu")
        self.commands: list[float] = []

    def generate(self, batch, generator=None) -> Generated:
        steering = batch["actions"]["steering"][:, 0]  # (B,)
        self.commands.append(float(steering[0]))
        video = batch["video"].clone()
        b, t = video.shape[:2]
        g = self.evaluation.given_frames
        rate = self.gain * steering if self.gain else torch.full((b,), 0.8)
        for i in range(b):
            for j in range(g, t):
                video[i, j] = shifted(video[i, g - 1], float(rate[i]) * (j - g + 1))
        return Generated(video=video, given_frames=torch.zeros(b, t, dtype=torch.bool), target=batch["video"])


def clip_batches(count: int = 2, batch: int = 3, frames: int = 5) -> list[dict]:
    batches = []
    for k in range(count):
        clips = []
        for i in range(batch):
            image = smooth_image(seed=10 * k + i)
            clips.append(torch.stack([shifted(image, 0.5 * t) for t in range(frames)]))  # recorded: moving right
        video = torch.stack(clips)[:, :, None].expand(-1, -1, 3, -1, -1).contiguous()  # (B, T, 3, H, W)
        steering = torch.full((batch, frames), 40.0)  # a left turn, matching the recorded motion
        actions = {
            "steering": steering,
            "steering_valid": torch.ones(batch, frames, dtype=torch.bool),
            "speed": torch.full((batch, frames), 5.0),
            "speed_valid": torch.ones(batch, frames, dtype=torch.bool),
        }
        batches.append({"video": video, "actions": actions, "fps": torch.full((batch,), 10.0)})
    return batches


def test_with_steering_forces_every_frame_and_keeps_the_rest():
    batch = clip_batches(1)[0]
    batch["actions"]["steering_valid"][0, 2] = False
    forced = with_steering(batch, -150.0)
    assert torch.equal(forced["actions"]["steering"], torch.full((3, 5), -150.0))
    assert forced["actions"]["steering_valid"].all()
    assert forced["actions"]["speed"] is batch["actions"]["speed"] and forced["video"] is batch["video"]
    assert not batch["actions"]["steering_valid"][0, 2]  # the batch itself is untouched



def test_keep_actions_marks_the_other_recorded_actions_absent():
    """On real data the recorded trajectory/command/goal describe the recorded path: the test can keep speed alone
    (Vista's steering mode), so nothing but the command says where to turn."""
    from vdiff.models.actions import ActionEncoder

    batch = clip_batches(1)[0]
    frames = batch["video"].shape[1]
    batch["actions"].update(
        trajectory=torch.ones(3, frames, 4, 2), trajectory_valid=torch.ones(3, frames, dtype=torch.bool),
        command=torch.zeros(3, frames, dtype=torch.long), command_valid=torch.ones(3, frames, dtype=torch.bool),
        goal=torch.full((3, frames, 2), 0.3), goal_valid=torch.ones(3, frames, dtype=torch.bool),
    )
    forced = with_steering(batch, 150.0, keep=("speed",))["actions"]
    assert forced["speed_valid"].all() and forced["steering_valid"].all()
    assert not forced["trajectory_valid"].any() and not forced["command_valid"].any() and not forced["goal_valid"].any()
    assert batch["actions"]["trajectory_valid"].all()  # the batch itself is untouched
    encoder = ActionEncoder(future_seconds=(0.1, 0.2, 0.3, 0.4))
    _, valid = encoder.values(forced, batch["fps"])
    assert valid["speed"].all() and valid["steering"].all()
    assert not (valid["trajectory"] | valid["command"] | valid["goal"]).any()

    model = StubWorldModel(gain=0.01)
    seen = []
    generate = model.generate
    model.generate = lambda b, generator=None: seen.append(b["actions"]) or generate(b, generator)
    SteeringTest(steering=150.0, max_shift=3, keep_actions=["speed"], max_batches=1).evaluate(model, [batch])
    assert len(seen) == 2 and all(not a["trajectory_valid"].any() and a["speed_valid"].all() for a in seen)

def test_a_model_that_obeys_agrees_on_every_clip_and_prints_the_table():
    model = StubWorldModel(gain=0.01)  # 150 deg -> 1.5 px a frame
    test = SteeringTest(steering=150.0, max_shift=3)
    results = test.evaluate(model, clip_batches())
    assert sorted(set(model.commands)) == [-150.0, 150.0]
    assert results["clips"] == 6 and results["agreement"] == 1.0 and results["ordered"] == 6
    assert results["mean_shift_left"] == pytest.approx(1.5, abs=0.05)
    assert results["mean_shift_right"] == pytest.approx(-1.5, abs=0.05)
    assert results["recorded_turning"] == 6 and results["recorded_agree"] == 6
    table = test.table(checkpoint="last.ckpt", weights="EMA weights")
    assert "Steering test on 6 held-out clips" in table
    assert "LEFT +150 deg / RIGHT -150 deg" in table and "1 given -> 4" in table
    assert "+1.5" in table and "-1.5" in table and "6/6 (100%)" in table
    assert "agreement (both commands obeyed): 6/6 (100%) = 1.00" in table and "last.ckpt (EMA weights)" in table
    test.min_agreement = 0.9
    test.check()


class JumpingWorldModel:
    """Two given frames, then the generated ones jump 2 px the commanded way from the last given frame and drift 0.5 px a
    frame after it (motion that is not constant, so which frame pairs are measured shows in the mean)."""

    evaluation = SimpleNamespace(given_frames=2)
    device = torch.device("cpu")

    def generate(self, batch, generator=None) -> Generated:
        sign = math.copysign(1.0, float(batch["actions"]["steering"][0, 0]))
        video = batch["video"].clone()
        b, t = video.shape[:2]
        for i in range(b):
            offset = 0.0
            for j in range(2, t):
                offset += sign * (2.0 if j == 2 else 0.5)
                video[i, j] = shifted(video[i, 1], offset)
        return Generated(video=video, given_frames=torch.zeros(b, t, dtype=torch.bool), target=batch["video"])


def test_the_shift_is_measured_from_the_last_given_frame_on():
    """Frames 1 -> 5 of a 2-given clip: the jump out of the last given frame counts, the given frames' own motion does
    not. Left: (2 + 3 * 0.5) / 4 = 0.875 px a frame (frames 2 -> 5 alone: 0.5; frames 0 -> 5: 0.5)."""
    image = smooth_image(seed=4)
    recorded = [0.0, -1.0, 0.5, 0.75, 1.0, 1.25]  # the given pair moves -1 px, then +1.5, then 0.25 a frame
    video = torch.stack([shifted(image, x) for x in recorded])[None, :, None].expand(-1, -1, 3, -1, -1).contiguous()
    actions = {"steering": torch.full((1, 6), 40.0), "steering_valid": torch.ones(1, 6, dtype=torch.bool)}
    test = SteeringTest(steering=150.0, max_shift=3)
    test.evaluate(JumpingWorldModel(), [{"video": video, "actions": actions, "fps": torch.full((1,), 10.0)}])
    assert float(test.shifts["left"]) == pytest.approx(0.875, abs=0.02)
    assert float(test.shifts["right"]) == pytest.approx(-0.875, abs=0.02)
    assert float(test.shifts["recorded"]) == pytest.approx((1.5 + 3 * 0.25) / 4, abs=0.02)  # the same frames
    assert "2 given -> 4" in test.table()


def test_a_model_that_ignores_the_command_fails_min_agreement():
    test = SteeringTest(steering=150.0, max_shift=3, min_agreement=0.75, max_batches=1)
    results = test.evaluate(StubWorldModel(gain=0.0), clip_batches())
    assert results["clips"] == 3  # max_batches
    assert results["left_obeyed"] == 3 and results["right_obeyed"] == 0 and results["agreement"] == 0.0
    with pytest.raises(RuntimeError, match="below min_agreement 0.75"):
        test.check()


def test_summary_counts_and_table_without_a_reference():
    shifts = {"left": torch.tensor([0.5, -0.1, 0.2, 0.3]), "right": torch.tensor([-0.4, -0.2, 0.1, -0.3])}
    results = summarize(shifts)
    assert (results["left_obeyed"], results["right_obeyed"], results["both_obeyed"], results["ordered"]) == (3, 3, 2, 4)
    assert results["agreement"] == 0.5 and results["mean_shift_left"] == pytest.approx(0.225)
    table = format_table(results, 90.0, (0.3, 0.7), 2, 8)
    assert "rows 30%-70%" in table and "2 given -> 6" in table and "2/4 (50%) = 0.50" in table
    assert "reference" not in table
    with pytest.raises(ValueError, match="positive"):
        SteeringTest(steering=-10.0)


def test_runs_on_a_vista_checkpoint_whose_action_encoder_comes_back(tmp_path):
    from torch.utils.data import DataLoader

    from vdiff.lit.vista import VistaModule
    from vdiff.models.actions import ActionEncoder
    from vdiff.models.conditioners import CLIPImageEmbedder

    encoder = ActionEncoder(embed_dim=4, future_seconds=(0.1, 0.2, 0.3, 0.4), steering_scale=1 / 200)
    module = VistaModule(
        net=NET, image_encoder=CLIPImageEmbedder("tiny"), action_encoder=encoder, sampler=VistaModule.svd_sampler(2)
    )
    batch = driving_batch(batch=2, frames=6, size=16)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_module(str(tmp_path / "last.ckpt"))
    assert loaded.action_encoder.to_dict() == encoder.to_dict()
    assert loaded.net.config.action_dim == 19 * 4
    test = SteeringTest(steering=100.0, max_shift=2)
    results = test.evaluate(loaded, [batch])
    assert results["clips"] == 2 and math.isfinite(results["mean_shift_left"])
    assert "Steering test on 2 held-out clips" in test.table()


# ---------------------------------------------------------------- the validate / test entry points


class StubLitModule(L.LightningModule):
    """A LightningModule whose ``generate`` is :class:`StubWorldModel`'s; records the train/eval mode of every call."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.world = StubWorldModel(gain)
        self.evaluation = self.world.evaluation
        self.modes: list[bool] = []

    def generate(self, batch, generator=None) -> Generated:
        self.modes.append(self.training)
        return self.world.generate(batch, generator)

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class HeldOut(L.LightningDataModule):
    def val_dataloader(self):
        return DataLoader(clip_batches(2), batch_size=None)  # 6 clips

    def test_dataloader(self):
        return DataLoader(clip_batches(1), batch_size=None)  # 3 clips


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def tiny_trainer(callbacks, logger=False, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(callbacks=callbacks, logger=logger, limit_val_batches=1, limit_test_batches=1, **options, **kwargs)


def steering_metrics(calls) -> list[dict]:
    return [metrics for metrics, _ in calls if any(k.startswith("steering/") for k in metrics)]


def test_validate_entry_point_tests_the_module_in_memory_and_logs(tmp_path, capsys):
    module = StubLitModule(gain=0.01)  # 150 deg -> 1.5 px a frame: obeys
    selected = SteeringTest(run_on=["validate"], steering=150.0, max_shift=3, min_agreement=0.9)
    default = SteeringTest(steering=150.0, max_shift=3)  # run_on ("fit",): validate does nothing
    logger = CSVLogger(tmp_path, name="steer")
    tiny_trainer([selected, default], logger=logger).validate(module, datamodule=HeldOut())
    printed = capsys.readouterr().out
    assert printed.count("Steering test on") == 1 and "Steering test on 6 held-out clips" in printed
    assert "tested: weights in memory" in printed and "agreement (both commands obeyed): 6/6 (100%)" in printed
    # its own max_batches (all 6 clips), not the trainer's limit_val_batches
    assert selected.results["clips"] == 6 and selected.results["agreement"] == 1.0
    assert module.modes == [False] * 4 and module.training  # sampled in eval mode, left as it was
    assert default.results == {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("steering/agreement")]
    assert len(rows) == 1 and float(rows[0]["steering/agreement"]) == 1.0
    assert float(rows[0]["steering/left_obeyed_frac"]) == 1.0 and float(rows[0]["steering/right_obeyed_frac"]) == 1.0


def test_test_entry_point_uses_the_test_loader_logs_then_checks(capsys):
    module = StubLitModule(gain=0.0)  # ignores the command: every clip scrolls the recorded way (left)
    test = SteeringTest(run_on=("test",), steering=150.0, max_shift=3, min_agreement=0.5)
    logger = RecordingLogger()
    trainer = tiny_trainer([test], logger=logger)
    with pytest.raises(RuntimeError, match="below min_agreement 0.5"):
        trainer.test(module, dataloaders=DataLoader(clip_batches(1), batch_size=None))  # no datamodule: the loader
    assert test.results["clips"] == 3 and test.results["agreement"] == 0.0
    assert steering_metrics(logger.calls) == [
        {"steering/agreement": 0.0, "steering/left_obeyed_frac": 1.0, "steering/right_obeyed_frac": 0.0}
    ]  # logged before the check raised
    assert "Steering test on 3 held-out clips" in capsys.readouterr().out


def test_fits_periodic_validation_and_sanity_check_do_not_run_it(capsys):
    module = StubLitModule(gain=0.01)
    test = SteeringTest(run_on=["validate", "test"], steering=150.0, max_shift=3)  # not "fit"
    logger = RecordingLogger()
    trainer = tiny_trainer([test], logger=logger, max_steps=2, val_check_interval=1, num_sanity_val_steps=1)
    val = DataLoader(clip_batches(1), batch_size=None)
    trainer.fit(module, train_dataloaders=DataLoader([torch.zeros(1)] * 2, batch_size=None), val_dataloaders=val)
    assert module.world.commands == [] and test.results == {} and not steering_metrics(logger.calls)
    assert "Steering test" not in capsys.readouterr().out
    trainer.validate(module, dataloaders=val)  # the same trainer's validate entry point: runs (trainer's loader)
    assert test.results["clips"] == 3 and module.modes == [False, False]
    assert [step for metrics, step in logger.calls if "steering/agreement" in metrics] == [2]  # trainer.global_step


def test_run_on_names_known_stages():
    assert SteeringTest(run_on="validate").run_on == ("validate",)
    assert SteeringTest().run_on == ("fit",)
    with pytest.raises(ValueError, match="run_on"):
        SteeringTest(run_on=["validate", "predict"])


def test_an_action_free_vista_samples_the_forced_steering_with_actions():
    from tests.lit.test_vista_module import tiny_vista

    module = tiny_vista(sample_actions=False).eval()
    batch = driving_batch(batch=1, frames=6, size=16)

    def sample(degrees: float) -> torch.Tensor:
        return module.generate(with_steering(batch, degrees), generator=torch.Generator().manual_seed(0)).video

    assert torch.equal(sample(90.0), sample(-90.0))  # action-free: the command is not used (the recipe's metrics)
    videos, generate = [], module.generate

    def recording(batch, generator=None):
        out = generate(batch, generator=generator)
        videos.append((module.sample_actions, out.video))
        return out

    module.generate = recording
    SteeringTest(steering=90.0, max_shift=2).evaluate(module, [batch])
    (left_actions, left), (right_actions, right) = videos
    assert left_actions and right_actions and not torch.allclose(left, right)  # the test sampled WITH actions
    assert module.sample_actions is False  # and switched them off again


def test_default_still_runs_at_the_end_of_fit_on_the_saved_checkpoint(tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.lit.test_vista_module import tiny_vista

    batch = driving_batch(batch=2, frames=6, size=16)
    test = SteeringTest(steering=100.0, max_shift=2)  # run_on ("fit",)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, callbacks=[ModelCheckpoint(tmp_path, save_last=True), test],
    )  # fmt: skip
    loader = DataLoader([batch], batch_size=None)
    trainer.fit(tiny_vista(sample_actions=False), train_dataloaders=loader, val_dataloaders=loader)
    printed = capsys.readouterr().out
    assert "Steering test on 2 held-out clips" in printed and "last.ckpt (trained weights)" in printed
    assert test.results["clips"] == 2
