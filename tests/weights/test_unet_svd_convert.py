"""UNet-SVD weights: parity with diffusers' UNetSpatioTemporalConditionModel loaded from a ``save_pretrained`` folder,
export back to diffusers (values and outputs), sgm and vdiff round trips, the sgm key manifest of the real SVD
UNet, config.json fields vdiff cannot represent, and strict errors naming keys and files."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights.unet_svd import (
    SGM_PREFIX,
    UNetSVDConfigError,
    UNetSVDConversionError,
    config_from_diffusers,
    from_sgm,
    load_unet_svd,
    peer_names,
    read_unet_svd,
    save_unet_svd,
    sgm_manifest,
    to_diffusers,
    to_sgm,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # fp32 parity bound
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"
# Two tiny diffusers configs: SVD's block pattern (attention everywhere but the last level) over two levels, and
# three levels with two res blocks, two transformer layers and an image of odd size (upsampling to skip sizes).
DIFFUSERS_CONFIGS = {
    "two-levels": dict(
        in_channels=8, out_channels=4, block_out_channels=(32, 64), down_block_types=(CROSS_DOWN, PLAIN_DOWN),
        up_block_types=(PLAIN_UP, CROSS_UP), layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=6,
    ),
    "three-levels": dict(
        in_channels=6, out_channels=3, block_out_channels=(32, 32, 64), down_block_types=(CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
        up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP), layers_per_block=2, transformer_layers_per_block=2,
        cross_attention_dim=24, num_attention_heads=(2, 2, 4), addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=48, num_frames=9,
    ),
}  # fmt: skip
# (batch, frames, (H, W), context tokens) of the parity inputs: frame counts other than the configs' num_frames
INPUTS = {"two-levels": (2, 3, (8, 8), 1), "three-levels": (2, 5, (10, 12), 3)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make every parameter random (norm affines, mix factors and zero-initialised layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


def diffusers_unet(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return perturb_(diffusers.UNetSpatioTemporalConditionModel(**DIFFUSERS_CONFIGS[name]), seed + 1).eval()


def make_inputs(config: UNetSVDConfig, batch: int, frames: int, size: tuple[int, int], tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, config.in_channels - config.concat_channels, *size, generator=g)
    concat = torch.randn(batch, frames, config.concat_channels, *size, generator=g)
    context = torch.randn(batch, tokens, config.context_dim, generator=g)
    ids = torch.randn(batch, config.num_added_time_ids, generator=g) * 3
    return x, torch.randn(batch, generator=g), {"context": context, "concat": concat, "added_time_ids": ids}


def diffusers_forward(theirs, x, t, cond) -> torch.Tensor:
    sample = torch.cat([x, cond["concat"]], dim=2)  # (B, T, C_in, H, W): diffusers takes the concatenation
    return theirs(sample, t, cond["context"], cond["added_time_ids"]).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_a_diffusers_folder_loads_and_computes_what_diffusers_computes(name, tmp_path):
    theirs = diffusers_unet(name)
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet_svd(tmp_path / "unet").eval()
    assert ours.config.norm_eps == "diffusers" and ours.config.num_frames == DIFFUSERS_CONFIGS[name]["num_frames"]
    batch, frames, size, tokens = INPUTS[name]
    x, t, cond = make_inputs(ours.config, batch, frames, size, tokens)
    assert frames != ours.config.num_frames and batch > 1
    with torch.no_grad():
        expected = diffusers_forward(theirs, x, t, cond)
        got = ours(x, t, cond)
    assert got.shape == expected.shape == (batch, frames, ours.config.out_channels, *size)
    assert max_diff(got, expected) <= TOL, f"max abs diff {max_diff(got, expected):.3g}"
    assert expected.abs().max() > 0.5  # a real signal, not zeros


def test_a_pipeline_folder_is_read_from_its_unet_subfolder(tmp_path):
    theirs = diffusers_unet("two-levels")
    theirs.save_pretrained(tmp_path / "pipeline" / "unet")
    weights = read_unet_svd(tmp_path / "pipeline")
    assert weights.layout == "diffusers" and weights.config_source == str(
        tmp_path / "pipeline" / "unet" / "config.json"
    )
    # a bare diffusion_pytorch_model.safetensors finds its config.json beside it
    bare = read_unet_svd(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert bare.layout == "diffusers" and bare.config == weights.config


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_export_to_diffusers_gives_back_the_same_values_and_outputs(name, tmp_path):
    theirs = diffusers_unet(name, seed=3)
    theirs.save_pretrained(tmp_path / "original")
    ours = load_unet_svd(tmp_path / "original").eval()
    save_unet_svd(ours, tmp_path / "exported", layout="diffusers")
    again = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "exported").eval()
    original, exported = theirs.state_dict(), again.state_dict()
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    batch, frames, size, tokens = INPUTS[name]
    x, t, cond = make_inputs(ours.config, batch, frames, size, tokens, seed=5)
    with torch.no_grad():
        assert max_diff(diffusers_forward(again, x, t, cond), ours(x, t, cond)) <= TOL


@pytest.mark.parametrize("save", [dict(max_shard_size="200KB"), dict(variant="fp16")], ids=["sharded", "fp16-variant"])
def test_sharded_and_fp16_variant_folders_load(tmp_path, save):
    theirs = diffusers_unet("two-levels")
    theirs.save_pretrained(tmp_path / "unet", **save)
    weights = read_unet_svd(tmp_path / "unet")
    assert weights.weights_path.name.startswith("diffusion_pytorch_model")
    if "max_shard_size" in save:
        assert (
            weights.weights_path.name.endswith(".index.json")
            and len(list((tmp_path / "unet").glob("*.safetensors"))) > 1
        )
    ours = load_unet_svd(tmp_path / "unet")
    for key, value in to_diffusers(ours.state_dict(), ours.config).items():
        assert torch.equal(value, theirs.state_dict()[key]), key


# ----------------------------------------------------------------------------- sgm and vdiff files


def tiny_model(seed: int = 0, **overrides) -> UNetSVD:
    torch.manual_seed(seed)
    return perturb_(UNetSVD(UNetSVDConfig.from_name("tiny", **overrides)), seed + 1).eval()


def test_sgm_export_import_round_trip(tmp_path):
    ours = tiny_model()
    path = save_unet_svd(ours, tmp_path / "svd_tiny.safetensors", layout="sgm")
    stored = load_file(str(path))
    assert stored and all(k.startswith(SGM_PREFIX) for k in stored)
    assert f"{SGM_PREFIX}input_blocks.1.0.time_stack.in_layers.2.weight" in stored  # sgm's names
    assert f"{SGM_PREFIX}input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight" in stored  # qkv un-fused
    # an SVD checkpoint holds more than the UNet: the other parts are not read
    save_file(
        {**stored, "first_stage_model.decoder.conv_in.weight": torch.zeros(2), "conditioner.x": torch.zeros(1)},
        str(path),
    )
    back = load_unet_svd(path, config="tiny").eval()
    assert back.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x, t, cond = make_inputs(ours.config, 2, 3, (8, 8), 1)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, cond), ours(x, t, cond), atol=0, rtol=0)


def test_vdiff_file_round_trip_keeps_the_config(tmp_path):
    ours = tiny_model(num_frames=7)
    path = save_unet_svd(ours, tmp_path / "unet.safetensors")
    weights = read_unet_svd(path)
    assert weights.layout == "vdiff" and weights.config == ours.config and "metadata" in weights.config_source
    back = load_unet_svd(path, config=ours.config.replace(gradient_checkpointing=True))
    assert back.gradient_checkpointing  # runtime-only field taken from the config passed
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_exports_refuse_a_layout_whose_norm_epsilons_differ(tmp_path):
    sgm_eps = tiny_model()
    with pytest.raises(UNetSVDConfigError, match="norm_eps='sgm' has no diffusers equivalent"):
        save_unet_svd(sgm_eps, tmp_path / "folder", layout="diffusers")
    with pytest.raises(UNetSVDConfigError, match="norm_eps='diffusers' has no sgm equivalent"):
        to_sgm(tiny_model(norm_eps="diffusers").state_dict(), UNetSVDConfig.from_name("tiny", norm_eps="diffusers"))


# ----------------------------------------------------------------------------- the real SVD UNet, on meta


def test_sgm_manifest_of_the_real_svd_unet_matches_the_converter():
    manifest = sgm_manifest()
    assert manifest["repo"] == "Stability-AI/generative-models"
    assert manifest["commit"] == "0ad7de9a5cb53fd63d6d30a4f385485e72e08597"
    keys = {k: tuple(v) for k, v in manifest["keys"].items()}
    assert len(keys) == 1428 and sum(math.prod(s) for s in keys.values()) == manifest["num_parameters"] == 1_524_623_082
    config = UNetSVDConfig.from_name("svd")
    with torch.device("meta"):
        model = UNetSVD(config)
    exported = {k: tuple(v.shape) for k, v in to_sgm(model.state_dict(), config).items()}
    assert exported == keys
    imported = from_sgm({k: torch.empty(s, device="meta") for k, s in keys.items()}, config)
    model.load_state_dict(imported, strict=True, assign=True)
    # the temporal parameter group is exactly sgm's time_stack / time_mixer / time_pos_embed
    temporal = {k for k in keys if any(m in k for m in ("time_stack", "time_mixer", "time_pos_embed"))}
    ours = {
        SGM_PREFIX + n
        for k in model.state_dict()
        if model.is_temporal_parameter(k)
        for n in peer_names(k, config, "sgm")
    }
    assert ours == temporal


def test_sgm_manifest_agrees_with_diffusers_real_config():
    """An independent check of the hand-derived manifest: diffusers' port of the same UNet has as many tensors of
    the same shapes (every one of its names maps to one of sgm's; vdiff is not involved)."""
    with torch.device("meta"):
        theirs = diffusers.UNetSpatioTemporalConditionModel()  # its defaults are SVD's config
    shapes = Counter(tuple(v.shape) for v in theirs.state_dict().values())
    assert shapes == Counter(tuple(v) for v in sgm_manifest()["keys"].values())


# ----------------------------------------------------------------------------- errors


def write_folder(tmp_path: Path, name: str = "two-levels") -> Path:
    folder = tmp_path / "unet"
    diffusers_unet(name).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(transformer_layers_per_block_x=1), "transformer_layers_per_block_x"),
        (dict(_class_name="UNet2DConditionModel"), "_class_name"),
        (dict(num_attention_heads=[2, 2]), "num_attention_heads"),
        (dict(up_block_types=[CROSS_UP, CROSS_UP]), "up_block_types"),
        (dict(layers_per_block=[1, 2]), "layers_per_block"),
        (dict(down_block_types=["CrossAttnDownBlock2D", PLAIN_DOWN]), "down_block_types"),
        (dict(projection_class_embeddings_input_dim=20), "projection_class_embeddings_input_dim"),
        (dict(block_out_channels=[32, 48]), "block_out_channels"),
    ],
)
def test_a_config_json_vdiff_cannot_represent_fails_naming_the_file_and_field(tmp_path, change, field):
    folder = write_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UNetSVDConfigError, match=field) as error:
        read_unet_svd(folder)
    assert str(folder / "config.json") in str(error.value)


