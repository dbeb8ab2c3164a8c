"""Autoencoder weights on disk: diffusers folders (read and written, checked against diffusers itself), bare files,
vdiff files, sgm checkpoints, layout detection, refusals naming the file and field, PretrainedAutoencoder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.weights.helpers import diffusers_kl, diffusers_temporal, perturb_
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights import file_sha256, safetensors_io
from vdiff.weights.autoencoder import (
    AutoencoderConfigError,
    config_from_diffusers,
    config_to_diffusers,
    load_autoencoder,
    read_autoencoder,
    save_autoencoder,
)
from vdiff.weights.autoencoder_convert import ConversionError, to_sgm
from vdiff.weights.pretrained import PretrainedAutoencoder
from vdiff.weights.safetensors_io import load_state_dict, save_state_dict

TOL = 1e-5  # fp32 parity bound

# Non-default diffusers configs: 3 levels, 16 GroupNorm groups, 1 layer per block, 8 latent channels, scale and
# shift factors, no post_quant_conv. diffusers' temporal decoder fixes 32 groups and 2 layers per block (and has
# no shift_factor), so its config varies what it can: 3 levels, 8 latent channels, the scaling factor.
KL_KWARGS = dict(norm_num_groups=16, latent_channels=8, scaling_factor=0.5, shift_factor=0.125,
                 use_post_quant_conv=False)
KL_WIDTHS, KL_LAYERS = (32, 64, 64), 1  # divisible by 32 too: a wrong group count still builds
TEMPORAL_KWARGS = dict(latent_channels=8, scaling_factor=0.3)
TEMPORAL_WIDTHS = (32, 64, 64)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def kl_folder(diffusers, tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("kl") / "vae"
    model = diffusers_kl(diffusers, KL_WIDTHS, KL_LAYERS, seed=11, **KL_KWARGS)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def temporal_folder(diffusers, tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("svd") / "vae"
    model = diffusers_temporal(diffusers, TEMPORAL_WIDTHS, seed=12, **TEMPORAL_KWARGS)
    model.save_pretrained(folder)
    return folder, model


def max_errors(ours: VideoAutoencoder, theirs, video: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of the posterior mean and of the decoded frames (decoding the mean)."""
    b, t = video.shape[:2]
    temporal = type(theirs).__name__ == "AutoencoderKLTemporalDecoder"
    with torch.no_grad():
        mean = ours.encode(video).mean
        ref = theirs.encode(video.flatten(0, 1)).latent_dist.mean.unflatten(0, (b, t))
        decoded = ours.decode(mean)
        expected = theirs.decode(mean.flatten(0, 1), **({"num_frames": t} if temporal else {})).sample
    return (mean - ref).abs().max().item(), (decoded - expected.unflatten(0, (b, t))).abs().max().item()


def video(frames: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, frames, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- diffusers folders in


def test_autoencoder_kl_folder_with_a_non_default_config_matches_diffusers(kl_folder):
    folder, theirs = kl_folder
    ours = load_autoencoder(folder).eval()
    c = ours.config
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, c.norm_num_groups) == (32, (1, 2, 2), 1, 8, 16)
    assert (c.scale_factor, c.shift_factor, c.use_quant_conv, c.use_post_quant_conv) == (0.5, 0.125, True, False)
    assert (ours.scale_factor, ours.shift_factor, ours.spatial_downsample) == (0.5, 0.125, 4)
    assert all(m.num_groups == 16 for m in ours.modules() if isinstance(m, torch.nn.GroupNorm))
    mean_err, decode_err = max_errors(ours, theirs, video())
    assert mean_err < TOL and decode_err < TOL, (mean_err, decode_err)
    # A pipeline folder (the VAE under vae/) and the weights file next to its config.json load the same.
    for source in (folder.parent, folder / "diffusion_pytorch_model.safetensors"):
        weights = read_autoencoder(source)
        assert weights.config == c and weights.layout == "diffusers"
        assert weights.config_source == str(folder / "config.json")
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in weights.state_dict.items())


def test_temporal_decoder_folder_with_a_non_default_config_matches_diffusers(temporal_folder):
    folder, theirs = temporal_folder
    ours = load_autoencoder(folder, layout="diffusers").eval()
    c = ours.config
    assert (c.decoder, c.ch, c.ch_mult, c.z_channels, c.scale_factor) == ("temporal", 32, (1, 2, 2), 8, 0.3)
    assert (c.use_quant_conv, c.use_post_quant_conv, c.num_res_blocks) == (True, False, 2)
    mean_err, decode_err = max_errors(ours, theirs, video(frames=4))
    assert mean_err < TOL and decode_err < TOL, (mean_err, decode_err)


