"""Vista's additions to UNet-SVD: the given frames' time-embedding MLP (``cond_frame_time_embed``) and the
zero-initialised action key/value projections of every cross-attention (``action_dim``). A converted SVD model with
both on computes what SVD computes (diffusers parity), zero actions are the unconditional model, the weights readers
fill the layers an SVD file lacks explicitly, and ``given_mask`` selects the copied MLP per frame."""

from __future__ import annotations

import json

import pytest
import torch

from vdiff.models.unet_svd import UNET_SVD_CONFIGS, UNetSVD, UNetSVDConfig
from vdiff.nn.unet_blocks import ContextCrossAttention, SpatioTemporalResBlock, SpatioTemporalTransformer
from vdiff.weights.unet_svd import (
    UNetSVDConfigError,
    UNetSVDConversionError,
    fill_vista_extensions,
    load_unet_svd,
    read_diffusers_config,
    read_unet_svd,
    save_unet_svd,
)

ACTION_DIM = 24
TOL = 1e-5  # fp32 parity bound (diffusers; per-frame vs per-clip embedding GEMM shapes)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_(model: torch.nn.Module, seed: int, only: str | None = None) -> torch.nn.Module:
    """Make every parameter (or those whose name contains ``only``) random, zero-initialised layers included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


def tiny(**overrides) -> UNetSVDConfig:
    return UNetSVDConfig.from_name("tiny", **overrides)


def vista(config: UNetSVDConfig) -> UNetSVDConfig:
    return config.replace(cond_frame_time_embed=True, action_dim=ACTION_DIM)


def svd_and_vista(seed: int = 0) -> tuple[UNetSVD, UNetSVD]:
    """A random tiny SVD model and a Vista model (both layers on) with its weights, the added layers as initialised."""
    svd = perturb_(UNetSVD(tiny()), seed).eval()
    model = UNetSVD(vista(tiny())).eval()
    result = model.load_state_dict(svd.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(model.vista_parameter_names())
    model.init_cond_time_embed_from_main()
    return svd, model


def inputs(config: UNetSVDConfig, batch: int = 2, frames: int = 3, size=(8, 8), tokens: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, config.in_channels - config.concat_channels, *size, generator=g)
    cond = {
        "context": torch.randn(batch, tokens, config.context_dim, generator=g),
        "concat": torch.randn(batch, frames, config.concat_channels, *size, generator=g),
        "added_time_ids": torch.randn(batch, config.num_added_time_ids, generator=g) * 3,
    }
    return x, torch.randn(batch, generator=g), cond


def first_frames_given(batch: int, frames: int, given: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, frames, 1, 1, 1, dtype=torch.bool)
    mask[:, :given] = True
    return mask


def random_actions(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, ACTION_DIM, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- configs and parameters


def test_presets_are_unchanged_and_the_layers_exist_only_when_asked_for():
    for config in UNET_SVD_CONFIGS.values():
        assert config.cond_frame_time_embed is False and config.action_dim == 0
    plain, model = UNetSVD(tiny()), UNetSVD(vista(tiny()))
    assert plain.cond_time_embed is None and plain.vista_parameter_names() == []
    names = model.vista_parameter_names()
    transformers = [m for m in model.modules() if isinstance(m, SpatioTemporalTransformer)]
    depth = model.config.transformer_depth
    # one action_kv per cross-attention: spatial and temporal, per depth, per transformer; 4 tensors of the copy
    assert sum("action_kv" in n for n in names) == 2 * depth * len(transformers)
    assert sorted(n for n in names if "action_kv" not in n) == sorted(
        "cond_" + n for n, _ in model.named_parameters() if n.startswith("time_embed.")
    )
    assert set(model.temporal_parameter_names()) == set(plain.temporal_parameter_names())
    assert set(model.spatial_parameter_names()) == set(plain.spatial_parameter_names())  # a three-way partition
    with pytest.raises(ValueError, match="action_dim"):
        UNetSVD(tiny(action_dim=-1))


def test_at_construction_the_copy_equals_the_main_mlp_and_the_projections_are_zero():
    model = UNetSVD(vista(tiny()))
    for (_, ours), (_, main) in zip(model.cond_time_embed.named_parameters(), model.time_embed.named_parameters()):
        torch.testing.assert_close(ours, main, atol=0, rtol=0)
    attentions = [m for m in model.modules() if isinstance(m, ContextCrossAttention)]
    assert attentions and all(m.action_kv.weight.abs().max() == 0 for m in attentions)
    assert all(m.action_kv.bias is None for m in attentions)


# ----------------------------------------------------------------------------- actions


def test_zero_actions_are_the_unconditional_model_with_the_same_weights():
    """Random (non-zero) action projections: zero actions add nothing to any key or value."""
    svd, model = svd_and_vista()
    perturb_(model, seed=7, only="action_kv")
    x, t, cond = inputs(model.config)
    with torch.no_grad():
        expected = svd(x, t, cond)
        got = model(x, t, {**cond, "actions": torch.zeros(2, ACTION_DIM)})
        moved = model(x, t, {**cond, "actions": random_actions(2)})
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert (moved - expected).abs().max() > 1e-3  # trained projections do condition the output


def test_zero_initialised_projections_leave_the_output_unchanged_for_any_actions():
    svd, model = svd_and_vista()
    x, t, cond = inputs(model.config)
    with torch.no_grad():
        expected = svd(x, t, cond)
        got = model(x, t, {**cond, "actions": random_actions(2)})
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_actions_reach_spatial_and_temporal_cross_attention():
    _, model = svd_and_vista()
    x, t, cond = inputs(model.config)
    cond = {**cond, "actions": random_actions(2)}
    with torch.no_grad():
        base = model(x, t, cond)
    for part in ("blocks", "temporal_blocks"):
        other = UNetSVD(model.config).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            for name, p in other.named_parameters():
                if "action_kv" in name and f".{part}." in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            assert (other(x, t, cond) - base).abs().max() > 1e-4, part


def test_actions_are_required_with_action_dim_and_refused_without():
    _, model = svd_and_vista()
    x, t, cond = inputs(model.config)
    with pytest.raises(ValueError, match=r"cond\['actions'\] \(B, 24\)"):
        model(x, t, cond)
    with pytest.raises(ValueError, match=r"cond\['actions'\] must be \(2, 24\)"):
        model(x, t, {**cond, "actions": torch.zeros(2, 23)})
    with pytest.raises(ValueError, match="action_dim=0"):
        UNetSVD(tiny())(x, t, {**cond, "actions": torch.zeros(2, ACTION_DIM)})


def test_activation_checkpointing_with_actions_and_given_frames_gives_the_same_output_and_gradients():
    _, model = svd_and_vista()
    perturb_(model, seed=3, only="action_kv")
    perturb_(model, seed=4, only="cond_time_embed")
    x, t, cond = inputs(model.config)
    cond, mask = {**cond, "actions": random_actions(2)}, first_frames_given(2, 3)
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        out = model(x, t, cond, mask)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if model.is_vista_parameter(n)}
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for name, grad in results[0][1].items():
        assert grad.abs().max() > 0, name  # the added layers learn (actions and given frames)
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the given frames' time embedding


def test_given_mask_selects_the_copied_mlp_per_frame():
    _, model = svd_and_vista()
    perturb_(model, seed=11, only="cond_time_embed")
    B, T = 2, 4
    t = torch.randn(B)
    ids = torch.randn(B, model.config.num_added_time_ids)
    with torch.no_grad():
        main = model.time_embed(t) + model.added_time_embed(ids)  # (B, E)
        copy = model.cond_time_embed(t) + model.added_time_embed(ids)
        mask = torch.zeros(B, T, 1, 8, 8, dtype=torch.bool)
        mask[0, :2] = True  # clip 0: frames 0, 1 given
        mask[1, 3] = True  # clip 1: frame 3 given ...
        mask[1, 2, :, :4] = True  # ... and half of frame 2 (a spatial mask: not a given frame)
        emb = model.time_embedding(t, ids, mask, T)
        assert emb.shape == (B, T, main.shape[-1])
        given = torch.tensor([[True, True, False, False], [False, False, False, True]])
        torch.testing.assert_close(model.given_frames(mask, B, T), given, atol=0, rtol=0)
        for b in range(B):
            for f in range(T):
                torch.testing.assert_close(emb[b, f], (copy if given[b, f] else main)[b], atol=1e-6, rtol=0)
        assert (copy - main).abs().max() > 1e-3
        # no given frame, no mask, or the copy off: one embedding per clip, the main MLP's, bit for bit
        for m in (None, torch.zeros(B, T, 1, 1, 1, dtype=torch.bool), mask[:, :, :, :1, :1] & False):
            torch.testing.assert_close(model.time_embedding(t, ids, m, T), main[:, None], atol=0, rtol=0)
        plain = UNetSVD(tiny())
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not model.is_vista_parameter(k)})
        assert plain.time_embedding(t, ids, mask, T).shape == (B, 1, main.shape[-1])


def test_a_mask_broadcast_over_the_batch_selects_the_same_frames_in_every_clip():
    model = UNetSVD(vista(tiny()))
    mask = torch.tensor([True, False, True]).view(1, 3, 1, 1, 1)
    expected = torch.tensor([[True, False, True]] * 4)
    torch.testing.assert_close(model.given_frames(mask, 4, 3), expected, atol=0, rtol=0)
    torch.testing.assert_close(model.given_frames(mask[0], 4, 3), expected, atol=0, rtol=0)  # (T, 1, 1, 1)


def test_the_copy_changes_the_output_only_when_a_frame_is_given():
    svd, model = svd_and_vista()
    x, t, cond = inputs(model.config, frames=4)
    cond = {**cond, "actions": torch.zeros(2, ACTION_DIM)}
    mask = first_frames_given(2, 4, given=2)
    with torch.no_grad():
        same_free, same_given = model(x, t, cond), model(x, t, cond, mask)
        torch.testing.assert_close(same_given, svd(x, t, {k: v for k, v in cond.items() if k != "actions"}), atol=TOL,
                                   rtol=0)  # fmt: skip
        perturb_(model, seed=13, only="cond_time_embed")
        free, given = model(x, t, cond), model(x, t, cond, mask)
    torch.testing.assert_close(free, same_free, atol=0, rtol=0)  # no given frame: the copy is not used
    assert (given - same_given).abs().max() > 1e-3


def test_per_frame_embeddings_reach_each_frame_of_the_spatial_and_temporal_resblocks():
    """A spatial ResBlock adds frame k's embedding to frame k only; the temporal ResBlock reads (B, T, E) per frame
    of its (B, C, T, H, W) input (rows all equal give the per-clip result)."""
    torch.manual_seed(0)
    C = 128  # 4 channels per GroupNorm group: a per-channel shift is not normalised away
    block = perturb_(SpatioTemporalResBlock(C, C, 16), seed=1).eval()
    B, T = 2, 3
    x = torch.randn(B * T, C, 4, 4)
    emb = torch.randn(B, 1, 16)
    per_frame = emb.expand(B, T, 16).clone()
    per_frame[:, 1] += 1.0  # frame 1 only
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb.expand(B, T, 16), T), block(x, emb, T), atol=1e-6, rtol=0)
        spatial_ref = block.spatial(x, emb).view(B, T, C, 4, 4)
        spatial = block.spatial(x, per_frame).view(B, T, C, 4, 4)
        torch.testing.assert_close(spatial[:, [0, 2]], spatial_ref[:, [0, 2]], atol=1e-6, rtol=0)
        assert (spatial[:, 1] - spatial_ref[:, 1]).abs().max() > 1e-3
        h = spatial_ref.transpose(1, 2).contiguous()  # (B, C, T, H, W)
        rows_equal = block.temporal(h, emb.expand(B, T, 16))
        torch.testing.assert_close(rows_equal, block.temporal(h, emb), atol=1e-6, rtol=0)
        # frame 1's embedding enters frame 1 between the two (3,1,1) convs (its neighbours see it through conv2)
        conv1 = block.temporal.conv1(torch.nn.functional.silu(block.temporal.norm1(h)))  # (B, C, T, H, W)
        e = block.temporal.emb_proj(torch.nn.functional.silu(per_frame)).transpose(1, 2)  # (B, C, T)
        inner = conv1 + e[..., None, None]
        expected = h + block.temporal.conv2(torch.nn.functional.silu(block.temporal.norm2(inner)))
        torch.testing.assert_close(block.temporal(h, per_frame), expected, atol=1e-6, rtol=0)
        assert (block.temporal(h, per_frame) - rows_equal).abs().max() > 1e-3


# ----------------------------------------------------------------------------- weights: SVD files into Vista configs


def test_a_converted_diffusers_svd_with_vista_layers_computes_what_diffusers_computes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), layers_per_block=1,
        cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, num_frames=6,
    )  # fmt: skip
    perturb_(theirs, seed=1).eval()
    theirs.save_pretrained(tmp_path / "unet")
    config = vista(read_diffusers_config(tmp_path / "unet" / "config.json"))
    weights = read_unet_svd(tmp_path / "unet", config=config)
    model = UNetSVD(weights.config).eval()
    assert weights.config == config
    assert set(weights.filled) == set(model.vista_parameter_names())  # the explicit fill, listed
    model.load_state_dict(weights.state_dict, strict=True)
    for name in weights.filled:
        if "action_kv" in name:
            assert weights.state_dict[name].abs().max() == 0
        else:
            main = weights.state_dict[name.removeprefix("cond_")]
            torch.testing.assert_close(weights.state_dict[name], main, atol=0, rtol=0)
            assert weights.state_dict[name].data_ptr() != main.data_ptr()  # a copy, not a shared tensor

    g = torch.Generator().manual_seed(0)
    B, T, size = 2, 3, (8, 8)
    x = torch.randn(B, T, 4, *size, generator=g)
    cond = {
        "context": torch.randn(B, 1, 32, generator=g),
        "concat": torch.randn(B, T, 4, *size, generator=g),
        "added_time_ids": torch.randn(B, 3, generator=g) * 3,
    }
    t = torch.randn(B, generator=g)
    with torch.no_grad():
        expected = theirs(torch.cat([x, cond["concat"]], 2), t, cond["context"], cond["added_time_ids"]).sample
        results = {
            "no frame given, zero actions": model(x, t, {**cond, "actions": torch.zeros(B, ACTION_DIM)}),
            "frame 0 given, zero actions": model(x, t, {**cond, "actions": torch.zeros(B, ACTION_DIM)},
                                                 first_frames_given(B, T)),
            "frames 0-1 given, random actions": model(x, t, {**cond, "actions": random_actions(B)},
                                                      first_frames_given(B, T, 2)),
        }  # fmt: skip
    assert expected.abs().max() > 0.5
    for what, got in results.items():
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{what}: max abs diff {diff:.3g}"


def test_sgm_and_plain_vdiff_files_fill_the_layers_and_vista_vdiff_files_round_trip(tmp_path):
    svd = perturb_(UNetSVD(tiny()), seed=2).eval()
    save_unet_svd(svd, tmp_path / "svd.safetensors", layout="sgm")
    save_unet_svd(svd, tmp_path / "plain.safetensors", layout="vdiff")
    x, t, cond = inputs(svd.config)
    with torch.no_grad():
        expected = svd(x, t, cond)
    config = vista(tiny())
    for name in ("svd.safetensors", "plain.safetensors"):
        weights = read_unet_svd(tmp_path / name, config=config)  # the stored config has the layers off: no conflict
        assert weights.config == config and len(weights.filled) == len(UNetSVD(config).vista_parameter_names())
        model = load_unet_svd(tmp_path / name, config=config).eval()
        with torch.no_grad():
            got = model(x, t, {**cond, "actions": random_actions(2)}, first_frames_given(2, 3))
        assert (got - expected).abs().max() <= TOL, name

    trained = perturb_(load_unet_svd(tmp_path / "svd.safetensors", config=config), seed=9, only="action_kv")
    save_unet_svd(trained, tmp_path / "vista.safetensors", layout="vdiff")
    again = read_unet_svd(tmp_path / "vista.safetensors")
    assert again.filled == () and again.config == config
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(again.state_dict[key], value, atol=0, rtol=0)
    # a file holding Vista's layers does not load into a config without them (nothing is dropped silently)
    with pytest.raises(UNetSVDConfigError, match="action_dim"):
        read_unet_svd(tmp_path / "vista.safetensors", config=tiny())
    # and without its metadata, the strict checks name the layers the config does not have
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "vista.safetensors"), tmp_path / "bare.safetensors")
    with pytest.raises(UNetSVDConversionError, match="action_kv"):
        read_unet_svd(tmp_path / "bare.safetensors", layout="vdiff", config=tiny(cond_frame_time_embed=True))


def test_the_fill_touches_only_vista_layers_and_leaves_other_missing_keys_to_the_strict_checks():
    config = vista(tiny())
    state = {k: v for k, v in UNetSVD(tiny()).state_dict().items() if k != "conv_out.bias"}
    filled_state, filled = fill_vista_extensions(state, config)
    assert "conv_out.bias" not in filled_state and all(UNetSVD.is_vista_parameter(k) for k in filled)
    assert fill_vista_extensions(filled_state, tiny()) == (filled_state, ())
    metadata_config = json.loads(json.dumps(config.to_dict()))
    assert UNetSVDConfig.from_dict(metadata_config) == config  # the new fields survive a vdiff file's metadata
