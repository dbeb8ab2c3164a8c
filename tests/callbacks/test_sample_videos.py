"""SampleVideos in a short Trainer fit: the videos are in TensorBoard's event file (read back with
TensorBoard's EventAccumulator), the mp4s beside the logs decode, and the conditions (clips and seed)
stay fixed across validation runs and across a resume whose validation data differ."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from tests.callbacks.test_lora import tiny_module
from tests.lit.test_vdt_module import moving_square_batch
from vdiff.callbacks.sample_videos import SampleVideos, pack, unpack
from vdiff.lit.vdt import VDTModule


class Clips(torch.utils.data.IterableDataset):
    def __init__(self, seed: int, count: int = 100) -> None:
        self.seed, self.count = seed, count

    def __iter__(self):
        for i in range(self.count):
            batch = moving_square_batch(batch=3, frames=4, size=16, seed=self.seed + i)
            # uint8 frames normalised as the data modules do, so the stored clips pack to uint8 exactly
            video = ((batch["video"] + 1) * 127.5).round().to(torch.uint8).float().mul_(2.0 / 255.0).sub_(1.0)
            yield {"video": video, "key": [f"{self.seed}-{i}-{b}" for b in range(3)]}


def loader(seed: int, count: int = 100):
    return torch.utils.data.DataLoader(Clips(seed, count), batch_size=None)


class Recording(VDTModule):
    """Records what SampleVideos asks to generate."""

    def generate(self, batch, **options):
        self.__dict__.setdefault("asked", []).append(
            (batch["key"], batch["video"].cpu(), options["generator"].initial_seed())
        )
        return super().generate(batch, **options)


def recording_module():
    module = tiny_module()
    module.__class__ = Recording
    return module


def fit(root, callbacks, steps, val_seed, ckpt_path=None):
    module = recording_module()
    logger = TensorBoardLogger(save_dir=str(root), name="run", version=0)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(
        module,
        train_dataloaders=loader(0),
        val_dataloaders=loader(val_seed, 2),
        ckpt_path=ckpt_path,
        weights_only=False,
    )  # hparams hold config objects
    return trainer, module


def test_videos_reach_tensorboard_and_mp4s_with_fixed_conditions_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vdiff.data.video_io import decode_all

    samples = SampleVideos(num_videos=2, fps=4, generate_options={"steps": 2}, seed=7)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer, module = fit(tmp_path, [samples, checkpoint], 2, val_seed=100)

    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    videos = events.Images("samples")
    assert [v.step for v in videos] == [1, 2]
    assert all(v.encoded_image_string[:3] == b"GIF" for v in videos)  # add_video writes animated GIFs
    assert videos[0].width * videos[0].height == 2 * 16 * 32  # 2 clips of target | sample (16 x 2*16)
    mp4s = sorted((tmp_path / "run" / "version_0" / "samples").glob("*.mp4"))
    assert [p.name for p in mp4s] == ["epoch=0-step=1.mp4", "epoch=0-step=2.mp4"]
    for path in mp4s:
        frames = decode_all(path)
        assert frames.shape == (4, 32, 32, 3)

    # The same two clips and seed at every run.
    (keys0, video0, seed0), (keys1, video1, seed1) = module.asked
    assert keys0 == keys1 == ["100-0-0", "100-0-1"] and seed0 == seed1 == 7 and torch.equal(video0, video1)

    # Resumed with other validation data: the stored conditions are sampled, not the new first batch.
    resumed = SampleVideos(num_videos=2, fps=4, generate_options={"steps": 2}, seed=0)
    _, module2 = fit(
        tmp_path,
        [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        3,
        val_seed=500,
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    keys, video, seed = module2.asked[-1]
    assert keys == ["100-0-0", "100-0-1"] and seed == 7 and torch.equal(video, video0)
    assert resumed._runs == 2  # the checkpoint (step 2, before its validation) counted one run; +1 resumed


def test_state_packs_8_bit_video_exactly():
    video = torch.randint(0, 256, (2, 3, 3, 4, 4), dtype=torch.uint8).float().mul_(2.0 / 255.0).sub_(1.0)
    other = torch.randn(2, 5)
    packed = pack({"video": video, "latents": other, "actions": {"speed": torch.rand(2, 3)}})
    assert packed["video"]["__uint8_video__"].dtype == torch.uint8  # 4x smaller in the checkpoint
    unpacked = unpack(packed)
    assert torch.equal(unpacked["video"], video) and torch.equal(unpacked["latents"], other)
