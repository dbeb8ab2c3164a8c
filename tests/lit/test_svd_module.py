"""SVDModule: conditioning from data, guidance, parameter groups, training lowers the loss, lean
checkpoints with a file-backed image encoder, and the tiny recipe through `vdiff fit`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tests.lit.helpers import quiet_trainer, tiny_synthetic_data
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.cli import main
from vdiff.diffusion.guidance import LinearCFG, VanillaCFG, guided_call
from vdiff.lit.optim import OptimizerSettings
from vdiff.lit.svd import MOTION_SCORE, SVDConditioning, SVDModule
from vdiff.models.conditioners import CLIPImageEmbedder, CLIPImageEmbedderConfig
from vdiff.models.unet_svd import UNetSVDConfig

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "svd_tiny.yaml"
NET = UNetSVDConfig(in_channels=6, out_channels=3, concat_channels=3, model_channels=32, channel_mult=(1, 2),
                    num_res_blocks=1, attention_levels=(1,), head_dim=16, context_dim=24, added_time_embed_dim=32,
                    num_frames=4)


def tiny_svd(**kwargs) -> SVDModule:
    kwargs.setdefault("image_encoder", CLIPImageEmbedder("tiny"))
    kwargs.setdefault("sampler", SVDModule.svd_sampler(steps=3))
    module = SVDModule(net=kwargs.pop("net", NET), **kwargs)
    module.configure_model()
    with torch.no_grad():  # random weights everywhere (zero-initialised outputs would hide every path)
        g = torch.Generator().manual_seed(0)
        for p in module.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def clip_batch(batch: int = 2, frames: int = 4, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    video = torch.nn.functional.avg_pool2d(torch.rand(batch * frames, 3, size, size, generator=g) * 2 - 1, 3, 1, 1)
    return {"video": video.view(batch, frames, 3, size, size), "fps": torch.tensor([7.0, 11.0][:batch]),
            "key": [f"c{i}" for i in range(batch)]}


def test_conditions_come_from_the_chosen_frame_and_the_data():
    module = tiny_svd(conditioning=SVDConditioning(frame=1, cond_aug=0.0))
    batch = clip_batch()
    batch[MOTION_SCORE] = torch.tensor([float("nan"), 64.0])
    cond = module.conditioning(batch)
    assert set(cond) == {"context", "concat", "added_time_ids"}
    # concat: the (unscaled) posterior mode of frame 1 - pixel space: frame 1 itself - on every frame
    assert torch.equal(cond["concat"], batch["video"][:, 1:2].expand(-1, 4, -1, -1, -1))
    assert torch.allclose(cond["context"], module.image_encoder(batch["video"][:, 1]))
    fps_id, bucket, cond_aug = cond["added_time_ids"].unbind(1)
    assert fps_id.tolist() == [6.0, 10.0]  # fps - 1
    assert bucket[0] == 127 and bucket[1] == module.motion_buckets(torch.tensor([64.0]))[0] == 255
    assert cond_aug.tolist() == [0.0, 0.0]
    fixed = tiny_svd(conditioning=SVDConditioning(fps_id=5, motion_bucket_id=40))
    assert fixed.conditioning(batch)["added_time_ids"][:, :2].tolist() == [[5.0, 40.0], [5.0, 40.0]]


def test_training_dropout_zeroes_whole_conditions_per_clip():
    module = tiny_svd(conditioning=SVDConditioning(drop_image=1.0, drop_concat=0.0))
    cond = module.training_conditioning(clip_batch())
    assert not cond["context"].any() and cond["concat"].abs().sum() > 0
    assert torch.equal(module.unconditional(cond)["concat"], torch.zeros_like(cond["concat"]))
    assert "added_time_ids" not in module.unconditional(cond)  # shared by both CFG branches


def test_guidance_scale_one_equals_the_conditional_model_and_linear_cfg_goes_frame_by_frame():
    module = tiny_svd()
    batch = clip_batch()
    cond = module.conditioning(batch, torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    level = torch.tensor([0.1, -0.3])
    plain = module.net(x, level, cond)
    torch.testing.assert_close(guided_call(module.net, x, level, cond, module.unconditional(cond), None, VanillaCFG(1.0)),
                               plain, atol=1e-5, rtol=1e-5)
    uncond = module.net(x, level, {**cond, **module.unconditional(cond)})
    guided = guided_call(module.net, x, level, cond, module.unconditional(cond), None, LinearCFG(1.0, 2.5))
    for t, s in enumerate([1.0, 1.5, 2.0, 2.5]):
        torch.testing.assert_close(guided[:, t], uncond[:, t] + s * (plain[:, t] - uncond[:, t]), atol=1e-4, rtol=1e-4)
    # Sampling with CFG at scale 1 is sampling the conditional model.
    a = tiny_svd(guidance=VanillaCFG(1.0))
    b = tiny_svd(guidance=VanillaCFG(1.0))
    b.guidance = None
    b.load_state_dict(a.state_dict())
    sa = a.generate(batch, generator=torch.Generator().manual_seed(3)).video
    sb = b.generate(batch, generator=torch.Generator().manual_seed(3)).video
    torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)


def test_generate_generates_the_conditioning_frame_unless_pasted(monkeypatch):
    import vdiff.lit.base

    batch = clip_batch()
    masks = []
    original = vdiff.lit.base.sample

    def spy(*args, **kwargs):
        masks.append(kwargs["given_mask"])
        return original(*args, **kwargs)

    monkeypatch.setattr(vdiff.lit.base, "sample", spy)
    module = tiny_svd()
    out = module.generate(batch, generator=torch.Generator().manual_seed(0))
    assert len(masks) == 1 and masks[0] is None  # the sampler generates every frame, the conditioning frame too
    assert out.given_frames[:, 0].all() and not out.given_frames[:, 1:].any()
    assert torch.equal(out.video[:, 0], batch["video"][:, 0])  # shown exactly, scored nowhere
    pasted = tiny_svd(paste_cond_frame=True)
    assert pasted.generate(batch).video.shape == batch["video"].shape
    assert masks[1] is not None and masks[1][:, 0].all() and not masks[1][:, 1:].any()  # the frame given, pasted


def test_parameter_groups_follow_the_recipe():
    module = tiny_svd(train="temporal", optimizer=OptimizerSettings(lr=1e-3))
    groups = module.parameter_groups()
    params = [p for g in groups for p in g["params"]]
    names = {id(p): n for n, p in module.net.named_parameters()}
    assert params and all(module.net.is_temporal_parameter(names[id(p)]) for p in params)
    assert all(not p.requires_grad for n, p in module.net.named_parameters() if not module.net.is_temporal_parameter(n))
    assert not any(p.requires_grad for p in module.image_encoder.parameters())
    scaled = tiny_svd(spatial_lr_scale=0.1, optimizer=OptimizerSettings(lr=1e-3))
    lrs = {g["name"]: g["lr"] for g in scaled.parameter_groups()}
    assert lrs["spatial"] == pytest.approx(1e-4) and lrs["temporal"] == pytest.approx(1e-3)
    every = {id(p) for g in scaled.parameter_groups() for p in g["params"]}
    assert every == {id(p) for p in scaled.net.parameters()}  # the whole UNet, nothing frozen, nothing else


def test_channels_and_context_width_are_checked():
    from vdiff.models.autoencoder import IdentityAutoencoder

    # A given autoencoder is checked at once (without one, when the network is built or a checkpoint restored its
    # autoencoder: tests/test_lean_checkpoints.py).
    with pytest.raises(ValueError, match="in_channels=6"):
        SVDModule(net=NET.replace(in_channels=8), image_encoder=CLIPImageEmbedder("tiny"), autoencoder=IdentityAutoencoder())
    with pytest.raises(ValueError, match="24-d embeddings"):
        SVDModule(net=NET.replace(context_dim=32), image_encoder=CLIPImageEmbedder("tiny"))


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    module = tiny_svd(optimizer=OptimizerSettings(lr=3e-3))
    batch = clip_batch(batch=2, seed=5)
    optimizer = torch.optim.AdamW([p for g in module.parameter_groups() for p in g["params"]], lr=3e-3)
    sigma, noise = torch.tensor([1.0, 3.0]), torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(9))

    def fixed_loss() -> float:
        with torch.no_grad():
            x0 = module.batch_latents(batch)
            return float(module.diffusion.training_losses(module.net, x0, module.conditioning(batch), None, noise=noise,
                                                          sigma=sigma)["loss"])

    before = fixed_loss()
    for _ in range(25):
        loss = module.compute_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * before


def test_file_backed_image_encoder_is_recorded_not_stored(tmp_path):
    from vdiff.weights.clip import PretrainedCLIPImageEmbedder

    pytest.importorskip("transformers")  # a transformers CLIPVisionModelWithProjection folder is the weights file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPImageEmbedderConfig.from_name("tiny")
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.embed_dim, hidden_act=cfg.act,
        layer_norm_eps=cfg.norm_eps))
    hf.save_pretrained(tmp_path / "image_encoder")
    encoder = PretrainedCLIPImageEmbedder(str(tmp_path / "image_encoder"))
    module = tiny_svd(image_encoder=encoder)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("conditioner.image_embedder.") for k in checkpoint["state_dict"])
    assert checkpoint["vdiff_image_encoder"]["sha256"] == encoder.weights_sha256
    fresh = SVDModule(net=NET, image_encoder=None, sampler=SVDModule.svd_sampler(3))
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    frame = clip_batch()["video"][:, 0]
    torch.testing.assert_close(fresh.image_encoder(frame), encoder(frame))


def test_tiny_recipe_trains_and_reloads(tmp_path):
    args = ["fit", "-c", str(RECIPE), *tiny_synthetic_data(tmp_path / "cache", frames=4),
            "--data.init_args.size", "16", "--data.init_args.video_size", "16", "--model.init_args.net.num_frames", "4",
            *quiet_trainer(tmp_path / "runs")]
    main(args)
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    module = load_module(str(checkpoint))
    assert isinstance(module, SVDModule) and isinstance(module.image_encoder, CLIPImageEmbedder)
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    video = module.generate(clip_batch(batch=1, size=16)).video
    assert video.shape == (1, 4, 3, 16, 16) and torch.isfinite(video).all()


def test_net_weights_start_a_fresh_fit_and_are_checked_up_front(tmp_path):
    from vdiff.weights.unet_svd import save_unet_svd

    source = tiny_svd()
    path = save_unet_svd(source.net, tmp_path / "unet.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        SVDModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), net_weights=str(tmp_path / "nowhere.safetensors"))
    module = SVDModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), net_weights=str(path))
    module.configure_model()  # no trainer: a checkpoint load path, the file is not read
    assert not torch.equal(module.net.conv_in.weight, source.net.conv_in.weight)
    module.load_net_weights()
    for name, value in source.net.state_dict().items():
        assert torch.equal(module.net.state_dict()[name], value), name


def test_a_fresh_fit_loads_net_weights(tmp_path):
    import lightning as L

    from vdiff.weights.unet_svd import save_unet_svd

    source = tiny_svd()
    path = save_unet_svd(source.net, tmp_path / "unet.safetensors")
    module = SVDModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), net_weights=str(path), optimizer=OptimizerSettings(lr=0.0))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([clip_batch()], batch_size=None))
    for name, value in source.net.state_dict().items():
        assert torch.equal(module.net.state_dict()[name], value), name  # lr 0: still the file's weights


def test_vdiff_export_writes_the_unet_in_the_sgm_layout(tmp_path):
    import lightning as L

    from vdiff.export import export
    from vdiff.weights.unet_svd import read_unet_svd

    module = SVDModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"), sampler=SVDModule.svd_sampler(2))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([clip_batch()], batch_size=None))
    trainer.save_checkpoint(tmp_path / "svd.ckpt")
    (written,) = export(tmp_path / "svd.ckpt", tmp_path / "unet_sgm.safetensors", layout="sgm")
    weights = read_unet_svd(written, layout="sgm", config=NET)
    for name, value in module.net.state_dict().items():
        assert torch.equal(weights.state_dict[name], value), name
    with pytest.raises(ValueError, match="has no diffusers layout"):
        from tests.lit.helpers import vdt_module

        vdt = vdt_module(patch_size=8, depth=1, hidden_size=32, num_heads=2, configure=False)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(vdt, train_dataloaders=torch.utils.data.DataLoader([clip_batch()], batch_size=None))
        trainer.save_checkpoint(tmp_path / "vdt.ckpt")
        export(tmp_path / "vdt.ckpt", tmp_path / "vdt_folder", layout="diffusers")


def test_validation_decodes_in_overlapping_temporal_chunks():
    from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder

    ae = VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd")).eval()
    with torch.no_grad():  # random temporal layers, so that what a chunk sees matters
        g = torch.Generator().manual_seed(1)
        for p in ae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net = NET.replace(in_channels=8, out_channels=4, concat_channels=4)
    module = SVDModule(net=net, image_encoder=CLIPImageEmbedder("tiny"), autoencoder=ae, decode_chunk=2,
                       decode_overlap=1)
    latents = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    chunked = ae.decode(latents / module.latent_scale, chunk_size=2, overlap=1).clamp(-1, 1)
    torch.testing.assert_close(module.decode_latents(latents), chunked)
    whole = ae.decode(latents / module.latent_scale).clamp(-1, 1)
    assert not torch.allclose(chunked, whole)  # the temporal decoder sees only its chunk: chunking is real
    with pytest.raises(ValueError, match="decode_overlap"):
        SVDModule(net=net, image_encoder=CLIPImageEmbedder("tiny"), autoencoder=ae, decode_chunk=2, decode_overlap=2)


def test_a_moved_image_encoder_is_found_under_vdiff_weights(tmp_path, monkeypatch):
    import shutil

    from vdiff.weights.clip import PretrainedCLIPImageEmbedder

    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPImageEmbedderConfig.from_name("tiny")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.embed_dim, hidden_act=cfg.act, layer_norm_eps=cfg.norm_eps,
    )).save_pretrained(tmp_path / "image_encoder")
    module = tiny_svd(image_encoder=PretrainedCLIPImageEmbedder(str(tmp_path / "image_encoder")))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    shutil.move(str(tmp_path / "image_encoder"), str(tmp_path / "elsewhere"))
    fresh = SVDModule(net=NET, image_encoder=None)
    fresh.configure_model()
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="image encoder weights"):
        fresh.on_load_checkpoint(dict(checkpoint))
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "elsewhere"))
    fresh.on_load_checkpoint(checkpoint)
    frame = clip_batch()["video"][:, 0]
    torch.testing.assert_close(fresh.image_encoder(frame), module.image_encoder(frame))


# ---------------------------------------------------------------- weight decay, cond_aug draws, lean checkpoints

EMBEDDING_MLP = re.compile(r"(^|.*\.)(time_embed|added_time_embed|frame_embed)\.")  # the UNet's embedding MLPs


def test_weight_decay_reaches_matrices_but_not_embeddings_biases_or_norms():
    module = tiny_svd(spatial_lr_scale=0.5, optimizer=OptimizerSettings(lr=1e-3, weight_decay=0.1))
    decay_of = {id(p): g["weight_decay"] for g in module.parameter_groups() for p in g["params"]}
    names = dict(module.net.named_parameters())
    decayed = {n for n, p in names.items() if decay_of[id(p)] == 0.1}
    assert {n for n, p in names.items() if decay_of[id(p)] not in (0.0, 0.1)} == set()
    expected = {n for n, p in names.items() if p.ndim >= 2 and not EMBEDDING_MLP.match(n)}
    assert decayed == expected
    embeddings = {"time_embed.mlp.0.weight", "added_time_embed.mlp.2.weight", "down.1.attn.0.frame_embed.0.weight"}
    assert embeddings <= set(names) and not embeddings & decayed  # embedding matrices: no decay
    assert {"conv_in.weight", "down.1.attn.0.proj_in.weight"} <= decayed
    assert not any(n.endswith(".bias") or ".norm" in n for n in decayed)


def test_training_cond_aug_is_log_normal_with_the_recipes_mean_and_std():
    module = tiny_svd(conditioning=SVDConditioning(cond_aug_lognormal=(-3.0, 0.5), drop_image=0.0, drop_concat=0.0),
                      image_encoder=None)
    n = 4000  # latent-shard clips (first frame + CLIP embedding): no CLIP runs, the frames are tiny
    batch = {"latents": torch.zeros(n, 2, 3, 4, 4), "first_frame": torch.zeros(n, 3, 4, 4),
             "image_embed": torch.zeros(n, 24), "fps": torch.full((n,), 7.0)}
    torch.manual_seed(0)
    cond_aug = module.training_conditioning(batch)["added_time_ids"][:, 2]
    assert bool((cond_aug > 0).all())
    log = cond_aug.double().log()
    assert float(log.mean()) == pytest.approx(-3.0, abs=0.03) and float(log.std()) == pytest.approx(0.5, abs=0.02)
    assert float(cond_aug.median()) == pytest.approx(math.exp(-3.0), rel=0.05)  # a log-normal's median: exp(mean)
    torch.manual_seed(1)
    assert not torch.equal(module.training_conditioning(batch)["added_time_ids"][:, 2], cond_aug)  # drawn per step


def write_tiny_clip_folder(folder: Path) -> Path:
    """A transformers CLIPVisionModelWithProjection folder of the tiny CLIP's shape (random weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPImageEmbedderConfig.from_name("tiny")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.embed_dim, hidden_act=cfg.act, layer_norm_eps=cfg.norm_eps,
    )).save_pretrained(folder)
    return folder