def test_bare_file_needs_its_group_count(kl_folder, tmp_path):
    """GroupNorm's group count is not in the weights. Beside its config.json the file is read correctly; alone,
    it takes the config passed (or guessed, with a warning), and a wrong group count decodes wrongly."""
    folder, theirs = kl_folder
    bare = tmp_path / "vae.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", bare)
    right = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, norm_num_groups=16,
                              scale_factor=0.5, shift_factor=0.125, use_post_quant_conv=False)
    ours = load_autoencoder(bare, layout="diffusers", config=right).eval()
    assert max(max_errors(ours, theirs, video())) < TOL
    wrong = load_autoencoder(bare, layout="diffusers", config=dataclasses.replace(right, norm_num_groups=32)).eval()
    assert max(max_errors(wrong, theirs, video())) > 0.01  # loads, computes wrongly: why folders are recommended
    # A config passed for a file whose config.json is known must agree with it: the error names the field.
    with pytest.raises(AutoencoderConfigError, match=r"norm_num_groups: passed 32, .*config.json says 16"):
        load_autoencoder(folder / "diffusion_pytorch_model.safetensors", config=wrong.config)
    # No config at all: the sd preset is guessed, loudly, and the shapes then do not fit: keys named, with a hint.
    with pytest.warns(UserWarning, match="cannot be read from weights"), pytest.raises(ConversionError) as err:
        load_autoencoder(bare)
    assert str(bare) in str(err.value) and "pass config=" in str(err.value)
    assert "encoder.conv_in.weight: checkpoint [32, 3, 3, 3] vs model [128, 3, 3, 3]" in str(err.value)


KL_BASE = {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64], "layers_per_block": 1,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
TEMPORAL_BASE = {"_class_name": "AutoencoderKLTemporalDecoder", "block_out_channels": [32, 64],
                 "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 2}


@pytest.mark.parametrize("base,change,field", [
    (KL_BASE, {"act_fn": "gelu"}, "act_fn"),
    (KL_BASE, {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "up_block_types"),
    (KL_BASE, {"down_block_types": ["DownEncoderBlock2D"]}, "down_block_types"),
    (KL_BASE, {"block_out_channels": [32, 48]}, "block_out_channels"),
    (KL_BASE, {"latents_mean": [0.0] * 4}, "latents_mean"),
    (KL_BASE, {"norm_num_groups": 24}, "norm_num_groups"),
    (KL_BASE, {"conv_type": "causal"}, "conv_type"),
    (KL_BASE, {"_class_name": "AutoencoderTiny"}, "_class_name"),
    (TEMPORAL_BASE, {"layers_per_block": 1}, "layers_per_block"),
    (TEMPORAL_BASE, {"norm_num_groups": 16}, "norm_num_groups"),
])
def test_unrepresentable_diffusers_configs_are_refused_naming_the_file_and_field(tmp_path, base, change, field):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**base, **change}))
    save_state_dict({"x": torch.zeros(1)}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(AutoencoderConfigError) as err:
        load_autoencoder(folder)
    message = str(err.value)
    assert str(folder / "config.json") in message and field in message, message


def test_diffusers_configs_translate_both_ways():
    for config in (AutoencoderConfig.from_name("sd"), AutoencoderConfig.from_name("svd"),
                   AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), norm_num_groups=16, shift_factor=0.1, mid_attention=False,
                                     use_quant_conv=False, z_channels=16)):
        assert config_from_diffusers(config_to_diffusers(config)) == config
    # sd-vae-ft-mse's config.json (diffusers 0.4.0.dev0, no scaling_factor: the class default 0.18215 applies).
    sd_vae_ft_mse = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.0.dev0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert config_from_diffusers(sd_vae_ft_mse) == AutoencoderConfig.from_name("sd")
    for field, value in (("norm", "rms"), ("double_z", False)):
        with pytest.raises(AutoencoderConfigError, match=field):
            config_to_diffusers(AutoencoderConfig.from_name("tiny", **{field: value}))
    with pytest.raises(AutoencoderConfigError, match="use_post_quant_conv"):
        config_to_diffusers(AutoencoderConfig.from_name("tiny", decoder="temporal", num_res_blocks=2))


# ----------------------------------------------------------------------------- diffusers folders out


