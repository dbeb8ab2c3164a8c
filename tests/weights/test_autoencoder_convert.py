"""Autoencoder weight converters: diffusers parity, sgm key manifest, error reporting, weight files."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder, svd_vae_config, tiny_svd_vae_config
from vdiff.weights.autoencoder_convert import ConversionError, from_diffusers, from_sgm, to_diffusers, to_sgm
from vdiff.weights.safetensors_io import load_state_dict, save_state_dict

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 parity bound (the converted models in fact match diffusers bit for bit on CPU)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_sd_vae(block_out_channels, layers_per_block):
    n = len(block_out_channels)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels,
        layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=32,
    ).eval()


def diffusers_svd_vae(block_out_channels, layers_per_block=2):
    model = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, latent_channels=4,
    ).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # fresh temporal parts are near-trivial; make them matter
        for name, p in model.named_parameters():
            if "temporal_res_block" in name or "mix_factor" in name or "time_conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "mix_factor" in name else 0.05))
    return model


def our_config(block_out_channels, layers_per_block, temporal):
    base = dict(ch=block_out_channels[0], ch_mult=tuple(c // block_out_channels[0] for c in block_out_channels),
                num_res_blocks=layers_per_block)
    return svd_vae_config(**base) if temporal else AutoencoderConfig(**base)


CONFIGS = [((32, 64), 1), ((32, 32, 64), 2)]


@pytest.mark.parametrize("block_out_channels,layers_per_block", CONFIGS)
def test_parity_with_diffusers_autoencoder_kl(block_out_channels, layers_per_block):
    torch.manual_seed(0)
    theirs = diffusers_sd_vae(block_out_channels, layers_per_block)
    cfg = our_config(block_out_channels, layers_per_block, temporal=False)
    ours = VideoAutoencoder(cfg).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), strict=True)
    video = torch.rand(2, 3, 3, 32, 32) * 2 - 1  # batch 2, 3 frames
    with torch.no_grad():
        post = ours.encode(video)
        ref = theirs.encode(video.flatten(0, 1)).latent_dist
        torch.testing.assert_close(post.mean.flatten(0, 1), ref.mean, atol=TOL, rtol=0)
        torch.testing.assert_close(post.logvar.flatten(0, 1), ref.logvar, atol=TOL, rtol=0)
        z = post.sample(torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours.decode(z).flatten(0, 1), theirs.decode(z.flatten(0, 1)).sample, atol=TOL, rtol=0)
    # Export back: the diffusers model loads our export strictly and is unchanged.
    exported = to_diffusers(ours.state_dict(), cfg)
    assert set(exported) == set(theirs.state_dict())
    theirs.load_state_dict(exported, strict=True)


@pytest.mark.parametrize("block_out_channels", [(32, 64), (32, 32, 64)])
def test_parity_with_diffusers_temporal_decoder(block_out_channels):
    torch.manual_seed(0)
    theirs = diffusers_svd_vae(block_out_channels)
    cfg = our_config(block_out_channels, 2, temporal=True)
    ours = VideoAutoencoder(cfg).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), strict=True)
    b, t = 2, 4
    video = torch.rand(b, t, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = ours.encode(video)
        ref = theirs.encode(video.flatten(0, 1)).latent_dist
        torch.testing.assert_close(post.mean.flatten(0, 1), ref.mean, atol=TOL, rtol=0)
        torch.testing.assert_close(post.logvar.flatten(0, 1), ref.logvar, atol=TOL, rtol=0)
        z = post.mode()
        # diffusers decodes the (B*T) frames with num_frames=T.
        expected = theirs.decode(z.flatten(0, 1), num_frames=t).sample.unflatten(0, (b, t))
        decoded = ours.decode(z)
        torch.testing.assert_close(decoded, expected, atol=TOL, rtol=0)
        assert (decoded[0] - decoded[1]).abs().max() > 0.01  # batch elements really differ
    exported = to_diffusers(ours.state_dict(), cfg)
    assert set(exported) == set(theirs.state_dict())


def test_diffusers_temporal_decoder_with_one_layer_per_block_is_reported_by_name():
    """diffusers builds the temporal mid block from layers_per_block resnets; 1 lacks the second one."""
    theirs = diffusers_svd_vae((32, 64), layers_per_block=1)
    cfg = our_config((32, 64), 1, temporal=True)
    with pytest.raises(ConversionError) as err:
        from_diffusers(theirs.state_dict(), cfg)
    assert "decoder.mid_block.resnets.1.spatial_res_block.conv1.weight" in str(err.value)
    assert err.value.missing and not err.value.mismatched


def test_diffusers_shape_mismatch_and_leftovers_are_reported_by_name():
    theirs = diffusers_sd_vae((32, 64), 1).state_dict()
    cfg = our_config((32, 64), 1, temporal=False)
    theirs["decoder.conv_in.weight"] = torch.zeros(64, 4, 1, 1)
    theirs["extra.weight"] = torch.zeros(1)
    del theirs["encoder.mid_block.attentions.0.to_q.bias"]
    with pytest.raises(ConversionError) as err:
        from_diffusers(theirs, cfg)
    message = str(err.value)
    assert "decoder.conv_in.weight: checkpoint [64, 4, 1, 1] vs model [64, 4, 3, 3]" in message
    assert "encoder.mid_block.attentions.0.to_q.bias" in message and "extra.weight" in message
    with pytest.raises(ValueError, match="GroupNorm"):
        from_diffusers(theirs, AutoencoderConfig(ch=32, ch_mult=(1, 2), norm="rms"))


# ----------------------------------------------------------------------------- sgm (original SVD checkpoint)


def load_manifest() -> dict:
    text = resources.files("vdiff.weights").joinpath("manifests/sgm_svd_vae_keys.json").read_text()
    return json.loads(text)


def manifest_config(manifest: dict) -> AutoencoderConfig:
    c = manifest["config"]
    return tiny_svd_vae_config(ch=c["ch"], ch_mult=tuple(c["ch_mult"]), num_res_blocks=c["num_res_blocks"],
                               z_channels=c["z_channels"])


def fake_sgm_checkpoint(manifest: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in manifest["keys"].items()}
    # Other parts of a full SVD checkpoint are ignored by from_sgm.
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    sd["conditioner.embedders.3.encoder.encoder.conv_in.weight"] = torch.zeros(3)
    return sd


def test_from_sgm_maps_every_manifest_key_and_loads_strictly():
    manifest = load_manifest()
    assert manifest["repo"] == "Stability-AI/generative-models" and len(manifest["keys"]) > 100
    cfg = manifest_config(manifest)
    source = fake_sgm_checkpoint(manifest)
    converted = from_sgm(source, cfg)
    model = VideoAutoencoder(cfg)
    model.load_state_dict(converted, strict=True)
    # Every manifest tensor is used exactly once (conversion only renames / reshapes views).
    used = {v.data_ptr() for k, v in converted.items() if not k.startswith("quant_conv.")}
    assert used == {source[k].data_ptr() for k in manifest["keys"]}
    assert len(used) == len(manifest["keys"])
    # Semantics spot checks: sgm's decoder.up is highest-resolution first, ours lowest first.
    p = manifest["prefix"]
    assert torch.equal(converted["decoder.up.0.blocks.0.temporal.conv1.weight"],
                       source[p + "decoder.up.1.block.0.time_stack.in_layers.2.weight"])
    assert torch.equal(converted["decoder.up.1.blocks.0.spatial.skip.weight"], source[p + "decoder.up.0.block.0.nin_shortcut.weight"])
    assert torch.equal(converted["decoder.time_conv_out.bias"], source[p + "decoder.conv_out.time_mix_conv.bias"])
    assert torch.equal(converted["encoder.mid.attn.q.weight"], source[p + "encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    # SVD's AutoencodingEngine has no quant_conv: an identity 1x1 conv stands in.
    assert torch.equal(converted["quant_conv.weight"][:, :, 0, 0], torch.eye(8))
    assert torch.equal(converted["quant_conv.bias"], torch.zeros(8))


def test_to_sgm_names_match_the_manifest():
    manifest = load_manifest()
    cfg = manifest_config(manifest)
    exported = to_sgm(VideoAutoencoder(cfg).state_dict(), cfg)
    shapes = {k: list(v.shape) for k, v in exported.items() if not k.endswith(("quant_conv.weight", "quant_conv.bias"))}
    assert shapes == manifest["keys"]


def test_from_sgm_reports_missing_and_mismatched_keys_by_name():
    manifest = load_manifest()
    cfg = manifest_config(manifest)
    p = manifest["prefix"]
    source = fake_sgm_checkpoint(manifest)
    del source[p + "decoder.mid.block_2.time_stack.out_layers.3.weight"]
    source[p + "decoder.mid.block_1.mix_factor"] = torch.zeros(2)
    with pytest.raises(ConversionError) as err:
        from_sgm(source, cfg)
    message = str(err.value)
    assert "decoder.mid.block_2.time_stack.out_layers.3.weight" in message
    assert "decoder.mid.block_1.mix_factor: checkpoint [2] vs model [1]" in message
    # A config that does not fit (3 levels instead of 2) names the keys it expected.
    with pytest.raises(ConversionError, match=r"encoder\.down\.2\.block\.0\.conv1\.weight"):
        from_sgm(fake_sgm_checkpoint(manifest), tiny_svd_vae_config(ch_mult=(1, 2, 2)))


# ----------------------------------------------------------------------------- files


def test_state_dict_files_and_from_pretrained_layouts(tmp_path):
    torch.manual_seed(0)
    theirs = diffusers_svd_vae((32, 64))
    cfg = our_config((32, 64), 2, temporal=True)
    save_state_dict(theirs.state_dict(), tmp_path / "diffusers_vae.safetensors")
    ours = VideoAutoencoder.from_pretrained(tmp_path / "diffusers_vae.safetensors", layout="diffusers", config=cfg)
    # sgm layout inside a Lightning-style {"state_dict": ...} torch checkpoint.
    torch.save({"state_dict": to_sgm(ours.state_dict(), cfg), "global_step": 3}, tmp_path / "svd.ckpt")
    assert set(load_state_dict(tmp_path / "svd.ckpt")) == set(to_sgm(ours.state_dict(), cfg))
    again = VideoAutoencoder.from_pretrained(tmp_path / "svd.ckpt", layout="sgm", config=cfg)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    with pytest.raises(ValueError, match="unknown weights layout"):
        VideoAutoencoder.from_pretrained(tmp_path / "svd.ckpt", layout="ldm")  # type: ignore[arg-type]
    with pytest.raises(ConversionError, match="missing"):
        VideoAutoencoder.from_pretrained(tmp_path / "svd.ckpt", layout="sgm")  # default = full-size SVD config
