"""SteeringTest: forced steering on every frame, shifts measured on the generated frames, the printed table, the
min_agreement check, and a run on a real (tiny) VistaModule checkpoint."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests.lit.test_vista_module import NET, driving_batch
from tests.metrics.test_steering import shifted, smooth_image
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.callbacks.steering import SteeringTest, format_table, summarize, with_steering
from vdiff.lit.base import Generated


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
