"""CLIP image-embedder weights (vdiff.weights.clip): transformers folders and open_clip / SVD files into the timm-based
CLIPImageEmbedder, checked against the peers' own outputs (a committed golden from transformers and open_clip, and
live transformers / open_clip models when installed), strictness (every bad key named with the file), config
refusals naming the file and field, and $VDIFF_WEIGHTS lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vdiff.models.conditioners import CLIPImageEmbedderConfig
from vdiff.weights import safetensors_io
from vdiff.weights.clip import (
    SGM_CLIP_PREFIX,
    CLIPConfigError,
    CLIPConversionError,
    config_from_transformers,
    load_clip_image_embedder,
    read_clip_image_embedder,
)
from vdiff.weights.safetensors_io import save_state_dict

TOL = 1e-5  # fp32 parity bound
GOLDEN = Path(__file__).parents[1] / "models" / "fixtures" / "clip_tiny_golden.safetensors"
TINY = CLIPImageEmbedderConfig.from_name("tiny")


@pytest.fixture(scope="module")
def golden() -> dict:
    """Tensors of the committed golden by group (``transformers``, ``open_clip``, ``io``) and its config.json."""
    groups: dict = {"transformers": {}, "open_clip": {}, "io": {}}
    with safe_open(str(GOLDEN), framework="pt") as f:
        for key in list(f.keys()):
            group, name = key.split(".", 1)
            groups[group][name] = f.get_tensor(key)
        groups["config"] = json.loads(f.metadata()["transformers_config"])
    return groups


def transformers_folder(folder: Path, state_dict: dict, config: dict, weights: str = "model.safetensors") -> Path:
    """A folder as CLIPVisionModelWithProjection.save_pretrained writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_state_dict(state_dict, folder / weights)
    return folder


