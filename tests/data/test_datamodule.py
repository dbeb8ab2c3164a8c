"""VideoDataModule: batch contract, crops that move goals, flips, determinism, resume, source mixing,
exact-once evaluation, epoch length and YAML (jsonargparse) construction."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from tests.data.conftest import FPS, coordinate_frames, driving_actions, write_videos
from vdiff.data import batch as B
from vdiff.data import sampling
from vdiff.data.datamodule import DataSource, VideoDataModule
from vdiff.data.eval_stream import eval_clip_starts
from vdiff.data.options import Augmentation, Decoding, LoaderOptions
from vdiff.data.schema import ACTION_KEYS, ACTION_SHAPES
from vdiff.data.shards import iter_raw_samples
from vdiff.data.video_io import decode_all, encode_video


def _batches(loader):
    return list(loader)


def _keys(batches):
    return [k for b in batches for k in b[B.KEY]]


@pytest.mark.parametrize("float_on_device", [True, False])
def test_batch_keys_shapes_and_dtypes(video_shards, float_on_device):
    folder, _ = video_shards
    dm = VideoDataModule(
        train=str(folder),
        num_frames=6,
        frame_stride=2,
        size=(16, 24),
        batch_size=3,
        num_workers=0,
        loader=LoaderOptions(float_on_device=float_on_device),
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {B.VIDEO, B.FPS, B.MOTION_SCORE, B.FRAME_INDICES, B.KEY, B.SOURCE, B.ACTIONS}
    assert batch[B.MOTION_SCORE].shape == (3,) and batch[B.MOTION_SCORE].isnan().all()  # these shards have no score
    video = batch[B.VIDEO]
    assert video.shape == (3, 6, 3, 16, 24)
    if float_on_device:  # uint8 through the loader, float after the (Lightning) transfer hook
        assert video.dtype == torch.uint8
        video = dm.on_after_batch_transfer(batch, 0)[B.VIDEO]
    assert video.dtype == torch.float32 and video.is_contiguous()
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.std() > 0.1
    assert batch[B.FPS].dtype == torch.float32 and batch[B.FPS].tolist() == [FPS / 2] * 3
    indices = batch[B.FRAME_INDICES]
    assert indices.shape == (3, 6) and indices.dtype == torch.long
    assert (indices[:, 1:] - indices[:, :-1] == 2).all() and (indices[:, -1] < 12).all()
    assert len(batch[B.KEY]) == 3 and batch[B.SOURCE] == ["drive"] * 3
    actions = batch[B.ACTIONS]
    for key in ACTION_KEYS:
        assert actions[key].shape == (3, 6, *ACTION_SHAPES[key])
        assert actions[key].dtype == (torch.long if key == "command" else torch.float32)
        assert actions[B.valid_key(key)].shape == (3, 6) and actions[B.valid_key(key)].dtype == torch.bool
    assert actions["speed_valid"].all()


def test_actions_follow_frame_indices(video_shards):
    folder, _ = video_shards
    dm = VideoDataModule(val=str(folder), num_frames=4, frame_stride=3, size=32, num_workers=0, val_batch_size=5)
    for batch in dm.val_dataloader():
        for row, key in enumerate(batch[B.KEY]):
            truth = driving_actions(12, seed=int(key[1:]))
            idx = batch[B.FRAME_INDICES][row].tolist()
            np.testing.assert_allclose(
                batch[B.ACTIONS]["steering"][row].numpy(), [truth["steering"][i] for i in idx], rtol=1e-6
            )
            assert batch[B.ACTIONS]["command"][row].tolist() == [truth["command"][i] for i in idx]


def test_random_crop_moves_goal_points(tmp_path):
    # Source frames 40x48 (H x W) whose pixels encode their coordinates; crop 24x32 without resizing.
    keys = write_videos(tmp_path, 12, num_frames=6, height=40, width=48, per_shard=6)
    dm = VideoDataModule(
        train=str(tmp_path),
        num_frames=3,
        size=(24, 32),
        decoding=Decoding(resize=False),
        augmentation=Augmentation(crop="random"),
        batch_size=4,
        num_workers=0,
        loader=LoaderOptions(float_on_device=True),
        epoch_length=6,
        shuffle_buffer=4,
    )
    # Independent reference: the full decoded source frames; the output must be exactly one window.
    source = decode_all(encode_video(coordinate_frames(6, 40, 48), FPS, preset="ultrafast")).astype(np.int16)
    offsets, outside = set(), 0
    for batch in dm.train_dataloader():
        video = batch[B.VIDEO]  # uint8 (B, T, 3, H, W)
        for row, key in enumerate(batch[B.KEY]):
            frame = video[row, 0].permute(1, 2, 0).numpy().astype(np.int16)
            first = batch[B.FRAME_INDICES][row, 0].item()
            errors = {
                (top, left): np.abs(source[first, top : top + 24, left : left + 32] - frame).sum()
                for top in range(17)
                for left in range(17)
            }
            top, left = min(errors, key=errors.get)
            assert errors[(top, left)] == 0
            offsets.add((top, left))
            truth = driving_actions(6, seed=keys.index(key))
            for t, i in enumerate(batch[B.FRAME_INDICES][row].tolist()):
                gx, gy = truth["goal"][i]
                x, y = (gx * 48 - left) / 32, (gy * 40 - top) / 24
                inside = 0 <= x <= 1 and 0 <= y <= 1
                assert batch[B.ACTIONS]["goal_valid"][row, t].item() == inside
                if inside:
                    np.testing.assert_allclose(batch[B.ACTIONS]["goal"][row, t].numpy(), [x, y], atol=1e-5)
                else:
                    outside += 1
                    assert batch[B.ACTIONS]["goal"][row, t].tolist() == [0.0, 0.0]
    assert len(offsets) > 5 and outside > 0  # the crops varied and some goals left them


def test_flip_mirrors_video_and_actions(tmp_path):
    keys = write_videos(tmp_path, 8, num_frames=4, height=32, width=32, per_shard=4)
    dm = VideoDataModule(
        train=str(tmp_path),
        num_frames=2,
        size=32,
        augmentation=Augmentation(flip=True),
        batch_size=4,
        num_workers=0,
        loader=LoaderOptions(float_on_device=False),
        epoch_length=4,
    )
    flips = Counter()
    for batch in dm.train_dataloader():
        for row, key in enumerate(batch[B.KEY]):
            red = batch[B.VIDEO][row, 0, 0, 16]  # one row of the red channel: R = 4x in the source
            flipped = bool(red[0] > red[-1])
            flips[flipped] += 1
            truth = driving_actions(4, seed=keys.index(key))
            i = batch[B.FRAME_INDICES][row, 0].item()
            sign = -1 if flipped else 1
            assert batch[B.ACTIONS]["steering"][row, 0].item() == pytest.approx(sign * truth["steering"][i], rel=1e-6)
            assert batch[B.ACTIONS]["trajectory"][row, 0, :, 1].tolist() == pytest.approx(
                [sign * p[1] for p in truth["trajectory"][i]], rel=1e-6
            )
            gx = truth["goal"][i][0]
            assert batch[B.ACTIONS]["goal"][row, 0, 0].item() == pytest.approx(1 - gx if flipped else gx, abs=1e-6)
            command = truth["command"][i]
            expect = {0: 2, 2: 0}.get(command, command) if flipped else command
            assert batch[B.ACTIONS]["command"][row, 0].item() == expect
    assert flips[True] > 0 and flips[False] > 0


def _clip_signature(loader):
    return [(k, tuple(idx)) for b in loader for k, idx in zip(b[B.KEY], b[B.FRAME_INDICES].tolist())]


def test_same_seed_and_epoch_give_same_clips_other_epoch_differs(video_shards):
    folder, _ = video_shards

    def make(seed):
        return VideoDataModule(
            train=str(folder),
            num_frames=3,
            size=16,
            batch_size=4,
            num_workers=0,
            seed=seed,
            shuffle_buffer=8,
            loader=LoaderOptions(float_on_device=False),
        )

    a, b, c = make(1), make(1), make(2)
    first = [bt[B.VIDEO] for bt in a.train_dataloader()]
    again = [bt[B.VIDEO] for bt in b.train_dataloader()]
    for x, y in zip(first, again):
        torch.testing.assert_close(x, y)
    assert _clip_signature(a.train_dataloader()) == _clip_signature(b.train_dataloader())
    assert _clip_signature(a.train_dataloader()) != _clip_signature(c.train_dataloader())
    epoch0 = _clip_signature(a.train_dataloader())
    a.set_epoch(1)
    assert _clip_signature(a.train_dataloader()) != epoch0
    b.set_epoch(1)
    assert _clip_signature(a.train_dataloader()) == _clip_signature(b.train_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_reproduces_the_rest(video_shards, num_workers):
    folder, _ = video_shards

    def make():
        return VideoDataModule(
            train=str(folder),
            num_frames=3,
            size=16,
            batch_size=2,
            num_workers=num_workers,
            seed=3,
            shuffle_buffer=6,
            epoch_length=7,
        )

    full = make()
    full.set_epoch(2)
    reference = _clip_signature(full.train_dataloader())
    assert len(reference) == 14

    interrupted = make()
    interrupted.set_epoch(2)
    loader = interrupted.train_dataloader()
    seen = []
    for i, batch in enumerate(loader):
        seen += _clip_signature([batch])
        if i == 2:
            break
    state = interrupted.state_dict()
    assert state["train_loader"] == {"epoch": 2, "batches": 3}

    resumed = make()
    resumed.load_state_dict(state)
    rest = _clip_signature(resumed.train_dataloader())
    assert seen + rest == reference
    # The resume point is spent: the next iteration is the whole epoch again.
    assert _clip_signature(resumed.train_dataloader()) == reference


def test_epoch_length_from_manifests(video_shards, two_sources):
    folder, _ = video_shards
    dm = VideoDataModule(train=str(folder), batch_size=5, num_workers=0)
    assert dm.train_num_batches() == 24 // 5
    loader = dm.train_dataloader()
    assert len(loader) == 4
    actions, youtube = two_sources
    dm = VideoDataModule(
        train=[DataSource(str(actions), 1.0), DataSource(str(youtube), 3.0)], batch_size=4, num_workers=0
    )
    assert dm.train_num_batches() == 16 // 4


def test_source_choice_matches_weights_over_many_draws():
    probabilities = sampling.normalized_weights([1.0, 3.0])
    n = 20000
    picks = [sampling.choose_source(probabilities, sampling.rng(0, 0, 0, 0, sampling.SAMPLE, i)) for i in range(n)]
    sigma = (n * 0.25 * 0.75) ** 0.5
    assert abs(picks.count(0) - 0.25 * n) < 4 * sigma
    assert sampling.choose_source(sampling.normalized_weights([0.0, 1.0]), np.random.default_rng(0)) == 1


@pytest.mark.parametrize("n", [600, pytest.param(2000, marks=pytest.mark.slow)])
def test_source_weights_are_honoured(two_sources, n):
    actions, youtube = two_sources
    dm = VideoDataModule(
        train=[DataSource(str(actions), 0.25, "nuscenes"), DataSource(str(youtube), 0.75, "youtube")],
        num_frames=1,
        size=16,
        batch_size=50,
        epoch_length=n // 50,
        num_workers=0,
        shuffle_buffer=4,
        loader=LoaderOptions(float_on_device=False),
    )
    counts = Counter()
    for batch in dm.train_dataloader():
        counts.update(batch[B.SOURCE])
        # Mixed batches collate: the actionless source has every action key, all invalid.
        from_youtube = torch.tensor([s == "youtube" for s in batch[B.SOURCE]])
        for key in ACTION_KEYS:
            valid = batch[B.ACTIONS][B.valid_key(key)]
            assert not valid[from_youtube].any() and valid[~from_youtube].all()
            assert not batch[B.ACTIONS][key][from_youtube].any()
    assert counts["nuscenes"] + counts["youtube"] == n
    sigma = (n * 0.25 * 0.75) ** 0.5
    assert abs(counts["nuscenes"] - 0.25 * n) < 4 * sigma, counts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_val_reads_every_sample_once_in_order(video_shards, num_workers):
    folder, keys = video_shards
    dm = VideoDataModule(
        val=str(folder), test=str(folder), num_frames=4, size=16, val_batch_size=5, num_workers=num_workers
    )
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        seen = _keys(batches)
        assert sorted(seen) == keys
        assert all((b[B.FRAME_INDICES][:, 0] == 0).all() for b in batches)  # deterministic clip start
    assert _clip_signature(dm.val_dataloader()) == _clip_signature(dm.val_dataloader())


def test_val_clips_per_video(video_shards):
    folder, keys = video_shards
    assert eval_clip_starts(8, 3) == [0, 4, 8]
    assert eval_clip_starts(1, 3) == [0, 1]
    assert eval_clip_starts(0, 3) == [0]
    dm = VideoDataModule(val=str(folder), num_frames=4, size=16, val_batch_size=6, num_workers=0, val_clips_per_video=3)
    signature = _clip_signature(dm.val_dataloader())
    assert len(signature) == 3 * len(keys)
    starts = Counter(idx[0] for _, idx in signature)
    assert starts == {0: 24, 4: 24, 8: 24}  # 12 frames, clips of 4: last start 8
    assert len({k for k, _ in signature}) == 3 * len(keys) and signature[1][0] == f"{keys[0]}/clip1"


def test_target_fps_sampling(video_shards):
    folder, _ = video_shards
    dm = VideoDataModule(val=str(folder), num_frames=3, target_fps=5.0, size=16, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert batch[B.FRAME_INDICES][0].tolist() == [0, 2, 4] and batch[B.FPS][0].item() == 5.0


def test_evaluation_clips_can_be_longer_than_training_clips(video_shards):
    """Train on short clips, evaluate on long ones (MCVD/VDT: train 16, evaluate 2 -> 28 on 30)."""
    folder, _ = video_shards
    dm = VideoDataModule(
        train=str(folder),
        val=str(folder),
        num_frames=3,
        eval_num_frames=6,
        size=16,
        num_workers=0,
        batch_size=2,
        shuffle_buffer=0,
    )
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    train = next(iter(dm.train_dataloader()))
    assert val[B.FRAME_INDICES][0].tolist() == [0, 1, 2, 3, 4, 5]
    assert train[B.FRAME_INDICES].shape == (2, 3) and val[B.VIDEO].shape[1] == 6
    with pytest.raises(ValueError, match="eval_num_frames"):
        VideoDataModule(val=str(folder), eval_num_frames=0)


def test_configuration_errors(tmp_path, video_shards):
    folder, _ = video_shards
    with pytest.raises(FileNotFoundError, match="val: .*nothing-here does not exist; make shards .*vdiff data shards"):
        VideoDataModule(val=str(tmp_path / "nothing-here")).setup("validate")
    (tmp_path / "no-shards").mkdir()
    with pytest.raises(FileNotFoundError, match="train: .*no-shards holds no shards"):
        VideoDataModule(train=str(tmp_path / "no-shards")).check_data("fit")
    with pytest.raises(ValueError, match="weights"):
        VideoDataModule(train=[DataSource(str(folder), 0.0)])
    with pytest.raises(ValueError, match="either frame_stride or target_fps"):
        VideoDataModule(train=str(folder), frame_stride=2, target_fps=5.0)
    with pytest.raises(ValueError, match="no train shards"):
        VideoDataModule(val=str(folder)).train_dataloader()
    assert VideoDataModule(train=str(folder)).val_dataloader() == []


def test_constructible_from_a_yaml_recipe(video_shards):
    jsonargparse = pytest.importorskip("jsonargparse")
    folder, _ = video_shards
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--data", type=VideoDataModule)
    recipe = f"""
