"""Inflating an SD-2.1-style image UNet into UNet-SVD (vdiff.weights.inflate): the video UNet equals diffusers'
UNet2DConditionModel frame by frame (whatever the concat latent, the added time ids and the number of context
tokens), exactly so by construction (bitwise equal to the image-only path, whatever the other temporal weights),
while gradients reach the temporal layers; the ldm/sgm single-file layout (checked against diffusers' own ldm
converter) inflates to the same tensors; SD 2.1's noise level mapping; strict errors naming files, keys and
fields; temporal-only training through SVDModule; the recipe parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vdiff.diffusion.edm import PreconditionedDenoiser
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights.inflate import (
    InflationError,
    SD21VScalingPrecond,
    inflate_unet,
    inflated_config,
    load_inflated_state_dict,
    new_parameter_names,
    sd21_sigmas,
    sd21_timestep,
)
from vdiff.weights.safetensors_io import save_state_dict
from vdiff.weights.unet_svd import UNetSVDConfigError, UNetSVDConversionError, save_unet_svd, to_sgm

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 parity bound
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "svd_from_sd21.yaml"
CROSS_DOWN, PLAIN_DOWN, CROSS_UP, PLAIN_UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
# SD 2.1's UNet2DConditionModel config at tiny size: attention at all levels but the last, linear projections,
# head width 16 (diffusers' "attention_head_dim" holds head COUNTS, as SD 2.1's [5, 10, 20, 20]), cross-attention.
SD_TINY = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), down_block_types=(CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
    up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP), layers_per_block=1, cross_attention_dim=48,
    attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, sample_size=16,
)  # fmt: skip
VIDEO_FIELDS = dict(added_time_embed_dim=32, num_frames=4)  # the video-only fields, small


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers image UNet in eval mode, its save_pretrained folder, the video config it inflates to)."""
    torch.manual_seed(0)
    image = perturb_(diffusers.UNet2DConditionModel(**SD_TINY), 1).eval()
    folder = tmp_path_factory.mktemp("sd21") / "unet"
    image.save_pretrained(folder)
    return image, folder, inflated_config(folder, None).replace(**VIDEO_FIELDS)


def inputs(config: UNetSVDConfig, batch: int = 2, frames: int = 3, size=(8, 8), tokens: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 4, *size, generator=g)
    cond = {
        "context": torch.randn(batch, tokens, config.context_dim, generator=g),
        "concat": torch.randn(batch, frames, config.concat_channels, *size, generator=g),  # ignored until trained
        "added_time_ids": torch.randn(batch, 3, generator=g) * 50,  # ignored until trained
    }
    return x, torch.tensor([3.0, 742.5])[:batch], cond


def image_per_frame(image, x, t, context) -> torch.Tensor:
    """The image UNet on every frame separately (same timestep and context for the frames of a clip)."""
    B, T = x.shape[:2]
    frames = [image(x[:, i], t, context).sample for i in range(T)]  # T x (B, C, H, W)
    return torch.stack(frames, dim=1)  # (B, T, C, H, W)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- exactness


def test_the_derived_video_config_is_the_image_unets(sd):
    _, folder, config = sd
    assert config == UNetSVDConfig(
        in_channels=8, out_channels=4, concat_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_levels=(0, 1), head_dim=16, context_dim=48, added_time_embed_dim=32, num_frames=4, norm_eps="sgm",
    )  # fmt: skip
    assert inflated_config(folder, config) == config  # a passed config that agrees is taken as it is


@pytest.mark.parametrize("tokens", [5, 1])
def test_the_video_unet_equals_the_image_unet_frame_by_frame(sd, tokens):
    image, folder, config = sd
    net = inflate_unet(folder, config).eval()
    x, t, cond = inputs(config, tokens=tokens)
    with torch.no_grad():
        out = net(x, t, cond)
        expected = image_per_frame(image, x, t, cond["context"])
        image_only = net(x, t, {**cond, "image_only_indicator": torch.ones(2, 3, dtype=torch.bool)})
    assert max_diff(out, expected) <= TOL * expected.abs().max().item()
    # exact by construction: the temporal branches return their input, so the blend returns the spatial output
    # bit for bit, as image-only frames (alpha = 1) do
    assert torch.equal(out, image_only)


