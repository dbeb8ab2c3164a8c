"""KL video autoencoder: presets, contract, chunked / tiled decoding, posterior, norms, identity.

Weight files (reading, writing, diffusers / sgm layouts) are tested in ``tests/weights/``."""

from __future__ import annotations

import pytest
import torch

from vdiff.models.autoencoder import (
    AUTOENCODER_CONFIGS,
    AutoencoderConfig,
    DiagonalGaussian,
    IdentityAutoencoder,
    VideoAutoencoder,
    window_starts,
)
from vdiff.nn.norms import ChannelLayerNorm, ChannelRMSNorm, NormSpec, make_norm


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run fastest single-threaded (and do not fight other test processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_temporal(model: VideoAutoencoder, seed: int = 1) -> VideoAutoencoder:
    """Give the temporal parts non-trivial weights (fresh ones start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".temporal." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "mix_factor" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "time_conv_out.weight" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def smooth_latents(batch: int, frames: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Latents that move smoothly over time: a linear path between two random latents, ``(B, T, 4, s, s)``."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, batch, 1, 4, size, size, generator=g)
    w = torch.linspace(0, 1, frames).view(1, frames, 1, 1, 1)
    return a * (1 - w) + b * w


def seam_jump(video: torch.Tensor, full: torch.Tensor) -> float:
    """The largest extra frame-to-frame jump a chunked decode adds, relative to the content's own motion:
    max_t mean|(x_t - x_{t-1}) - (full_t - full_{t-1})| / mean|full_t - full_{t-1}|. Seams at chunk
    boundaries show up as this maximum."""
    d_out, d_full = video[:, 1:] - video[:, :-1], full[:, 1:] - full[:, :-1]
    extra = (d_out - d_full).abs().mean(dim=(0, 2, 3, 4))  # (T-1,)
    return (extra.max() / d_full.abs().mean()).item()


# ----------------------------------------------------------------------------- presets


# Parameter counts measured on the meta device. sd and svd equal diffusers' AutoencoderKL (SD 2.1 /
# sd-vae-ft-mse sizes) and AutoencoderKLTemporalDecoder (SVD sizes) built the same way (checked once by
# hand; the diffusers parity tests in tests/weights/ check every tensor).
PRESET_PARAMETERS = {"sd": 83_653_863, "svd": 97_742_847, "tiny": 658_375, "tiny-svd": 770_903}


@pytest.mark.parametrize("name", sorted(AUTOENCODER_CONFIGS))
def test_every_preset_builds_on_meta_with_its_recorded_parameter_count(name):
    assert name in PRESET_PARAMETERS, f"record the parameter count of the new preset {name!r}"
    with torch.device("meta"):
        model = VideoAutoencoder(AutoencoderConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PRESET_PARAMETERS[name]
    assert not list(model.buffers())
    assert model.config == AUTOENCODER_CONFIGS[name] and model.config is not AUTOENCODER_CONFIGS[name]


def test_presets_are_the_documented_architectures():
    sd, svd = AUTOENCODER_CONFIGS["sd"], AUTOENCODER_CONFIGS["svd"]
    assert (sd.ch, sd.ch_mult, sd.num_res_blocks, sd.z_channels, sd.norm_num_groups) == (128, (1, 2, 4, 4), 2, 4, 32)
    assert (sd.decoder, sd.scale_factor, sd.shift_factor, sd.use_post_quant_conv) == ("2d", 0.18215, 0.0, True)
    assert (svd.decoder, svd.use_quant_conv, svd.use_post_quant_conv) == ("temporal", True, False)
    assert {k: v for k, v in svd.to_dict().items() if k not in ("decoder", "use_post_quant_conv")} == {
        k: v for k, v in sd.to_dict().items() if k not in ("decoder", "use_post_quant_conv")
    }
    tiny_svd = AUTOENCODER_CONFIGS["tiny-svd"]
    assert (tiny_svd.ch, tiny_svd.ch_mult, tiny_svd.num_res_blocks, tiny_svd.decoder) == (32, (1, 2), 1, "temporal")


def test_from_name_copies_and_overrides_and_names_what_is_wrong():
    config = AutoencoderConfig.from_name("svd", z_channels=8, ch_mult=[1, 2])
    assert (config.z_channels, config.ch_mult, config.decoder) == (8, (1, 2), "temporal")
    assert AUTOENCODER_CONFIGS["svd"].z_channels == 4  # the table is untouched
    with pytest.raises(ValueError, match=r"unknown name 'sdxl'.*\['sd', 'svd', 'tiny', 'tiny-svd'\]"):
        AutoencoderConfig.from_name("sdxl")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['channels'\]"):
        AutoencoderConfig.from_name("tiny", channels=64)
    with pytest.raises(ValueError, match="unknown fields"):
        AutoencoderConfig.from_dict({"ch": 32, "channels": 3})


def test_norm_num_groups_sets_every_group_norm_and_is_checked():
    model = VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd", norm_num_groups=16))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 20 and {m.num_groups for m in norms} == {16}
    assert {m.num_groups for m in VideoAutoencoder(AutoencoderConfig.from_name("tiny")).modules()
            if isinstance(m, torch.nn.GroupNorm)} == {32}
    with pytest.raises(ValueError, match=r"norm_num_groups=24 does not divide the channel counts \[32, 64\]"):
        AutoencoderConfig.from_name("tiny", norm_num_groups=24)
    AutoencoderConfig.from_name("tiny", norm="rms", norm_num_groups=24)  # groups only matter for GroupNorm
    assert make_norm(NormSpec("group", 8), 16).num_groups == 8
    assert isinstance(make_norm(NormSpec("rms", 8), 12), ChannelRMSNorm)


# ----------------------------------------------------------------------------- contract


def test_encode_decode_contract_shapes_and_attributes():
    torch.manual_seed(0)
    model = VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()
    assert (model.latent_channels, model.spatial_downsample, model.temporal_downsample) == (4, 2, 1)
    assert model.scale_factor == pytest.approx(0.18215) and model.shift_factor == 0.0
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(video)
        assert posterior.mean.shape == posterior.std.shape == posterior.logvar.shape == (2, 3, 4, 8, 8)
        assert torch.equal(posterior.mode(), posterior.mean)
        assert torch.equal(model.encode(video, chunk_size=2).mean, posterior.mean)  # encoder is frame-wise
        recon = model.decode(posterior.sample())
        assert recon.shape == video.shape
        z = posterior.mean
        assert torch.allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, T, 4, h, w\)"):
        model.decode(torch.zeros(1, 1, 3, 8, 8))


def test_window_starts_cover_with_requested_overlap():
    for length, window, overlap in [(12, 6, 0), (12, 6, 1), (25, 14, 3), (100, 10, 3), (7, 3, 2)]:
        starts = window_starts(length, window, overlap)
        assert starts[0] == 0 and starts[-1] + window == length
        assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:]))
    assert window_starts(5, 8, 0) == [0]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 4)


# ----------------------------------------------------------------------------- chunked decoding


def test_chunked_decode_with_overlap_equals_full_decode_exactly_for_2d_decoder():
    torch.manual_seed(0)
    model = VideoAutoencoder(AutoencoderConfig.from_name("tiny")).eval()
    z = torch.randn(2, 7, 4, 8, 8)
    with torch.no_grad():
        full = model.decode(z)
        for chunk, overlap in [(3, 0), (3, 1), (4, 2), (7, 3)]:
            assert torch.equal(model.decode(z, chunk_size=chunk, overlap=overlap), full), (chunk, overlap)


def test_temporal_decoder_chunking_tolerance_and_overlap_lowers_seams():
    """GroupNorm statistics and (3,1,1) convs span time, so every frame of a chunked decode differs.

    Stated tolerance (tiny random model): mean abs difference over all frames below 5% of the mean output
    magnitude; overlap must lower the worst-case error and at least halve the seam jump (see seam_jump)."""
    torch.manual_seed(0)
    model = randomize_temporal(VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd")).eval())
    z = smooth_latents(batch=2, frames=12)
    with torch.no_grad():
        full = model.decode(z)
        plain = model.decode(z, chunk_size=6, overlap=0)
        blended = model.decode(z, chunk_size=6, overlap=3)
    scale = full.abs().mean()
    for out in (plain, blended):
        assert ((out - full).abs().mean() / scale) < 0.05
    assert (blended - full).abs().max() < (plain - full).abs().max()
    seam_plain, seam_blended = seam_jump(plain, full), seam_jump(blended, full)
    extra = ((plain[:, 1:] - plain[:, :-1]) - (full[:, 1:] - full[:, :-1])).abs().mean(dim=(0, 2, 3, 4))
    assert extra.argmax().item() == 5  # without overlap the worst jump is at the chunk boundary (frame 5 -> 6)
    assert seam_plain > 0.3
    assert seam_blended < 0.5 * seam_plain


def test_fresh_temporal_decoder_decodes_like_the_2d_decoder():
    """initialize_weights: temporal ResBlocks and time_conv_out start as the identity."""
    torch.manual_seed(0)
    image = VideoAutoencoder(AutoencoderConfig.from_name("tiny", use_post_quant_conv=False)).eval()
    video = VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd")).eval()
    mapped = {}
    for key in video.state_dict():
        if ".temporal." in key or "mix_factor" in key or "time_conv_out" in key:
            continue
        mapped[key] = image.state_dict()[key.replace(".spatial.", ".")]
    missing, unexpected = video.load_state_dict(mapped, strict=False)
    assert not unexpected and all(".temporal." in k or "mix_factor" in k or "time_conv_out" in k for k in missing)
    z = torch.randn(1, 5, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(video.decode(z), image.decode(z), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- spatial tiling


@pytest.mark.parametrize("name", ["tiny", "tiny-svd"], ids=["2d", "temporal"])
def test_spatial_tiling_against_full_decode(name):
    """Exact when one tile covers the frame. Otherwise approximate: GroupNorm statistics and mid attention
    are per-frame global and convs near a tile border see zero padding. Stated tolerance for this tiny random
    model: mean abs error below 40% of the mean output magnitude, and overlap lowers mean and worst error."""
    torch.manual_seed(0)
    model = randomize_temporal(VideoAutoencoder(AutoencoderConfig.from_name(name)).eval())
    z = torch.randn(2, 3, 4, 24, 24)
    with torch.no_grad():
        full = model.decode(z)
        assert torch.equal(model.decode(z, tile=32), full)
        no_overlap = model.decode(z, tile=12, tile_overlap=0)
        overlap = model.decode(z, tile=12, tile_overlap=6)
        chunked_tiled = model.decode(z, chunk_size=2, overlap=1, tile=12, tile_overlap=6)
    scale = full.abs().mean()
    err_plain, err_overlap = (no_overlap - full).abs(), (overlap - full).abs()
    assert err_overlap.mean() < err_plain.mean() and err_overlap.max() < err_plain.max()
    assert err_overlap.mean() / scale < 0.4
    assert chunked_tiled.shape == full.shape and torch.isfinite(chunked_tiled).all()


def test_spatial_tiling_local_decoder_overlap_shrinks_worst_error():
    """With per-pixel norms and no attention the decoder is local, so only tile borders err: wider overlap
    (the cross-fade keeps border pixels at low weight) lowers the worst error and overlap lowers the mean."""
    torch.manual_seed(0)
    model = VideoAutoencoder(AutoencoderConfig.from_name("tiny", norm="rms", mid_attention=False)).eval()
    z = torch.randn(1, 2, 4, 32, 32)
    with torch.no_grad():
        full = model.decode(z)
        errors = [(model.decode(z, tile=16, tile_overlap=o) - full).abs() for o in (0, 4, 10)]
    worst = [e.max().item() for e in errors]
    assert worst[0] > worst[1] > worst[2]
    assert errors[2].mean() < 0.5 * errors[0].mean()


# ----------------------------------------------------------------------------- posterior


def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    posterior = DiagonalGaussian.from_moments(torch.cat([mean, logvar], dim=2), dim=2)
    closed = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3, 4))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3, 4))
    assert posterior.kl().shape == (2,)
    torch.testing.assert_close(posterior.kl(), closed)
    torch.testing.assert_close(posterior.kl(), reference, rtol=1e-5, atol=1e-4)
    assert torch.equal(posterior.std, (0.5 * logvar).exp())
    # Seeded sampling is reproducible and has the right moments.
    s1 = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(s1, posterior.sample(torch.Generator().manual_seed(3)))
    wide = DiagonalGaussian(torch.full((20000,), 2.0), torch.full((20000,), 2 * torch.log(torch.tensor(3.0))))
    draws = wide.sample(torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 2.0) < 0.1 and abs(draws.std().item() - 3.0) < 0.1
    fixed = DiagonalGaussian(mean, torch.zeros_like(mean), deterministic=True)
    assert torch.equal(fixed.sample(), mean) and torch.equal(fixed.kl(), torch.zeros(2))


# ----------------------------------------------------------------------------- norms


def test_norm_layers_match_their_definitions():
    x = torch.randn(2, 8, 3, 5, 5)
    ln = ChannelLayerNorm(8)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    ref = torch.nn.functional.layer_norm(x.movedim(1, -1), (8,), ln.weight, ln.bias, 1e-6).movedim(-1, 1)
    torch.testing.assert_close(ln(x), ref)
    rms = ChannelRMSNorm(8, eps=1e-6)
    torch.testing.assert_close(rms(x), x / (x.pow(2).mean(1, keepdim=True) + 1e-6).sqrt())
    assert isinstance(make_norm("group", 64), torch.nn.GroupNorm)
    with pytest.raises(ValueError, match="divisible"):
        make_norm("group", 48)
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batch", 32)  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["group", "layer", "rms"])
def test_norm_options_train_step(norm):
    torch.manual_seed(0)
    model = VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd", norm=norm))
    video = torch.rand(1, 3, 3, 16, 16) * 2 - 1
    recon, posterior = model(video, generator=torch.Generator().manual_seed(0))
    loss = (recon - video).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.decoder.mid.block1.temporal.conv2.weight.grad.abs().sum() > 0
    if norm != "group":
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


# ----------------------------------------------------------------------------- identity


def test_identity_autoencoder_round_trip():
    ae = IdentityAutoencoder()
    video = torch.rand(2, 4, 3, 8, 8) * 2 - 1
    posterior = ae.encode(video)
    assert torch.equal(posterior.sample(), video) and torch.equal(posterior.mode(), video)
    assert torch.equal(ae.decode(ae.unscale_latents(ae.scale_latents(posterior.mode())), chunk_size=2), video)
    assert (ae.scale_factor, ae.spatial_downsample, ae.temporal_downsample, ae.latent_channels) == (1.0, 1, 1, 3)
    assert torch.equal(posterior.kl(), torch.zeros(2))