def embed(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().embed_pixels(pixels)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- parity


def test_transformers_folder_matches_golden(golden, tmp_path):
    folder = transformers_folder(tmp_path / "image_encoder", golden["transformers"], golden["config"])
    weights = read_clip_image_embedder(folder)
    assert weights.layout == "transformers" and weights.config == TINY
    assert weights.config_source == str((folder / "config.json").absolute())
    model = load_clip_image_embedder(folder)
    io = golden["io"]
    assert io["pixels"].shape[0] == 3
    assert max_err(embed(model, io["pixels"]), io["transformers_embeds"]) <= TOL
    with torch.no_grad():  # end to end: [-1, 1] frames through SVD's preprocessing (diffusers' in the golden)
        tokens = model(io["frames"])
    assert tokens.shape == (3, 1, 24)
    assert max_err(tokens[:, 0], io["transformers_embeds"]) <= TOL
    # a diffusers pipeline folder holding it under image_encoder/
    assert load_clip_image_embedder(tmp_path).config == TINY


def test_transformers_live_model(tmp_path):
    """A tiny random transformers CLIPVisionModelWithProjection (quick_gelu, pre-layernorm), save_pretrained, load."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        projection_dim=40,
        num_hidden_layers=3,
        num_attention_heads=6,
        image_size=28,
        patch_size=7,
        layer_norm_eps=1e-6,
    )
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path / "one")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    pixels = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).image_embeds
    for folder in ("one", "sharded"):
        model = load_clip_image_embedder(tmp_path / folder)
        assert model.config == CLIPImageEmbedderConfig(
            image_size=28,
            patch_size=7,
            width=48,
            depth=3,
            num_heads=6,
            mlp_dim=96,
            embed_dim=40,
            act="quick_gelu",
            norm_eps=1e-6,
        )
        assert max_err(embed(model, pixels), expected) <= TOL


def test_open_clip_visual_keys_match_golden(golden, tmp_path):
    path = tmp_path / "open_clip.safetensors"
    save_state_dict({f"visual.{k}": v for k, v in golden["open_clip"].items()}, path)
    model = load_clip_image_embedder(path, config="tiny")
    io = golden["io"]
    assert max_err(embed(model, io["pixels"]), io["open_clip_embeds"]) <= TOL
    # bare visual keys (no prefix) and a full CLIP state dict's text-tower keys (skipped) load the same
    bare = tmp_path / "bare.pt"
    save_state_dict(dict(golden["open_clip"]), bare)
    assert max_err(embed(load_clip_image_embedder(bare, config="tiny"), io["pixels"]), io["open_clip_embeds"]) <= TOL
    full = tmp_path / "full.safetensors"
    text = {
        "logit_scale": torch.ones(()),
        "token_embedding.weight": torch.zeros(10, 8),
        "ln_final.weight": torch.ones(8),
    }
    save_state_dict({**{f"visual.{k}": v for k, v in golden["open_clip"].items()}, **text}, full)
    weights = read_clip_image_embedder(full, config=TINY)
    assert weights.layout == "open_clip" and weights.config_source == "argument"


def test_svd_checkpoint_prefix_matches_golden(golden, tmp_path):
    """svd.safetensors: the image tower under conditioner.embedders.0.open_clip.model.visual., the rest skipped."""
    path = tmp_path / "svd.safetensors"
    others = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 8, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "conditioner.embedders.0.open_clip.model.logit_scale": torch.ones(()),
        "conditioner.embedders.0.open_clip.model.positional_embedding": torch.zeros(77, 8),
        "conditioner.embedders.3.encoder.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
    }
    save_state_dict({**{SGM_CLIP_PREFIX + k: v.half() for k, v in golden["open_clip"].items()}, **others}, path)
    model = load_clip_image_embedder(path, config="tiny")
    assert model.proj.weight.dtype == torch.float32  # float16 file, float32 model
    io = golden["io"]
    half = {k: v.half().float() for k, v in golden["open_clip"].items()}  # the reference on the rounded weights
    expected = load_clip_image_embedder(_save(tmp_path / "half.safetensors", half), config="tiny")
    assert max_err(embed(model, io["pixels"]), embed(expected, io["pixels"])) == 0.0
    assert max_err(embed(model, io["pixels"]), io["open_clip_embeds"]) < 1e-2  # float16 rounding only
    # without config=, the SVD prefix means ViT-H/14 (sgm's FrozenOpenCLIPImageEmbedder): tiny weights then mis-fit
    with pytest.raises(CLIPConversionError, match=r"svd\.safetensors.*config from svd: vit-h-14") as info:
        read_clip_image_embedder(path)
    assert f"{SGM_CLIP_PREFIX}conv1.weight [32, 3, 8, 8]: expected [1280, 3, 14, 14]" in str(info.value)


def _save(path: Path, visual: dict) -> Path:
    save_state_dict({f"visual.{k}": v for k, v in visual.items()}, path)
    return path


def test_open_clip_live_model(tmp_path):
    """Against open_clip itself (not a vdiff dependency: install it into a --target folder and put that on
    PYTHONPATH to run this; skipped otherwise)."""
    pytest.importorskip("open_clip")
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(0)
    tower = _build_vision_tower(
        16, CLIPVisionCfg(layers=2, width=40, head_width=10, mlp_ratio=3.0, patch_size=4, image_size=16)
    ).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = _save(tmp_path / "oc.safetensors", tower.state_dict())
    config = CLIPImageEmbedderConfig(
        image_size=16, patch_size=4, width=40, depth=2, num_heads=4, mlp_dim=120, embed_dim=16, act="gelu"
    )
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = tower(pixels)
    assert max_err(embed(load_clip_image_embedder(path, config=config), pixels), expected) <= TOL


# ----------------------------------------------------------------------------- strictness


def test_open_clip_bad_keys_all_named_with_the_file(golden, tmp_path):
    visual = {f"visual.{k}": v for k, v in golden["open_clip"].items()}
    del visual["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    visual["visual.proj"] = visual["visual.proj"].t().contiguous()  # stored the wrong way round
    visual["visual.transformer.resblocks.0.attn.extra"] = torch.zeros(3)
    visual["visual.transformer.resblocks.2.ln_1.weight"] = torch.ones(32)  # a block the config does not have
    path = tmp_path / "bad.safetensors"
    save_state_dict(visual, path)
    with pytest.raises(CLIPConversionError) as info:
        read_clip_image_embedder(path, config="tiny")
    message = str(info.value)
    assert str(path.absolute()) in message
    assert (
        "missing (1):\n    visual.transformer.resblocks.1.mlp.c_fc.bias  (vdiff visual.blocks.1.mlp.fc1.bias" in message
    )
    assert "visual.proj [24, 32]: expected [32, 24] (vdiff proj.weight, shape [24, 32])" in message
    assert "unexpected (2)" in message
    assert "visual.transformer.resblocks.0.attn.extra" in message and "resblocks.2.ln_1.weight" in message
    assert info.value.missing and info.value.mismatched and len(info.value.unexpected) == 2


def test_transformers_bad_keys_all_named_with_the_file(golden, tmp_path):
    state = dict(golden["transformers"])
    del state["visual_projection.weight"]
    state["vision_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    state["vision_model.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(64, 32)
    folder = transformers_folder(tmp_path / "bad", state, golden["config"])
    with pytest.raises(CLIPConversionError) as info:
        load_clip_image_embedder(folder)
    message = str(info.value)
    assert str((folder / "model.safetensors").absolute()) in message and "config from" in message
    assert "visual_projection.weight  (vdiff proj.weight, shape [24, 32])" in message
    assert "vision_model.encoder.layers.0.self_attn.k_proj.weight [16, 32]: expected [32, 32], [32, 32], [32, 32]" in (
        message
    )
    assert "unexpected (1):\n    vision_model.encoder.layers.7.mlp.fc1.weight" in message


def test_transformers_position_ids_buffer(golden, tmp_path):
    ok = {**golden["transformers"], "vision_model.embeddings.position_ids": torch.arange(17).unsqueeze(0)}
    load_clip_image_embedder(transformers_folder(tmp_path / "ok", ok, golden["config"]))
    bad = {**ok, "vision_model.embeddings.position_ids": torch.arange(17).flip(0).unsqueeze(0)}
    with pytest.raises(CLIPConversionError, match=r"position_ids: must be arange\(17\)"):
        load_clip_image_embedder(transformers_folder(tmp_path / "bad", bad, golden["config"]))


def test_open_clip_without_config_assumes_vit_h_14_and_warns(golden, tmp_path):
    path = _save(tmp_path / "oc.safetensors", golden["open_clip"])
    with (
        pytest.warns(UserWarning, match="assuming 'vit-h-14'.*ViT-H-14-quickgelu"),
        pytest.raises(CLIPConversionError, match="config from assumed: vit-h-14"),
    ):
        read_clip_image_embedder(path)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"hidden_act": "gelu_new"}, "hidden_act", "act must be one of"),
        ({"num_channels": 4}, "num_channels", "RGB"),
        ({"image_size": [32, 48]}, "image_size", "square"),
        ({"architectures": ["CLIPVisionModel"]}, "architectures", "CLIPVisionModelWithProjection"),
        ({"model_type": "siglip_vision_model"}, "model_type", "clip_vision_model"),
        ({"attention_dropout": 0.1}, "attention_dropout", "no dropout"),
        ({"num_attention_heads": 5}, "num_attention_heads", "not divisible by num_heads"),
    ],
)
def test_unrepresentable_transformers_config_names_file_and_field(golden, tmp_path, change, field, why):
    folder = transformers_folder(tmp_path / "m", golden["transformers"], {**golden["config"], **change})
    with pytest.raises(CLIPConfigError) as info:
        load_clip_image_embedder(folder)
    message = str(info.value)
    assert str(folder / "config.json") in message and f"{field}=" in message and why in message


def test_unknown_transformers_config_field_is_refused(golden, tmp_path):
    folder = transformers_folder(
        tmp_path / "m", golden["transformers"], {**golden["config"], "vision_feature_layer": -2}
    )
    with pytest.raises(
        CLIPConfigError, match=r"config\.json: unknown CLIPVisionConfig field\(s\) \['vision_feature_layer'\]"
    ):
        read_clip_image_embedder(folder)


def test_svd_image_encoder_config_reads_as_vit_h_14():
    """The fields of SVD's image_encoder/config.json (transformers 4.x wrote torch_dtype and _name_or_path)."""
    svd = {
        "_name_or_path": "image_encoder",
        "architectures": ["CLIPVisionModelWithProjection"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 224,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "projection_dim": 1024,
        "torch_dtype": "float16",
        "transformers_version": "4.34.0.dev0",
    }
    assert config_from_transformers(svd) == CLIPImageEmbedderConfig.from_name("vit-h-14")


def test_contradicting_config_and_configless_transformers_file(golden, tmp_path):
    folder = transformers_folder(tmp_path / "m", golden["transformers"], golden["config"])
    with pytest.raises(CLIPConfigError, match=r"act: passed 'gelu', .*config\.json says 'quick_gelu'"):
        read_clip_image_embedder(folder, config=TINY.replace(act="gelu"))
    assert read_clip_image_embedder(folder, config=TINY).config == TINY  # agreeing is fine
    lone = tmp_path / "lone" / "model.safetensors"
    save_state_dict(golden["transformers"], lone)
    with pytest.raises(CLIPConfigError, match=r"lone/model\.safetensors: transformers weights without a config\.json"):
        read_clip_image_embedder(lone)
    assert read_clip_image_embedder(lone, config="tiny").layout == "transformers"
    # a weights file with config.json beside it reads that config
    assert read_clip_image_embedder(folder / "model.safetensors").config_source == str(folder / "config.json")


# ----------------------------------------------------------------------------- files


def test_missing_file_names_the_file_the_env_and_the_paths_tried(tmp_path, monkeypatch):
    monkeypatch.setenv(safetensors_io.WEIGHTS_ENV, str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError) as info:
        read_clip_image_embedder("svd/image_encoder")
    message = str(info.value)
    assert "CLIP image-embedder weights" in message and "svd/image_encoder" in message
    assert str(tmp_path / "store" / "svd" / "image_encoder") in message and "VDIFF_WEIGHTS" in message
    monkeypatch.delenv(safetensors_io.WEIGHTS_ENV)
    with pytest.raises(FileNotFoundError, match=r"\$VDIFF_WEIGHTS is not set"):
        read_clip_image_embedder(tmp_path / "nothing.safetensors")


def test_relative_path_found_under_vdiff_weights(golden, tmp_path, monkeypatch):
    transformers_folder(tmp_path / "store" / "svd" / "image_encoder", golden["transformers"], golden["config"])
    monkeypatch.setenv(safetensors_io.WEIGHTS_ENV, str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    weights = read_clip_image_embedder("svd")  # a pipeline folder under $VDIFF_WEIGHTS
    assert weights.weights_path == (tmp_path / "store" / "svd" / "image_encoder" / "model.safetensors")


def test_folder_without_weights_and_unknown_keys(golden, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(golden["config"]))
    with pytest.raises(FileNotFoundError, match=r"no weights file .*found: \['config.json'\]"):
        read_clip_image_embedder(folder)
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="not a transformers CLIP image-encoder folder"):
        read_clip_image_embedder(tmp_path / "no_config")
    other = tmp_path / "unet.safetensors"
    save_state_dict({"model.diffusion_model.out.0.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="holds no CLIP image-tower keys"):
        read_clip_image_embedder(other)


def test_load_in_another_dtype(golden, tmp_path):
    folder = transformers_folder(tmp_path / "m", golden["transformers"], golden["config"])
    model = load_clip_image_embedder(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in model.state_dict().values())