data:
  class_path: vdiff.data.datamodule.VideoDataModule
  init_args:
    train:
      - {{path: {folder}, weight: 0.5, name: youtube}}
      - {{path: {folder}, weight: 0.5}}
    val: {folder}
    size: [16, 24]
    num_frames: 4
    augmentation: {{crop: center}}
    num_workers: 0
"""
    config = parser.parse_string(recipe)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = instantiate(config).data
    assert isinstance(dm, VideoDataModule)
    assert dm.sources["train"][0] == DataSource(str(folder), 0.5, "youtube")
    assert dm.spec.out_hw == (16, 24) and dm.augmentation.crop == "center"
    with pytest.raises((jsonargparse.ArgumentError, SystemExit, ValueError)):
        parser.parse_string(recipe.replace("crop: center", "crop: middle"))


class _KeyRecorder(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        assert batch[B.VIDEO].dtype == torch.float32 and batch[B.VIDEO].is_contiguous()
        return batch[B.KEY]


def test_predict_through_lightning_reads_every_sample(video_shards):
    folder, keys = video_shards
    dm = VideoDataModule(predict=str(folder), num_frames=2, size=16, val_batch_size=5, num_workers=0)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    predictions = trainer.predict(_KeyRecorder(), datamodule=dm)
    assert sorted(k for batch in predictions for k in batch) == keys


def test_tar_cut_at_a_file_boundary_counts_the_missing_samples(tmp_path):
    # tarfile reads a tar cut exactly between two members as a complete, shorter tar: only the
    # manifest's sample count reveals the loss.
    import tarfile

    keys = write_videos(tmp_path / "set", 8, num_frames=4, per_shard=4)
    shard = tmp_path / "set" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()  # json, mp4 of 4 samples
    shard.write_bytes(shard.read_bytes()[: members[4].offset])  # keep 2 whole samples
    assert len(list(iter_raw_samples(shard))) == 2  # no error: the loss is silent at this level
    dm = VideoDataModule(val=str(tmp_path / "set"), num_frames=4, size=16, num_workers=0)
    seen = [k for batch in dm.val_dataloader() for k in batch[B.KEY]]
    assert seen == keys[:6]
    counts = dm.skipped_counts()
    assert counts["truncated_shard"] == 2 and counts["bad_shard"] == 0
    assert dm.skipped_counts_by_stage()["val"]["truncated_shard"] == 2
    # Training reads the shard again and again: every short read counts its missing samples.
    dm = VideoDataModule(
        train=str(tmp_path / "set"),
        num_frames=4,
        size=16,
        num_workers=0,
        batch_size=2,
        epoch_length=4,
        shuffle_buffer=0,
    )
    list(dm.train_dataloader())
    train_counts = dm.skipped_counts_by_stage()["train"]
    assert train_counts["truncated_shard"] > 0 and train_counts["truncated_shard"] % 2 == 0
    assert train_counts["bad_shard"] == 0