def test_a_lean_checkpoint_refuses_an_image_encoder_without_its_weights_file(tmp_path):
    """The checkpoint recorded a file-backed image encoder (path + sha256, its weights left out): a module given an
    encoder built without that file (random weights, no sha256) must not be filled with it silently."""
    from vdiff.weights.clip import PretrainedCLIPImageEmbedder

    pytest.importorskip("transformers")
    encoder = PretrainedCLIPImageEmbedder(str(write_tiny_clip_folder(tmp_path / "image_encoder")))
    module = tiny_svd(image_encoder=encoder)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["vdiff_image_encoder"]["sha256"] == encoder.weights_sha256
    unfiled = SVDModule(net=NET, image_encoder=CLIPImageEmbedder("tiny"))
    with pytest.raises(ValueError, match="image encoder"):
        unfiled.on_load_checkpoint(dict(checkpoint, state_dict=dict(checkpoint["state_dict"])))
    same = SVDModule(net=NET, image_encoder=PretrainedCLIPImageEmbedder(str(tmp_path / "image_encoder")))
    same.on_load_checkpoint(checkpoint)  # the same file: accepted, its weights put back
    assert all(torch.equal(checkpoint["state_dict"][f"conditioner.image_embedder.{k}"], v)
               for k, v in encoder.state_dict().items())
