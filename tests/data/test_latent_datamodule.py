"""LatentDataModule: latent shards round-trip from ``vdiff encode``, batch contract, seeded posterior noise,
determinism, resume, image embeddings, bad samples, and construction from YAML."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.conftest import FPS, coordinate_frames, driving_actions, write_videos
from vdiff.data import batch as B
from vdiff.data.latent_datamodule import LatentDataModule, eval_noise
from vdiff.data.schema import ACTION_KEYS, ACTION_SHAPES, VideoMeta
from vdiff.data.shards import ShardWriter, dump_json
from vdiff.data.transforms import normalize_video
from vdiff.data.video_io import decode_all, encode_video
from vdiff.encode import ShardEncoder, autoencoder_info, encode_shards
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder


@pytest.fixture(scope="module")
def tiny_ae() -> VideoAutoencoder:
    torch.manual_seed(0)
    return VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def latent_set(tiny_ae, tmp_path_factory):
    """8 coordinate videos (12 frames, 32x32, actions) in 2 shards, encoded whole: latents (12, 4, 16, 16)."""
    root = tmp_path_factory.mktemp("latents")
    write_videos(root / "video", 8, num_frames=12, per_shard=4, source="drive", actions=True)
    encoder = ShardEncoder(tiny_ae, autoencoder_info(tiny_ae, None), batch_size=4)
    encode_shards(str(root / "video"), root / "latent", encoder, log=False)
    return root / "latent"


def _signature(loader) -> list[tuple[str, int, float]]:
    return [
        (k, int(i[0]), float(x.sum())) for b in loader for k, i, x in zip(b[B.KEY], b[B.FRAME_INDICES], b[B.LATENTS])
    ]


def test_round_trip_equals_direct_encode(latent_set, tiny_ae):
    dm = LatentDataModule(val=str(latent_set), num_frames=12, val_batch_size=3, num_workers=0, seed=5)
    frames = decode_all(encode_video(coordinate_frames(12, 32, 32), FPS, preset="ultrafast"))  # what was encoded
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 127.5 - 1  # (1, T, 3, H, W)
    with torch.no_grad():
        direct = tiny_ae.encode(video)
    keys = []
    for batch in dm.val_dataloader():
        n = len(batch[B.KEY])
        keys += batch[B.KEY]
        for row in range(n):  # every video has the same frames, so the same posterior
            torch.testing.assert_close(batch[B.LATENTS_MEAN][row], direct.mean[0], rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(batch[B.LATENTS_STD][row], direct.std[0], rtol=2e-3, atol=2e-3)
            eps = torch.from_numpy(eval_noise(5, batch[B.KEY][row]).standard_normal((12, 4, 16, 16), dtype=np.float32))
            torch.testing.assert_close(
                batch[B.LATENTS][row], batch[B.LATENTS_MEAN][row] + batch[B.LATENTS_STD][row] * eps
            )
            truth = driving_actions(12, seed=int(batch[B.KEY][row][1:]))
            np.testing.assert_allclose(batch[B.ACTIONS]["speed"][row].numpy(), truth["speed"], rtol=1e-6)
            assert batch[B.ACTIONS]["command"][row].tolist() == truth["command"]
        first = normalize_video(torch.from_numpy(frames[0]).permute(2, 0, 1))  # the batch contract's [-1, 1]
        assert torch.equal(batch[B.FIRST_FRAME], first.expand(n, -1, -1, -1))
        assert batch[B.FPS].tolist() == [FPS] * n and batch[B.SOURCE] == ["drive"] * n
    assert keys == [f"v{i:04d}" for i in range(8)]  # every sample exactly once, in order


def test_train_batch_contract_and_random_starts(latent_set):
    dm = LatentDataModule(
        train=str(latent_set),
        num_frames=5,
        frame_stride=2,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=4,
        epoch_length=4,
    )
    starts = set()
    for batch in dm.train_dataloader():
        assert set(batch) == {
            B.LATENTS,
            B.LATENTS_MEAN,
            B.LATENTS_STD,
            B.FIRST_FRAME,
            B.FPS,
            B.MOTION_SCORE,
            B.FRAME_INDICES,
            B.KEY,
            B.SOURCE,
            B.ACTIONS,
        }
        assert batch[B.MOTION_SCORE].shape == (4,) and batch[B.MOTION_SCORE].isnan().all()
        for name in (B.LATENTS, B.LATENTS_MEAN, B.LATENTS_STD):
            assert batch[name].shape == (4, 5, 4, 16, 16) and batch[name].dtype == torch.float32
        assert not torch.equal(batch[B.LATENTS], batch[B.LATENTS_MEAN])  # a posterior sample, not the mean
        assert batch[B.FIRST_FRAME].shape == (4, 3, 32, 32) and batch[B.FIRST_FRAME].min() >= -1
        indices = batch[B.FRAME_INDICES]
        assert (indices[:, 1:] - indices[:, :-1] == 2).all() and (indices[:, -1] < 12).all()
        assert batch[B.FPS].tolist() == [FPS / 2] * 4
        for key in ACTION_KEYS:
            assert batch[B.ACTIONS][key].shape == (4, 5, *ACTION_SHAPES[key])
            assert batch[B.ACTIONS][B.valid_key(key)].all()
        for row, key in enumerate(batch[B.KEY]):  # actions follow the latent frames
            truth = driving_actions(12, seed=int(key[1:]))
            assert batch[B.ACTIONS]["command"][row].tolist() == [truth["command"][i] for i in indices[row].tolist()]
        starts.update(indices[:, 0].tolist())
    assert len(starts) > 1 and starts <= {0, 1, 2, 3}
    first = LatentDataModule(
        train=str(latent_set), num_frames=5, batch_size=4, num_workers=0, epoch_length=2, train_start="first"
    )
    assert all((b[B.FRAME_INDICES][:, 0] == 0).all() for b in first.train_dataloader())


def test_determinism_and_resume(latent_set):
    def make(seed=1):
        return LatentDataModule(
            train=str(latent_set),
            num_frames=4,
            batch_size=2,
            num_workers=0,
            seed=seed,
            shuffle_buffer=4,
            epoch_length=5,
        )

    a, b = make(), make()
    reference = _signature(a.train_dataloader())
    assert reference == _signature(b.train_dataloader()) and reference != _signature(make(2).train_dataloader())
    a.set_epoch(1)
    assert _signature(a.train_dataloader()) != reference
    interrupted = make()
    seen = []
    for i, batch in enumerate(interrupted.train_dataloader()):
        seen += _signature([batch])
        if i == 1:
            break
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + _signature(resumed.train_dataloader()) == reference  # same clips and same posterior noise


def test_image_embed_and_bad_samples_are_counted(tmp_path):
    meta = VideoMeta(fps=FPS, width=8, height=8, num_frames=3, source="s", actions={"speed": [1.0, 2.0, None]})
    first = np.zeros((8, 8, 3), dtype=np.uint8)
    with ShardWriter(tmp_path / "lat", sample_type="latent") as writer:
        for i in range(2):
            writer.write_latent(
                f"e{i}",
                torch.randn(3, 4, 2, 2),
                torch.rand(3, 4, 2, 2),
                first,
                meta,
                image_embed=torch.full((6,), float(i)),
            )
    with ShardWriter(tmp_path / "bad", sample_type="latent") as writer:
        writer.write_latent(
            "short",
            torch.randn(2, 4, 2, 2),
            torch.rand(2, 4, 2, 2),
            first,
            VideoMeta(fps=FPS, width=8, height=8, num_frames=2, source="s"),
        )
        writer.write_raw("video_json", {"json": meta.to_json().encode()})
        writer.write_raw(
            "no_latents", {"json": dump_json({**__import__("json").loads(meta.to_json()), "sample_type": "latent"})}
        )
    dm = LatentDataModule(
        val=[str(tmp_path / "lat"), str(tmp_path / "bad")], num_frames=3, val_batch_size=4, num_workers=0
    )
    (batch,) = list(dm.val_dataloader())
    assert batch[B.KEY] == ["e0", "e1"]
    assert torch.equal(batch[B.IMAGE_EMBED], torch.tensor([[0.0] * 6, [1.0] * 6]))
    assert batch[B.ACTIONS]["speed_valid"].tolist() == [[True, True, False]] * 2
    counts = dm.skipped_counts()
    assert (counts["too_short"], counts["bad_json"], counts["missing_latents"]) == (1, 1, 1)


def test_constructible_from_a_yaml_recipe(latent_set):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--data", type=LatentDataModule)
    config = parser.parse_string(f"""