def test_exactness_holds_whatever_the_other_temporal_weights_and_gradients_reach_them(sd):
    _, folder, config = sd
    net = inflate_unet(folder, config).eval()
    x, t, cond = inputs(config, frames=4)
    outputs = ("temporal.conv2.weight", "temporal.conv2.bias", "frame_embed.2.weight", "frame_embed.2.bias",
               "ff_in.proj_out.weight", "ff_in.proj_out.bias", "attn1.proj.weight", "attn1.proj.bias",
               "attn2.proj.weight", "attn2.proj.bias", "ff.proj_out.weight", "ff.proj_out.bias")  # fmt: skip
    zeroed = {name for name in net.temporal_parameter_names() if name.endswith(outputs) and "temporal" in name}
    zeroed |= {name for name in net.temporal_parameter_names() if ".frame_embed.2." in name}
    assert zeroed and all(not net.get_parameter(name).any() for name in zeroed)
    mix = [p for n, p in net.named_parameters() if n.endswith("mix_factor")]
    assert mix and all(p.item() == 0.5 for p in mix)  # SVD's initial blend: alpha = sigmoid(0.5), not 1
    with torch.no_grad():
        before = net(x, t, cond)
        g = torch.Generator().manual_seed(3)
        for name in net.temporal_parameter_names():  # every other temporal tensor, mix factors included
            if name not in zeroed:
                net.get_parameter(name).add_(torch.randn(net.get_parameter(name).shape, generator=g))
        assert torch.equal(net(x, t, cond), before)
    net(x, t, cond).square().mean().backward()
    for name in zeroed:
        if name.endswith(("temporal.conv2.weight", "ff.proj_out.weight", "attn1.proj.weight")):
            assert net.get_parameter(name).grad.abs().sum() > 0, name  # the temporal branch learns from step one


@pytest.mark.skipif(not hasattr(UNetSVDConfig(), "action_dim"), reason="this vdiff has no Vista layers")
def test_vistas_layers_start_from_the_image_unet_too(sd):
    image, folder, config = sd
    vista = config.replace(cond_frame_time_embed=True, action_dim=6)
    net = inflate_unet(folder, vista).eval()
    state = net.state_dict()
    assert torch.equal(state["cond_time_embed.mlp.0.weight"], state["time_embed.mlp.0.weight"])
    assert all(not v.any() for k, v in state.items() if ".action_kv." in k)
    x, t, cond = inputs(config)
    given = torch.zeros(2, 3, 1, 1, 1, dtype=torch.bool)
    given[:, 0] = True  # frame 0 given: its time embedding comes from the copy
    with torch.no_grad():
        out = net(x, t, {**cond, "actions": torch.randn(2, 6)}, given)
        expected = image_per_frame(image, x, t, cond["context"])
    assert max_diff(out, expected) <= TOL * expected.abs().max().item()
    assert set(new_parameter_names(vista)) > set(new_parameter_names(config))


def test_new_non_temporal_parts_add_nothing(sd):
    _, folder, config = sd
    state = load_inflated_state_dict(folder, config)
    assert not state["conv_in.weight"][:, 4:].any() and state["conv_in.weight"][:, :4].any()
    assert not state["added_time_embed.mlp.2.weight"].any() and not state["added_time_embed.mlp.2.bias"].any()
    assert state["added_time_embed.mlp.0.weight"].any()
    assert new_parameter_names(config) == [
        "conv_in.weight", "added_time_embed.mlp.0.weight", "added_time_embed.mlp.0.bias",
        "added_time_embed.mlp.2.weight", "added_time_embed.mlp.2.bias",
    ]  # fmt: skip