EXPORTS = {
    "AutoencoderKL": AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, norm_num_groups=16,
                                       scale_factor=0.5, shift_factor=0.125, use_post_quant_conv=False),
    "AutoencoderKL-no-quant-conv-no-attention": AutoencoderConfig.from_name(
        "tiny", use_quant_conv=False, mid_attention=False, norm_num_groups=8),
    "AutoencoderKLTemporalDecoder": AutoencoderConfig.from_name("svd", ch=32, ch_mult=(1, 2, 2), z_channels=8,
                                                                scale_factor=0.3),
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_exported_folder_loads_in_diffusers_and_computes_the_same(diffusers, tmp_path, name):
    """diffusers' own from_pretrained reads our export (config.json + safetensors) and encodes / decodes like
    ours: a swapped tensor (q/k, norm1/norm2, ...) or a wrong config field fails here."""
    config = EXPORTS[name]
    temporal = config.decoder == "temporal"
    torch.manual_seed(0)
    ours = perturb_(VideoAutoencoder(config), seed=21).eval()
    written = save_autoencoder(ours, tmp_path / "export", layout="diffusers")
    assert written == tmp_path / "export" / "diffusion_pytorch_model.safetensors"
    cls = diffusers.AutoencoderKLTemporalDecoder if temporal else diffusers.AutoencoderKL
    theirs = cls.from_pretrained(tmp_path / "export").eval()
    assert theirs.config.scaling_factor == config.scale_factor
    if not temporal:
        assert theirs.config.norm_num_groups == config.norm_num_groups
        assert theirs.config.shift_factor == (config.shift_factor or None)
        assert (theirs.quant_conv is None, theirs.post_quant_conv is None) == (
            not config.use_quant_conv, not config.use_post_quant_conv)
        assert theirs.config.mid_block_add_attention == config.mid_attention
    mean_err, decode_err = max_errors(ours, theirs, video(frames=4 if temporal else 3))
    assert mean_err < TOL and decode_err < TOL, (mean_err, decode_err)
    again = load_autoencoder(tmp_path / "export")
    assert again.config == config
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_export_refuses_what_diffusers_cannot_build(tmp_path):
    model = VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd", norm_num_groups=16))
    with pytest.raises(AutoencoderConfigError, match="norm_num_groups=16"):
        save_autoencoder(model, tmp_path / "x", layout="diffusers")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="is a folder"):
        save_autoencoder(model, tmp_path / "x.safetensors", layout="diffusers")


# ----------------------------------------------------------------------------- vdiff files, sgm files


def randomize_temporal(model: VideoAutoencoder) -> VideoAutoencoder:
    return perturb_(model, seed=1)


def test_vdiff_file_round_trip_with_stored_config_and_weights_env(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = randomize_temporal(VideoAutoencoder(AutoencoderConfig.from_name("tiny-svd", shift_factor=0.5))).eval()
    (tmp_path / "w").mkdir()
    save_autoencoder(model, tmp_path / "w" / "vae.safetensors")
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "w"))
    loaded = load_autoencoder("vae.safetensors").eval()  # found through $VDIFF_WEIGHTS, layout detected
    assert loaded.config == model.config and loaded.shift_factor == 0.5
    z = torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), model.decode(z))
    weights = read_autoencoder("vae.safetensors")
    assert weights.layout == "vdiff" and weights.weights_path == tmp_path / "w" / "vae.safetensors"
    # A passed config that contradicts the stored one names the field.
    with pytest.raises(AutoencoderConfigError, match=r"shift_factor: passed 0.0"):
        load_autoencoder("vae.safetensors", config="tiny-svd")
    # dropout is a training setting: the one passed is used, not refused.
    assert load_autoencoder("vae.safetensors", config=dataclasses.replace(model.config, dropout=0.1)).config.dropout == 0.1
    with pytest.raises(ValueError, match="is .safetensors"):
        save_autoencoder(model, tmp_path / "vae.pt")


