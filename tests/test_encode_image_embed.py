"""``vdiff encode --image-encoder``: the CLIP embedding of exactly the stored first frame in every latent sample,
the encoder recorded (path, sha256, config) in sample jsons and manifest, resumes guarded, LatentDataModule batches
carry ``image_embed`` (B, D), and a set embedded by another encoder than the model's is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from tests.data.conftest import write_videos
from vdiff.cli import main as vdiff_main
from vdiff.data import batch as B
from vdiff.data.latent_datamodule import LatentDataModule
from vdiff.data.schema import FIRST_FRAME_EXT, IMAGE_EMBED_EXT, META_EXT, Manifest, VideoMeta
from vdiff.data.shards import expand_shard_spec, iter_raw_samples
from vdiff.data.transforms import normalize_video
from vdiff.encode import ShardEncoder, autoencoder_info, encode_shards, load_image_encoder
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder import save_autoencoder
from vdiff.weights.clip import PretrainedCLIPImageEmbedder

transformers = pytest.importorskip("transformers")

EMBED_DIM = 24


def save_tiny_clip(folder: Path, seed: int) -> Path:
    """A tiny random transformers CLIPVisionModelWithProjection, as save_pretrained writes it."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=EMBED_DIM, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_ae() -> VideoAutoencoder:
    torch.manual_seed(0)
    return VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    write_videos(root / "video", 4, num_frames=8, height=32, width=48, per_shard=2, actions=False)
    return SimpleNamespace(
        root=root,
        video=root / "video",
        clip=save_tiny_clip(root / "clip_a", seed=1),
        other_clip=save_tiny_clip(root / "clip_b", seed=2),
    )


@pytest.fixture(scope="module")
def latent_set(files, tiny_ae):
    encoder, info = load_image_encoder(files.clip)
    shard_encoder = ShardEncoder(tiny_ae, autoencoder_info(tiny_ae, None), clip_frames=4, size=(32, 32),
                                 batch_size=3, image_encoder=encoder, image_info=info)  # fmt: skip
    encode_shards(str(files.video), files.root / "latent", shard_encoder, log=False)
    return files.root / "latent"


def stored_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    return {key: f for shard in expand_shard_spec(str(folder)) for key, f in iter_raw_samples(shard)}


def test_latent_samples_store_the_embedding_of_the_stored_first_frame(files, latent_set):
    model_encoder = PretrainedCLIPImageEmbedder(str(files.clip)).eval()  # what SVDModule's recipe builds
    samples = stored_samples(latent_set)
    assert len(samples) == 8  # 4 videos x 2 clips of 4 frames
    for f in samples.values():
        embed = load_safetensors(f[IMAGE_EMBED_EXT])["embed"]
        assert embed.dtype == torch.float16 and embed.shape == (EMBED_DIM,)
        frame = np.array(Image.open(io.BytesIO(f[FIRST_FRAME_EXT])))  # exactly what the data modules read
        with torch.no_grad():
            direct = model_encoder(normalize_video(torch.from_numpy(frame).permute(2, 0, 1))[None])[0, 0]
        torch.testing.assert_close(embed.float(), direct, rtol=1e-3, atol=1e-3)  # fp16 storage
        info = VideoMeta.from_json(f[META_EXT]).extra["image_embed"]
        assert info["sha256"] == model_encoder.weights_sha256 and info["path"] == model_encoder.weights_path
        assert info["config"] == model_encoder.config.to_dict() and info["embed_dim"] == EMBED_DIM
        assert info["layout"] == "transformers" and info["frame"] == "first_frame"
    manifest = Manifest.load(latent_set)
    assert manifest.extra["image_embed"] == info and manifest.schema_version == 2
    # the first frames of the two clips of a video differ, and so do their embeddings
    a, b = (load_safetensors(samples[f"v0000/clip{j}"][IMAGE_EMBED_EXT])["embed"] for j in (0, 1))
    assert not torch.equal(a, b)


def test_latent_batches_carry_image_embed(latent_set):
    samples = stored_samples(latent_set)
    dm = LatentDataModule(val=str(latent_set), num_frames=2, val_batch_size=3, num_workers=0)
    seen = 0
    for batch in dm.val_dataloader():
        n = len(batch[B.KEY])
        assert batch[B.IMAGE_EMBED].shape == (n, EMBED_DIM) and batch[B.IMAGE_EMBED].dtype == torch.float32
        for key, row in zip(batch[B.KEY], batch[B.IMAGE_EMBED]):
            assert torch.equal(row, load_safetensors(samples[key][IMAGE_EMBED_EXT])["embed"].float())
        seen += n
    assert seen == 8
    train = LatentDataModule(train=str(latent_set), num_frames=2, batch_size=4, num_workers=0, epoch_length=1)
    assert next(iter(train.train_dataloader()))[B.IMAGE_EMBED].shape == (4, EMBED_DIM)


