"""UNet-SVD: presets and parameter counts, config errors, the denoiser contract, image-only frames, activation
checkpointing, parameter groups. Parity with diffusers and sgm layouts: ``tests/weights/test_unet_svd_convert.py``."""

from __future__ import annotations

import time

import pytest
import torch

from vdiff.models.unet_svd import UNET_SVD_CONFIGS, UNetSVD, UNetSVDConfig
from vdiff.nn.unet_blocks import SpatioTemporalResBlock, SpatioTemporalTransformer

# svd's count equals diffusers' UNetSpatioTemporalConditionModel() (its defaults are SVD's config), checked below,
# and the sgm key manifest's (vdiff/weights/manifests/sgm_svd_unet_keys.json).
PARAMETERS = {"svd": 1_524_623_082, "svd-xt": 1_524_623_082, "tiny": 2_612_246}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(config: UNetSVDConfig | str = "tiny", seed: int = 0) -> UNetSVD:
    """A model whose every parameter is random (the zero-initialised convs, norms and mix factors included)."""
    config = UNetSVDConfig.from_name(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    model = UNetSVD(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


def inputs(
    config: UNetSVDConfig,
    batch: int = 2,
    frames: int = 3,
    size: tuple[int, int] = (8, 8),
    tokens: int = 1,
    seed: int = 0,
):
    g = torch.Generator().manual_seed(seed)
    c = config.in_channels - config.concat_channels
    x = torch.randn(batch, frames, c, *size, generator=g)  # (B, T, C, H, W)
    cond = {
        "context": torch.randn(batch, tokens, config.context_dim, generator=g),
        "concat": torch.randn(batch, frames, config.concat_channels, *size, generator=g),
        "added_time_ids": torch.randn(batch, config.num_added_time_ids, generator=g) * 3,
    }
    return x, torch.randn(batch, generator=g), cond


# ----------------------------------------------------------------------------- presets and configs


@pytest.mark.parametrize("name", sorted(UNET_SVD_CONFIGS))
def test_every_preset_builds_on_meta_with_its_parameter_count(name):
    config = UNetSVDConfig.from_name(name)
    with torch.device("meta"):
        model = UNetSVD(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert model.config == config
    assert len(list(model.buffers())) == 0  # everything is a parameter: meta-built models load fully with assign=True


def test_svd_parameter_count_matches_diffusers_on_meta():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        theirs = diffusers.UNetSpatioTemporalConditionModel()  # its defaults are SVD's config
    assert sum(p.numel() for p in theirs.parameters()) == PARAMETERS["svd"]


def test_presets_are_data_and_lookups_name_what_is_wrong():
    assert set(PARAMETERS) == set(UNET_SVD_CONFIGS)
    assert UNET_SVD_CONFIGS["svd"] == UNetSVDConfig()  # the defaults are SVD's
    assert UNetSVDConfig.from_name("svd-xt").replace(num_frames=14) == UNET_SVD_CONFIGS["svd"]  # same UNet
    small = UNetSVDConfig.from_name("svd", num_res_blocks=1)
    assert small.num_res_blocks == 1 and UNET_SVD_CONFIGS["svd"].num_res_blocks == 2  # the preset is not mutated
    with pytest.raises(ValueError, match="unknown size 'svd-large'"):
        UNetSVDConfig.from_name("svd-large")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_layers'\]"):
        UNetSVDConfig.from_name("svd", num_layers=3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        UNetSVDConfig.from_dict({**UNetSVDConfig().to_dict(), "bogus": 1})
    config = UNetSVDConfig.from_name("tiny")
    assert UNetSVDConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(model_channels=48), "model_channels"),
        (dict(head_dim=24), "head_dim"),
        (dict(attention_levels=(0, 3)), "attention_levels"),
        (dict(concat_channels=8), "concat_channels"),
        (dict(norm_eps="torch"), "norm_eps"),
        (dict(added_time_embed_dim=7), "added_time_embed_dim"),
    ],
)
def test_configs_that_cannot_build_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"UNetSVDConfig.{field}="):
        UNetSVD(UNetSVDConfig.from_name("tiny", **overrides))


def test_tiny_forward_is_well_under_a_second():
    model = random_model("tiny")
    x, t, cond = inputs(model.config, batch=1, frames=4, size=(16, 16))
    with torch.no_grad():
        model(x, t, cond)
        best = min(_timed(lambda: model(x, t, cond)) for _ in range(3))
    assert best < 0.5, f"tiny forward took {best:.3f} s"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- the denoiser contract


@pytest.mark.parametrize("frames,size", [(1, (8, 8)), (5, (8, 8)), (2, (10, 12))])
def test_any_frame_count_and_size_gives_the_contract_shape(frames, size):
    model = random_model("tiny")
    x, t, cond = inputs(model.config, frames=frames, size=size)
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.shape == (2, frames, model.config.out_channels, *size) and torch.isfinite(out).all()