def test_missing_weights_name_the_path_and_the_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_autoencoder("svd/vae.safetensors", layout="diffusers")
    message = str(err.value)
    assert "svd/vae.safetensors" in message and str(tmp_path) in message and "VDIFF_WEIGHTS" in message
    monkeypatch.delenv("VDIFF_WEIGHTS")
    with pytest.raises(FileNotFoundError, match="VDIFF_WEIGHTS is not set"):
        load_autoencoder(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_autoencoder(tmp_path)  # a folder that is not a diffusers model folder


def test_diffusers_and_sgm_files_and_layout_detection(diffusers, tmp_path):
    theirs = diffusers_temporal(diffusers, (32, 64))
    cfg = AutoencoderConfig.from_name("svd", ch=32, ch_mult=(1, 2))
    save_state_dict(theirs.state_dict(), tmp_path / "diffusers_vae.safetensors")
    ours = load_autoencoder(tmp_path / "diffusers_vae.safetensors", config=cfg)  # layout detected: diffusers
    assert read_autoencoder(tmp_path / "diffusers_vae.safetensors", config=cfg).layout == "diffusers"
    # sgm layout inside a Lightning-style {"state_dict": ...} torch checkpoint (the identity quant_conv of
    # SVD's engine, which has none: sgm checkpoints carry no quant_conv).
    with torch.no_grad():
        ours.quant_conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        ours.quant_conv.bias.zero_()
    torch.save({"state_dict": to_sgm(ours.state_dict(), cfg), "global_step": 3}, tmp_path / "svd.ckpt")
    assert set(load_state_dict(tmp_path / "svd.ckpt")) == set(to_sgm(ours.state_dict(), cfg))
    again = load_autoencoder(tmp_path / "svd.ckpt", config=cfg)
    assert read_autoencoder(tmp_path / "svd.ckpt", config=cfg).layout == "sgm"
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    save_autoencoder(ours, tmp_path / "svd_export.safetensors", layout="sgm")
    assert set(load_state_dict(tmp_path / "svd_export.safetensors")) == set(load_state_dict(tmp_path / "svd.ckpt"))
    with pytest.raises(ValueError, match="unknown weights layout"):
        load_autoencoder(tmp_path / "svd.ckpt", layout="ldm")  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="assuming the 'svd' preset"), pytest.raises(ConversionError, match="missing"):
        load_autoencoder(tmp_path / "svd.ckpt", layout="sgm")  # default = full-size SVD config
    save_state_dict({"foo.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="cannot tell whether"):
        load_autoencoder(tmp_path / "other.safetensors")


def test_full_svd_checkpoint_reads_only_its_autoencoder(tmp_path, monkeypatch):
    """Of a safetensors SVD checkpoint (UNet, conditioner, ... and first_stage_model.*), only the autoencoder's
    tensors are read: a 10 GB file needs no 10 GB of memory."""
    cfg = AutoencoderConfig.from_name("tiny-svd")
    torch.manual_seed(0)
    model = perturb_(VideoAutoencoder(cfg), seed=3)
    with torch.no_grad():
        model.quant_conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        model.quant_conv.bias.zero_()
    tensors = {**to_sgm(model.state_dict(), cfg), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 8, 3, 3),
               "conditioner.embedders.3.encoder.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}
    save_state_dict(tensors, tmp_path / "svd.safetensors")
    read = []
    real_safe_open = safetensors_io.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def metadata(self):
            return self.file.metadata()

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(safetensors_io, "safe_open", Recording)  # every safetensors read goes through it
    loaded = load_autoencoder(tmp_path / "svd.safetensors", config=cfg)
    assert read and all(name.startswith("first_stage_model.") for name in read)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------------- PretrainedAutoencoder, hashing


def test_pretrained_autoencoder_records_its_file_layout_and_sha256(kl_folder, tmp_path, monkeypatch):
    folder, _ = kl_folder
    ae = PretrainedAutoencoder(str(folder))
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert ae.weights_path == str(weights.absolute()) and Path(ae.weights_path).is_absolute()
    assert ae.layout == "diffusers" and ae.config.norm_num_groups == 16
    assert ae.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert isinstance(ae, VideoAutoencoder) and "layout='diffusers'" in repr(ae)
    # The recorded file alone reloads the same model (its config.json is read again).
    again = PretrainedAutoencoder(ae.weights_path, layout=ae.layout)
    assert again.config == ae.config and again.weights_sha256 == ae.weights_sha256
    # A relative path through $VDIFF_WEIGHTS resolves to an absolute one; a preset name is a config.
    torch.manual_seed(0)
    save_autoencoder(VideoAutoencoder(AutoencoderConfig.from_name("tiny")), tmp_path / "tiny.safetensors")
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path))
    monkeypatch.chdir(folder)
    tiny = PretrainedAutoencoder("tiny.safetensors", config="tiny", scale_factor=0.25)
    assert tiny.weights_path == str(tmp_path / "tiny.safetensors") and tiny.layout == "vdiff"
    assert tiny.scale_factor == 0.25
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*VDIFF_WEIGHTS.*Pretrained weights"):
        PretrainedAutoencoder("nope.safetensors")


def test_file_sha256_streams_in_chunks(tmp_path):
    data = torch.randint(0, 256, (3 * (1 << 20) + 123,), dtype=torch.uint8).numpy().tobytes()  # > 3 chunks
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