def test_missing_unexpected_and_misshaped_tensors_are_named_with_the_file(tmp_path):
    folder = write_folder(tmp_path)
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    del tensors["down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_k.weight"]
    tensors["down_blocks.0.resnets.0.spatial_res_block.extra.weight"] = torch.zeros(1)
    tensors["mid_block.resnets.1.temporal_res_block.conv1.weight"] = torch.zeros(64, 64, 3, 3, 3)
    save_file(tensors, str(path))
    with pytest.raises(UNetSVDConversionError) as error:
        read_unet_svd(folder)
    message = str(error.value)
    assert str(path) in message
    assert "missing (1)" in message and "temporal_transformer_blocks.0.attn1.to_k.weight" in message
    assert "unexpected (1)" in message and "spatial_res_block.extra.weight" in message
    assert "shape mismatch (1)" in message and "temporal_res_block.conv1.weight: (64, 64, 3, 3, 3)" in message


def test_an_sgm_file_without_the_unet_prefix_or_with_wrong_shapes_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UNetSVDConversionError, match=r"model\.diffusion_model\.\* \(no tensor has this prefix\)"):
        read_unet_svd(path, layout="sgm")
    ours = tiny_model()
    save_unet_svd(ours, path, layout="sgm")
    with pytest.raises(UNetSVDConversionError, match=str(path)) as error:
        read_unet_svd(path)  # no config: the svd preset, which these tiny tensors do not fit
    assert "input_blocks.0.0.weight" in str(error.value)


def test_a_passed_config_may_not_contradict_the_stored_one(tmp_path):
    folder = write_folder(tmp_path)
    stored = read_unet_svd(folder).config
    with pytest.raises(UNetSVDConfigError, match="head_dim: passed 32"):
        read_unet_svd(folder, config=stored.replace(head_dim=32))
    with pytest.raises(UNetSVDConfigError, match="norm_eps: passed 'sgm'"):
        read_unet_svd(folder, config=stored.replace(norm_eps="sgm"))
    # fields config.json does not hold come from the config passed
    assert read_unet_svd(folder, config=stored.replace(concat_channels=2)).config.concat_channels == 2


def test_config_from_diffusers_of_the_svd_defaults_is_the_svd_preset():
    config = config_from_diffusers({"_class_name": "UNetSpatioTemporalConditionModel"})
    assert config == UNetSVDConfig.from_name("svd-xt", norm_eps="diffusers")  # diffusers' default num_frames is 25
