"""``motion_score`` in batches: the curation score of a clip's json (``extra["motion_score"]``), NaN where unknown,
from video shards and from latent shards encoded from them; the schema refuses a score that is not a number."""

from __future__ import annotations

import math

import pytest
import torch

from tests.data.conftest import FPS, coordinate_frames
from vdiff.data import batch as B
from vdiff.data.datamodule import VideoDataModule
from vdiff.data.latent_datamodule import LatentDataModule
from vdiff.data.schema import SchemaError, VideoMeta, motion_score_of
from vdiff.data.shards import ShardWriter, dump_json
from vdiff.data.video_io import encode_video
from vdiff.encode import ShardEncoder, autoencoder_info, encode_shards
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder

SCORES = {"s0000": 0.25, "s0001": 3.5, "s0002": None, "s0003": 12.0}  # None: a sample without a score


def write_scored(folder, scores=SCORES, frames: int = 8) -> None:
    """Coordinate videos whose jsons carry ``scores`` as curation writes them (with units); None = no score."""
    mp4 = encode_video(coordinate_frames(frames, 32, 32), FPS, preset="ultrafast")
    with ShardWriter(folder, max_count=2) as writer:
        for key, score in scores.items():
            extra = {"input": f"{key}.mp4"}
            if score is not None:
                extra.update(motion_score=score, motion_fps=2.0, motion_size=128)
            meta = VideoMeta(fps=FPS, width=32, height=32, num_frames=frames, source="scored", extra=extra)
            writer.write_video(key, mp4, meta)


def scores_by_key(batches) -> dict[str, float]:
    out = {}
    for batch in batches:
        assert batch[B.MOTION_SCORE].dtype == torch.float32 and batch[B.MOTION_SCORE].shape == (len(batch[B.KEY]),)
        out.update(zip(batch[B.KEY], batch[B.MOTION_SCORE].tolist()))
    return out


def same(a: float, b: float | None) -> bool:
    return math.isnan(a) if b is None else a == pytest.approx(b)


def test_video_batches_carry_the_stored_score_or_nan(tmp_path):
    write_scored(tmp_path / "scored")
    dm = VideoDataModule(val=str(tmp_path / "scored"), num_frames=4, size=32, val_batch_size=3, num_workers=0)
    got = scores_by_key(dm.val_dataloader())
    assert got.keys() == SCORES.keys() and all(same(got[k], v) for k, v in SCORES.items())
    # training batches too, from every source: a set without scores gives NaN beside the scored one
    write_scored(tmp_path / "plain", {f"p{i:04d}": None for i in range(4)})
    dm = VideoDataModule(
        train=[str(tmp_path / "scored"), str(tmp_path / "plain")],
        num_frames=4,
        size=32,
        batch_size=4,
        num_workers=0,
        epoch_length=3,
    )
    seen = 0
    for batch in dm.train_dataloader():
        for key, score in zip(batch[B.KEY], batch[B.MOTION_SCORE].tolist()):
            assert same(score, SCORES.get(key)), (key, score)
            seen += 1
    assert seen == 12


def test_latent_batches_keep_the_score_of_the_encoded_clip(tmp_path):
    write_scored(tmp_path / "video")
    torch.manual_seed(0)
    ae = VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()
    encode_shards(
        str(tmp_path / "video"),
        tmp_path / "latent",
        ShardEncoder(ae, autoencoder_info(ae, None), clip_frames=4, batch_size=4),
        log=False,
    )
    dm = LatentDataModule(val=str(tmp_path / "latent"), num_frames=4, val_batch_size=8, num_workers=0)
    got = scores_by_key(dm.val_dataloader())
    assert len(got) == 8  # two 4-frame clips per video, each with its video clip's score
    assert all(same(score, SCORES[key.split("/clip")[0]]) for key, score in got.items())
    dm = LatentDataModule(train=str(tmp_path / "latent"), num_frames=2, batch_size=4, num_workers=0, epoch_length=2)
    for batch in dm.train_dataloader():
        assert all(same(s, SCORES[k.split("/clip")[0]]) for k, s in zip(batch[B.KEY], batch[B.MOTION_SCORE].tolist()))


def test_schema_checks_the_score(tmp_path):
    base = {"fps": FPS, "width": 32, "height": 32, "num_frames": 8, "source": "s"}
    assert motion_score_of(VideoMeta.from_dict({**base, "extra": {"motion_score": 2}}).extra) == 2.0
    assert math.isnan(motion_score_of(VideoMeta.from_dict({**base, "extra": {"motion_score": None}}).extra))
    assert math.isnan(motion_score_of({}))
    for extra, field in (
        ({"motion_score": "fast"}, "motion_score"),
        ({"motion_score": True}, "motion_score"),
        ({"motion_score": 1.0, "motion_fps": 0}, "motion_fps"),
    ):
        with pytest.raises(SchemaError, match=field):
            VideoMeta.from_dict({**base, "extra": extra})
    # a sample with a malformed score is skipped as bad_json, the others load
    write_scored(tmp_path / "set", {"good": 1.0})
    mp4 = encode_video(coordinate_frames(8, 32, 32), FPS, preset="ultrafast")
    with ShardWriter(tmp_path / "bad") as writer:
        writer.write_raw("bad", {"mp4": mp4, "json": dump_json({**base, "extra": {"motion_score": "fast"}})})
    dm = VideoDataModule(val=[str(tmp_path / "set"), str(tmp_path / "bad")], num_frames=4, size=32, num_workers=0)
    assert scores_by_key(dm.val_dataloader()) == {"good": 1.0}
    assert dm.skipped_counts()["bad_json"] == 1