data:
  class_path: vdiff.data.latent_datamodule.LatentDataModule
  init_args:
    train: [{{path: {latent_set}, weight: 1.0, name: synth}}]
    num_frames: 6
    train_start: first
    num_workers: 0
""")
    dm = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(config).data
    assert isinstance(dm, LatentDataModule) and dm.train_start == "first" and dm.spec.num_frames == 6


def test_eval_with_workers_reads_every_sample_once(latent_set):
    dm = LatentDataModule(val=str(latent_set), num_frames=12, val_batch_size=3, num_workers=2)
    keys = [k for b in dm.val_dataloader() for k in b[B.KEY]]
    assert sorted(keys) == [f"v{i:04d}" for i in range(8)]


def test_a_diffusion_module_trains_on_latent_batches_without_encoding(latent_set, tiny_ae, monkeypatch):
    from tests.lit.helpers import vdt_module

    module = vdt_module(depth=1, hidden_size=32, num_heads=2, autoencoder=tiny_ae, learn_sigma=False, num_timesteps=10)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the autoencoder must not encode when batches carry latents")

    monkeypatch.setattr(tiny_ae, "encode", no_encoding)
    dm = LatentDataModule(train=str(latent_set), num_frames=4, batch_size=2, num_workers=0, epoch_length=1)
    batch = next(iter(dm.train_dataloader()))
    loss = module.compute_loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and module.net.x_embedder.proj.weight.grad is not None


def test_a_diffusion_module_validates_on_latent_batches(latent_set, tiny_ae):
    """Latent batches carry no video: evaluation scores samples against the decoded posterior mean."""
    from tests.lit.helpers import vdt_module

    module = vdt_module(
        depth=1, hidden_size=32, num_heads=2, autoencoder=tiny_ae, learn_sigma=False, num_timesteps=10, val_steps=2
    )
    dm = LatentDataModule(val=str(latent_set), num_frames=4, val_batch_size=2, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert "video" not in batch
    scores = module.evaluate_protocol_batch(batch, 0)
    assert scores["psnr"].shape == (2,) and all(torch.isfinite(v).all() for v in scores.values())
