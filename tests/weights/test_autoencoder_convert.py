"""Autoencoder weight converters: diffusers parity both ways (outputs compared), sgm key manifest, error reporting.

Folders and files (``load_autoencoder`` / ``save_autoencoder``) are in ``test_autoencoder_files.py``; outputs of
the sgm converter against sgm's own code in ``test_sgm_golden.py``."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from tests.weights.helpers import diffusers_kl, diffusers_temporal, perturb_
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder_convert import ConversionError, from_diffusers, from_sgm, to_diffusers, to_sgm

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 parity bound (the converted models in fact match diffusers bit for bit on CPU)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_sd_vae(block_out_channels, layers_per_block, seed=0):
    return diffusers_kl(diffusers, block_out_channels, layers_per_block, seed=seed)


def diffusers_svd_vae(block_out_channels, layers_per_block=2, seed=0):
    return diffusers_temporal(diffusers, block_out_channels, layers_per_block, seed=seed)


def our_config(block_out_channels, layers_per_block, temporal):
    base = dict(ch=block_out_channels[0], ch_mult=tuple(c // block_out_channels[0] for c in block_out_channels),
                num_res_blocks=layers_per_block)
    return AutoencoderConfig.from_name("svd", **base) if temporal else AutoencoderConfig(**base)


def tiny_svd_vae_config(**overrides) -> AutoencoderConfig:
    return AutoencoderConfig.from_name("tiny-svd", **overrides)


def assert_same_outputs(ours: VideoAutoencoder, theirs, video: torch.Tensor) -> None:
    """Posterior mean / log-variance and decoded frames of ``ours`` and a diffusers model agree within TOL."""
    b, t = video.shape[:2]
    temporal = isinstance(theirs, diffusers.AutoencoderKLTemporalDecoder)
    with torch.no_grad():
        post = ours.encode(video)
        ref = theirs.encode(video.flatten(0, 1)).latent_dist
        torch.testing.assert_close(post.mean.flatten(0, 1), ref.mean, atol=TOL, rtol=0)
        torch.testing.assert_close(post.logvar.flatten(0, 1), ref.logvar, atol=TOL, rtol=0)
        z = post.mode()
        expected = theirs.decode(z.flatten(0, 1), **({"num_frames": t} if temporal else {})).sample
        torch.testing.assert_close(ours.decode(z), expected.unflatten(0, (b, t)), atol=TOL, rtol=0)


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
    # Export back: a fresh diffusers model (other weights) loads our export strictly and then holds every
    # tensor of the original, value for value.
    exported = to_diffusers(ours.state_dict(), cfg)
    assert set(exported) == set(theirs.state_dict())
    fresh = diffusers_sd_vae(block_out_channels, layers_per_block, seed=5)
    fresh.load_state_dict(exported, strict=True)
    for name, value in theirs.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


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
    fresh = diffusers_svd_vae(block_out_channels, seed=5)
    fresh.load_state_dict(exported, strict=True)
    for name, value in theirs.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@pytest.mark.parametrize("temporal", [False, True], ids=["AutoencoderKL", "AutoencoderKLTemporalDecoder"])
def test_export_of_our_own_model_computes_the_same_in_diffusers(temporal):
    """Export alone, from OUR weights (not a diffusers round trip, where a name swap shared by import and
    export would cancel out): diffusers, loading the export, encodes and decodes like ours. A q/k (or any
    other) swap in the export changes its outputs and fails here."""
    cfg = our_config((32, 64), 2 if temporal else 1, temporal)
    torch.manual_seed(3)
    ours = perturb_(VideoAutoencoder(cfg), seed=4).eval()
    theirs = diffusers_svd_vae((32, 64), seed=9) if temporal else diffusers_sd_vae((32, 64), 1, seed=9)
    theirs.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    assert_same_outputs(ours, theirs, torch.rand(1, 3, 3, 16, 16) * 2 - 1)


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


def test_to_sgm_names_match_the_manifest_and_round_trip_every_value():
    manifest = load_manifest()
    cfg = manifest_config(manifest)
    source = fake_sgm_checkpoint(manifest)
    model = VideoAutoencoder(cfg)
    model.load_state_dict(from_sgm(source, cfg), strict=True)
    exported = to_sgm(model.state_dict(), cfg)
    # SVD's AutoencodingEngine has no quant_conv / post_quant_conv: the identity stand-ins are dropped again.
    assert {k: list(v.shape) for k, v in exported.items()} == manifest["keys"]
    for name, value in exported.items():
        assert torch.equal(value, source[name]), name
    # A quant_conv that is not the identity has no place in sgm's engine: refused by name.
    with torch.no_grad():
        model.quant_conv.weight.mul_(2)
    with pytest.raises(ValueError, match="quant_conv is not the identity"):
        to_sgm(model.state_dict(), cfg)
    # sgm's modules hard-code 32 GroupNorm groups.
    with pytest.raises(ValueError, match="32 GroupNorm groups; config.norm_num_groups=16"):
        from_sgm(source, tiny_svd_vae_config(norm_num_groups=16))


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