def test_the_init_is_a_function_of_the_file_and_the_seed(sd):
    _, folder, config = sd
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_inflated_state_dict(folder, config, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = load_inflated_state_dict(folder, config, seed=0)
    c = load_inflated_state_dict(folder, config, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "down.0.res.0.temporal.conv1.weight"
    assert not torch.equal(a[key], c[key])
    assert torch.equal(a["down.0.res.0.spatial.conv1.weight"], c["down.0.res.0.spatial.conv1.weight"])


# ----------------------------------------------------------------------------- the ldm / sgm single file


def ldm_file(net: UNetSVD, path: Path, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """An SD-2.1-style single file made from the spatial half of an inflated UNet (sgm's video names without the
    temporal layers are ldm's image names), with a VAE, a text encoder and schedule buffers beside it (which the
    inflation does not read) unless ``prefix`` is empty (a bare UNet state dict)."""
    image = {}
    for key, value in to_sgm(net.state_dict(), net.config).items():
        if any(part in key for part in ("time_stack", "time_mixer", "time_pos_embed", "label_emb")):
            continue
        if key.endswith("input_blocks.0.0.weight"):
            value = value[:, :4]
        image[prefix + key[len("model.diffusion_model.") :]] = value.clone()
    others = {"first_stage_model.encoder.conv_in.weight": torch.ones(2), "cond_stage_model.model.ln_final.weight":
              torch.ones(2), "alphas_cumprod": sd21_sigmas().float()}  # fmt: skip
    save_state_dict({**image, **others} if prefix else image, path)  # a bare UNet file holds the UNet only
    return image


def test_an_ldm_single_file_inflates_to_the_same_tensors(sd, tmp_path):
    image, folder, config = sd
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    net = inflate_unet(folder, config)
    ldm = ldm_file(net, tmp_path / "v2-1_768-ema-pruned.safetensors")
    # the file is what diffusers' own ldm converter reads as the same image UNet
    converted = convert_ldm_unet_checkpoint(dict(ldm), dict(image.config))
    assert set(converted) == set(image.state_dict())
    assert all(torch.equal(converted[k].reshape(v.shape), v) for k, v in image.state_dict().items())
    expected = load_inflated_state_dict(folder, config)
    for path in (tmp_path / "v2-1_768-ema-pruned.safetensors", tmp_path / "bare.pt"):
        if path.suffix == ".pt":  # a bare ldm UNet state dict (no prefix), as a torch file
            ldm_file(net, path, prefix="")
        state = load_inflated_state_dict(path, config)
        assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


def test_ldm_file_errors_name_the_file_and_every_bad_key(sd, tmp_path):
    _, folder, config = sd
    path = tmp_path / "sd.safetensors"
    ldm = ldm_file(inflate_unet(folder, config), path)
    ldm.pop("model.diffusion_model.out.2.bias")
    ldm["model.diffusion_model.middle_block.1.proj_in.weight"] = torch.zeros(3, 3)
    ldm["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_state_dict(ldm, path)
    with pytest.raises(UNetSVDConversionError) as error:
        load_inflated_state_dict(path, config)
    message = str(error.value)
    for needle in (str(path), "model.diffusion_model.out.2.bias", "model.diffusion_model.middle_block.1.proj_in.weight",
                   "model.diffusion_model.extra.weight", "missing (1)", "shape mismatch (1)", "unexpected (1)"):  # fmt: skip
        assert needle in message, needle
    # a video UNet is not an image UNet: its temporal keys are named, with the reader to use instead
    svd_file = tmp_path / "svd.safetensors"
    save_unet_svd(inflate_unet(folder, config), svd_file, layout="sgm")
    with pytest.raises(UNetSVDConversionError, match=r"(?s)holds a VIDEO UNet.*read_unet_svd.*time_stack"):
        load_inflated_state_dict(svd_file, config)


# ----------------------------------------------------------------------------- configs


def write_config(tmp_path: Path, folder: Path, **changes) -> Path:
    target = tmp_path / "changed"
    target.mkdir(exist_ok=True)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (target / "config.json").write_text(json.dumps(raw))
    (target / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    return target


@pytest.mark.parametrize(
    "change, field",
    [
        ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
        ({"freq_shift": 1}, "freq_shift"),
        ({"norm_eps": 1e-6}, "norm_eps"),
        ({"attention_head_dim": [2, 2, 4]}, "attention_head_dim"),
        ({"num_attention_heads": [4, 4, 4]}, "num_attention_heads"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"up_block_types": [PLAIN_UP, PLAIN_UP, CROSS_UP]}, "up_block_types"),
        ({"_class_name": "UNetSpatioTemporalConditionModel"}, "_class_name"),
    ],
)
def test_a_config_that_cannot_be_inflated_exactly_names_the_file_and_field(sd, tmp_path, change, field):
    _, folder, _ = sd
    changed = write_config(tmp_path, folder, **change)
    with pytest.raises(InflationError, match=rf"changed/config\.json: {field}="):
        load_inflated_state_dict(changed)


def test_unknown_fields_contradicting_configs_and_other_epsilons_are_refused(sd, tmp_path):
    _, folder, config = sd
    with pytest.raises(InflationError, match=r"unknown UNet2DConditionModel field\(s\) \['new_knob'\]"):
        load_inflated_state_dict(write_config(tmp_path, folder, new_knob=1))
    with pytest.raises(UNetSVDConfigError, match=r"context_dim: passed 64, .*config\.json gives 48"):
        load_inflated_state_dict(folder, config.replace(context_dim=64))
    with pytest.raises(InflationError, match=r"norm_eps='diffusers'.*1e-5"):
        load_inflated_state_dict(folder, config.replace(norm_eps="diffusers"))
    assert inflated_config(folder, config.replace(num_frames=25, concat_channels=2, in_channels=6)).num_frames == 25
    assert inflated_config(folder, {"concat_channels": 2}).in_channels == 6  # a dict sets the fields it names
    with pytest.raises(UNetSVDConfigError, match=r"head_dim: passed 8"):
        inflated_config(folder, {"concat_channels": 2, "head_dim": 8})
    with pytest.raises(FileNotFoundError, match="SD image UNet weights not found"):
        load_inflated_state_dict(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- SD 2.1's noise levels


def test_sd21_sigmas_and_timesteps_match_diffusers_schedule():
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alpha_bar = scheduler.alphas_cumprod.double()
    sigmas = sd21_sigmas()
    torch.testing.assert_close(1 / (1 + sigmas**2), alpha_bar, rtol=1e-6, atol=0)  # diffusers' is float32
    steps = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sd21_timestep(sigmas), steps)  # integer steps map back exactly
    mid = (sigmas[:-1].log() + sigmas[1:].log()).div(2).exp()
    torch.testing.assert_close(sd21_timestep(mid), steps[:-1] + 0.5)
    assert sd21_timestep(torch.tensor([1e-4, 700.0])).tolist() == [0.0, 999.0]  # clamped to the schedule
    near = (0.3 * sigmas[:-1].log() + 0.7 * sigmas[1:].log()).exp()  # 70% of the way to the next step
    assert torch.equal(sd21_timestep(near, quantize=True), steps[1:])  # sgm's DiscreteDenoiser: nearest step


def test_edm_with_sd21_vscaling_is_sd21_v_prediction(sd):
    """The inflated UNet's EDM denoiser at sigma_t equals SD 2.1-v's x0 estimate at step t, frame by frame."""
    image, folder, config = sd
    net = inflate_unet(folder, config).eval()
    steps = torch.tensor([17, 803])
    alpha_bar = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012).alphas_cumprod[steps]  # fmt: skip
    sigma = sd21_sigmas()[steps].float()
    x, _, cond = inputs(config)
    noisy = x + sigma.view(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        denoised = PreconditionedDenoiser(SD21VScalingPrecond()).denoise(net, noisy, sigma, cond)
        a = alpha_bar.view(-1, 1, 1, 1, 1)
        x_t = noisy * a.sqrt()  # DDPM's x_t at step t
        v = image_per_frame(image, x_t, steps.float(), cond["context"])
        expected = a.sqrt() * x_t - (1 - a).sqrt() * v
    assert max_diff(denoised, expected) <= TOL * expected.abs().max().item()


# ----------------------------------------------------------------------------- training the temporal layers


def test_after_inflation_only_temporal_layers_train(sd, tmp_path):
    from vdiff.lit.svd import SVDModule
    from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder

    _, folder, config = sd
    path = save_unet_svd(inflate_unet(folder, config), tmp_path / "inflated.safetensors")  # a vdiff file
    module = SVDModule(net=config, train="temporal", net_weights=str(path),
                       autoencoder=VideoAutoencoder(AutoencoderConfig.from_name("tiny")))  # fmt: skip
    module.configure_model()
    module.load_net_weights()
    expected = load_inflated_state_dict(folder, config)
    assert all(torch.equal(v, expected[k]) for k, v in module.net.state_dict().items())
    trainable = {name for name, p in module.net.named_parameters() if p.requires_grad}
    assert trainable == set(module.net.temporal_parameter_names()) and trainable
    in_groups = {id(p) for group in module.parameter_groups() for p in group["params"]}
    assert in_groups == {id(module.net.get_parameter(name)) for name in trainable}
    assert not trainable & set(new_parameter_names(config))  # frozen at their zero contribution (module docstring)


# ----------------------------------------------------------------------------- the recipe


def test_the_recipe_parses(capsys):
    from vdiff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(RECIPE), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    for needle in ("vdiff.lit.svd.SVDModule", "train: temporal", "vdiff.weights.inflate.SD21VScalingPrecond",
                   "vdiff.weights.clip.PretrainedCLIPImageEmbedder", "vdiff.weights.pretrained.PretrainedAutoencoder"):  # fmt: skip
        assert needle in printed, needle


def test_the_recipe_names_missing_weights_before_training(tmp_path, monkeypatch):
    from tests.lit.helpers import quiet_trainer
    from vdiff.cli import main
    from vdiff.lit.cli import RecipeError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the recipe's hub ids, not in the (empty) Hugging Face cache
    with pytest.raises(RecipeError, match=r"hf://laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_pytorch_model\.bin is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*vdiff weights download.*VDIFF_WEIGHTS"):
        main(["fit", "-c", str(RECIPE), *quiet_trainer(tmp_path / "runs")])
    with pytest.raises(RecipeError, match=r"hf://stabilityai/stable-diffusion-2-1/unet is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*vdiff weights download.*VDIFF_WEIGHTS"):
        main(["fit", "-c", str(RECIPE), "--model.init_args.image_encoder", "null", "--model.init_args.autoencoder",
              "null", *quiet_trainer(tmp_path / "runs")])  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_the_recipe_trains_only_the_temporal_and_new_layers_of_an_inflated_unet(tmp_path):
    """Pixel space at toy size: a 3-channel SD-like UNet folder inflated by the recipe itself
    (``net_weights_layout: sd21-image``): after 2 steps the spatial tensors are the image UNet's, the temporal
    ones and the layers SD lacks (added time ids, conv_in's concat kernels) moved; ``python -m
    vdiff.weights.inflate`` writes the same starting weights."""
    from tests.lit.helpers import quiet_trainer, tiny_synthetic_data
    from vdiff.cli import main
    from vdiff.weights.inflate import main as inflate_main
    from vdiff.weights.unet_svd import read_unet_svd

    torch.manual_seed(0)
    image = diffusers.UNet2DConditionModel(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), down_block_types=(CROSS_DOWN, PLAIN_DOWN),
        up_block_types=(PLAIN_UP, CROSS_UP), layers_per_block=1, cross_attention_dim=24, attention_head_dim=(2, 2),
        use_linear_projection=True,
    )  # fmt: skip
    image.save_pretrained(tmp_path / "sd" / "unet")
    net = {"concat_channels": 3, "added_time_embed_dim": 32, "num_frames": 5}
    inflated = tmp_path / "inflated.safetensors"
    assert inflate_main([str(tmp_path / "sd"), str(inflated), "--config", json.dumps(net)]) == 0
    config = read_unet_svd(inflated).config
    main([
        "fit", "-c", str(RECIPE),
        "--model.init_args.net", json.dumps(config.to_dict()),
        "--model.init_args.net_weights", str(tmp_path / "sd"),
        "--model.init_args.net_weights_layout", "sd21-image",
        "--model.init_args.autoencoder", "null",
        "--model.init_args.image_encoder", json.dumps({"class_path": "vdiff.models.conditioners.CLIPImageEmbedder",
                                                       "init_args": {"config": "tiny"}}),
        "--model.init_args.sampler.steps", "2",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(tmp_path / "cache", frames=5),
        "--data.init_args.size", "16", "--data.init_args.video_size", "16", "--data.init_args.target_fps", "null",
        *quiet_trainer(tmp_path / "runs"),
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ])  # fmt: skip
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    trained = {k[len("net.") :]: v for k, v in torch.load(checkpoint, map_location="cpu", weights_only=False)[
        "state_dict"].items() if k.startswith("net.")}  # fmt: skip
    start = read_unet_svd(inflated).state_dict
    assert set(trained) == set(start)
    moved = {k for k in start if not torch.equal(trained[k], start[k])}
    new = {"conv_in.weight"} | {k for k in start if k.startswith("added_time_embed.")}
    assert moved and all(UNetSVD.is_temporal_parameter(k) or k in new for k in moved)
    assert "conv_in.weight" in moved  # the concat kernels learn (they start at zero)
    assert any(k.endswith("temporal.conv2.weight") for k in moved)