def test_given_mask_is_ignored_and_a_single_concat_frame_broadcasts():
    model = random_model("tiny")
    x, t, cond = inputs(model.config, frames=3)
    single = {**cond, "concat": cond["concat"][:, :1]}
    repeated = {**cond, "concat": cond["concat"][:, :1].expand_as(cond["concat"])}
    mask = torch.zeros(2, 3, 1, 1, 1, dtype=torch.bool)
    mask[:, 0] = True
    with torch.no_grad():
        plain = model(x, t, repeated)
        torch.testing.assert_close(model(x, t, repeated, mask), plain, atol=0, rtol=0)
        torch.testing.assert_close(model(x, t, single), plain, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, t, c: (x, t, {k: v for k, v in c.items() if k != "context"}), r"cond\['context'\]"),
        (lambda x, t, c: (x, t, {k: v for k, v in c.items() if k != "concat"}), r"cond\['concat'\]"),
        (lambda x, t, c: (x, t, {k: v for k, v in c.items() if k != "added_time_ids"}), r"cond\['added_time_ids'\]"),
        (
            lambda x, t, c: (x, t, {**c, "added_time_ids": c["added_time_ids"][:, :2]}),
            r"cond\['added_time_ids'\] must be \(2, 3\)",
        ),
        (lambda x, t, c: (x, t, {**c, "context": c["context"][:, :, :10]}), r"cond\['context'\] must be"),
        (
            lambda x, t, c: (x, t, {**c, "image_only_indicator": torch.zeros(2, 4)}),
            r"cond\['image_only_indicator'\] must be \(2, 3\)",
        ),
        (lambda x, t, c: (torch.cat([x, x], 2), t, c), "x has 8 channels"),
        (lambda x, t, c: (x, t[:1], c), r"noise_level must have shape \(2,\)"),
    ],
)
def test_bad_conditioning_is_an_error_naming_the_key(change, message):
    model = random_model("tiny")
    with pytest.raises(ValueError, match=message):
        model(*change(*inputs(model.config)))


# ----------------------------------------------------------------------------- image-only frames


def test_all_image_only_frames_make_the_temporal_path_a_no_op():
    model = random_model("tiny")
    x, t, cond = inputs(model.config, frames=4)
    images = {**cond, "image_only_indicator": torch.ones(2, 4, dtype=torch.bool)}
    with torch.no_grad():
        out = model(x, t, images)
        # 1. the same as forcing every blend to the spatial path (sigmoid(40) == 1.0 in float32)
        spatial_only = random_model("tiny")
        for p_name, p in spatial_only.named_parameters():
            if p_name.endswith("mix_factor"):
                p.fill_(40.0)
        torch.testing.assert_close(spatial_only(x, t, cond), out, atol=0, rtol=0)
        # 2. no temporal parameter changes it
        for name, p in model.named_parameters():
            if model.is_temporal_parameter(name) and not name.endswith("mix_factor"):
                p.add_(torch.randn_like(p))
        torch.testing.assert_close(model(x, t, images), out, atol=0, rtol=0)
        # 3. every frame is computed as an image on its own (a one-frame clip)
        for f in range(4):
            alone = {
                "context": cond["context"],
                "concat": cond["concat"][:, f : f + 1],
                "added_time_ids": cond["added_time_ids"],
                "image_only_indicator": torch.ones(2, 1, dtype=torch.bool),
            }
            torch.testing.assert_close(model(x[:, f : f + 1], t, alone), out[:, f : f + 1], atol=1e-5, rtol=0)


def test_image_and_video_clips_share_a_batch_without_touching_each_other():
    model = random_model("tiny")
    x, t, cond = inputs(model.config, frames=3)
    indicator = torch.tensor([[False, False, False], [True, True, True]])
    with torch.no_grad():
        joint = model(x, t, {**cond, "image_only_indicator": indicator})
        video = model(x, t, cond)  # no indicator: every frame is video
        images = model(x, t, {**cond, "image_only_indicator": torch.ones(2, 3, dtype=torch.bool)})
    torch.testing.assert_close(joint[0], video[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(joint[1], images[1], atol=1e-6, rtol=0)
    assert (video[1] - images[1]).abs().max() > 1e-2  # the temporal path does matter for video frames


# ----------------------------------------------------------------------------- training features


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    plain = random_model("tiny").train()
    checkpointed = random_model(UNetSVDConfig.from_name("tiny", gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, cond = inputs(plain.config, frames=3)
    outputs, grads = [], []
    for model in (plain, checkpointed):
        out = model(x, t, cond)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_temporal_and_spatial_parameter_names_partition_the_model():
    with torch.device("meta"):
        model = UNetSVD(UNetSVDConfig.from_name("svd"))
    temporal, spatial = set(model.temporal_parameter_names()), set(model.spatial_parameter_names())
    every = {name for name, _ in model.named_parameters()}
    assert temporal | spatial == every and not temporal & spatial
    blocks = [m for m in model.modules() if isinstance(m, model.block_classes())]
    resblocks = [m for m in blocks if isinstance(m, SpatioTemporalResBlock)]
    transformers = [m for m in blocks if isinstance(m, SpatioTemporalTransformer)]
    assert (len(resblocks), len(transformers)) == (4 * 2 + 2 + 4 * 3, 3 * 2 + 1 + 3 * 3)  # down, mid, up
    mix = {n for n in every if n.endswith("mix_factor")}
    assert len(mix) == len(blocks) and mix <= temporal
    assert "down.0.res.0.temporal.conv1.weight" in temporal and "down.0.res.0.spatial.conv1.weight" in spatial
    assert (
        "down.0.attn.0.temporal_blocks.0.attn1.qkv.weight" in temporal
        and "down.0.attn.0.frame_embed.0.weight" in temporal
    )
    assert "down.0.attn.0.blocks.0.attn1.qkv.weight" in spatial and "time_embed.mlp.0.weight" in spatial
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    # the sgm key manifest's parameters under time_stack, time_mixer and time_pos_embed: 43% of the UNet
    assert sum(sizes[n] for n in temporal) == 656_076_838