def test_a_set_embedded_by_another_encoder_is_refused_at_setup(files, latent_set, tiny_ae, tmp_path):
    same = PretrainedCLIPImageEmbedder(str(files.clip))
    other = PretrainedCLIPImageEmbedder(str(files.other_clip))
    dm = LatentDataModule(train=str(latent_set), val=str(latent_set), num_frames=2, num_workers=0)
    assert dm.image_embed_info("train")["sha256"] == same.weights_sha256
    dm.check_image_encoder(same)
    dm.check_image_encoder(None)  # a model without an encoder of its own uses the stored embeddings
    with pytest.raises(ValueError, match=r"another image encoder.*differing: sha256.*clip_b"):
        dm.check_image_encoder(other)
    from vdiff.models.conditioners import CLIPImageEmbedder

    with pytest.raises(ValueError, match="not read from a file"):  # a random in-code encoder is not the file's
        dm.check_image_encoder(CLIPImageEmbedder(same.config))
    # Through Lightning's setup: the model being trained is asked for its image_encoder.
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(image_encoder=other), global_rank=0, world_size=1)
    with pytest.raises(ValueError, match="another image encoder"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(image_encoder=same), global_rank=0, world_size=1)
    dm.setup("fit")
    # Two sets embedded by different encoders cannot be mixed.
    encoder, info = load_image_encoder(files.other_clip)
    encode_shards(str(files.video), tmp_path / "other",
                  ShardEncoder(tiny_ae, autoencoder_info(tiny_ae, None), clip_frames=4, size=(32, 32),
                               image_encoder=encoder, image_info=info), log=False)  # fmt: skip
    mixed = LatentDataModule(train=[str(latent_set), str(tmp_path / "other")], num_frames=2, num_workers=0)
    with pytest.raises(ValueError, match="store image embeddings of different encoders"):
        mixed.image_embed_info("train")


def test_cli_image_encoder_resume_and_guard(files, tiny_ae, tmp_path, capsys):
    weights = tmp_path / "ae.safetensors"
    save_autoencoder(tiny_ae, weights)
    out = tmp_path / "lat"
    args = ["encode", "--input", str(files.video), "--out", str(out), "--weights", str(weights),
            "--clip-frames", "8", "--size", "32", "--device", "cpu"]  # fmt: skip
    assert vdiff_main([*args, "--image-encoder", str(files.clip)]) == 0
    printed = capsys.readouterr().out
    assert f"image embeddings ({EMBED_DIM}-d) by" in printed and "encoded 2 shard(s)" in printed
    assert all(IMAGE_EMBED_EXT in f for f in stored_samples(out).values())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert vdiff_main([*args, "--image-encoder", str(files.clip)]) == 0  # resume: nothing left to do
    assert "skipped 2 already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps
    with pytest.raises(ValueError, match=r"image encoder .*clip_a.* this run has image encoder .*clip_b"):
        vdiff_main([*args, "--image-encoder", str(files.other_clip)])
    with pytest.raises(ValueError, match="this run has no image encoder"):
        vdiff_main(args)
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        vdiff_main([*args[:4], str(tmp_path / "new"), *args[5:], "--image-encoder", str(tmp_path / "missing_clip")])
    with pytest.raises(ValueError, match="need --image-encoder"):
        vdiff_main([*args, "--image-encoder-layout", "open_clip"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["image_embed"]["path"] == str((files.clip / "model.safetensors").absolute())


def test_svd_conditions_from_stored_embeddings_equal_its_own_encoder(files, latent_set, tiny_ae):
    """SVDModule with the same file-backed encoder: the stored embedding gives the context its own CLIP gives."""
    from vdiff.lit.svd import SVDModule
    from vdiff.models.unet_svd import UNetSVDConfig

    net = UNetSVDConfig(in_channels=8, out_channels=4, concat_channels=4, model_channels=32, channel_mult=(1,),
                        num_res_blocks=1, attention_levels=(0,), head_dim=16, context_dim=EMBED_DIM,
                        added_time_embed_dim=32, num_frames=2)  # fmt: skip
    module = SVDModule(net=net, image_encoder=PretrainedCLIPImageEmbedder(str(files.clip)), autoencoder=tiny_ae)
    dm = LatentDataModule(val=str(latent_set), num_frames=2, val_batch_size=4, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    stored = module.conditioning(batch)["context"]
    without = {k: v for k, v in batch.items() if k != B.IMAGE_EMBED}
    own = module.conditioning(without)["context"]
    assert stored.shape == own.shape == (4, 1, EMBED_DIM)
    torch.testing.assert_close(stored, own, rtol=1e-3, atol=1e-3)


def test_lightning_fit_refuses_a_model_with_another_image_encoder(files, latent_set, tiny_ae, tmp_path):
    """Through a real Trainer: the check runs in LatentDataModule.setup, before the first step."""
    from lightning.pytorch import Trainer

    from vdiff.lit.svd import SVDModule
    from vdiff.models.unet_svd import UNetSVDConfig

    net = UNetSVDConfig(in_channels=8, out_channels=4, concat_channels=4, model_channels=32, channel_mult=(1,),
                        num_res_blocks=1, attention_levels=(0,), head_dim=16, context_dim=EMBED_DIM,
                        added_time_embed_dim=32, num_frames=2)  # fmt: skip

    def fit(clip_folder: Path) -> Trainer:
        module = SVDModule(net=net, image_encoder=PretrainedCLIPImageEmbedder(str(clip_folder)), autoencoder=tiny_ae)
        dm = LatentDataModule(train=str(latent_set), num_frames=2, batch_size=2, num_workers=0, epoch_length=1)
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(module, datamodule=dm)
        return trainer

    with pytest.raises(ValueError, match=r"another image encoder.*clip_b"):
        fit(files.other_clip)
    assert fit(files.clip).global_step == 1
