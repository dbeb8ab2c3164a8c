"""VDT: shapes for any clip length, init, locality of temporal/spatial attention, options, and loading
checkpoints of the reference implementation through the hand-written key manifest."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vdiff.weights as weights_package
from vdiff.models.vdt import VDT, VDT_CONFIGS, VDTConfig
from vdiff.weights.vdt import load_vdt_checkpoint

MANIFEST = Path(weights_package.__file__).parent / "manifests" / "vdt_keys.json"


def tiny(**kwargs) -> VDT:
    config = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_frames=4)
    config.update(kwargs)
    config.setdefault("learn_sigma", True)
    return VDT(VDTConfig(**config))


@torch.no_grad()
def randomize(model: VDT, seed: int = 0) -> VDT:
    """Give every parameter random values, so adaLN-Zero no longer hides any path."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("frames", [1, 3, 7])
def test_output_shape_for_any_clip_length(frames):
    model = randomize(tiny())
    x = torch.randn(2, frames, 3, 8, 12)  # non-square, T differs from num_frames=4
    assert model(x, torch.rand(2) * 999).shape == (2, frames, 6, 8, 12)


def test_learn_sigma_sets_output_channels():
    assert tiny(learn_sigma=True).out_channels == 6
    model = randomize(tiny(learn_sigma=False))
    assert model(torch.randn(1, 2, 3, 4, 4), torch.tensor([3.0])).shape == (1, 2, 3, 4, 4)


def test_output_is_zero_at_init_and_given_mask_is_ignored():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 3, 8, 8)
    out = model(x, torch.tensor([10.0, 500.0]))
    assert torch.count_nonzero(out) == 0
    randomize(model)
    mask = torch.zeros(2, 3, 1, 1, 1, dtype=torch.bool)
    mask[:, 0] = True
    torch.testing.assert_close(model(x, torch.tensor([10.0, 500.0]), {}, mask), model(x, torch.tensor([10.0, 500.0])))


def test_bad_input_is_named():
    model = tiny()
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(1, 2, 4, 4, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="one level per clip"):
        model(torch.randn(2, 2, 3, 4, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="temporal_pos"):
        tiny(temporal_pos="learned")


def test_temporal_attention_mixes_only_over_time():
    """With spatial attention switched off (its output projection zeroed), a change to one patch of one
    frame reaches that patch position in every frame and nothing else."""
    model = randomize(tiny())
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.proj.weight)
        torch.nn.init.zeros_(block.attn.proj.bias)
    x = torch.randn(1, 3, 3, 8, 8)
    x2 = x.clone()
    x2[:, 0, :, 2:4, 4:6] += 1.0  # patch (row 1, col 2) of frame 0
    with torch.no_grad():
        diff = (model(x2, torch.tensor([100.0])) - model(x, torch.tensor([100.0]))).abs()
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[..., 2:4, 4:6] = True
    assert diff[~inside].max() <= 1e-6
    for frame in range(3):  # temporal attention really carries the change to the other frames
        assert diff[0, frame, :, 2:4, 4:6].max() > 1e-3


def test_spatial_attention_stays_within_a_frame():
    """With temporal attention switched off (temporal_fc zeroed), a change to one patch of frame 1
    reaches other patches of frame 1 and no other frame."""
    model = randomize(tiny())
    for block in model.blocks:
        torch.nn.init.zeros_(block.temporal_fc.weight)
        torch.nn.init.zeros_(block.temporal_fc.bias)
    x = torch.randn(1, 3, 3, 8, 8)
    x2 = x.clone()
    x2[:, 1, :, 0:2, 0:2] += 1.0
    with torch.no_grad():
        diff = (model(x2, torch.tensor([100.0])) - model(x, torch.tensor([100.0]))).abs()
    assert diff[:, [0, 2]].max() <= 1e-6
    assert diff[0, 1, :, 4:8, 4:8].max() > 1e-3  # far patches of the same frame do change


def test_both_paths_mix_space_and_time_together():
    model = randomize(tiny())
    x = torch.randn(1, 3, 3, 8, 8)
    x2 = x.clone()
    x2[:, 0, :, 0:2, 0:2] += 1.0
    with torch.no_grad():
        diff = (model(x2, torch.tensor([100.0])) - model(x, torch.tensor([100.0]))).abs()
    assert diff[0, 2, :, 6:8, 6:8].max() > 1e-3  # another frame and another position


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny(qk_norm="rms", temporal_pos="sincos+rope"))
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing = True
    x, t = torch.randn(2, 3, 3, 8, 8), torch.tensor([5.0, 700.0])
    for m in (model, checkpointed):
        m(x, t).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize(
    "options",
    [
        dict(temporal_pos="rope"),
        dict(spatial_pos="rope", temporal_pos="rope"),
        dict(spatial_pos="sincos+rope", qk_norm="layer"),
        dict(qk_norm="rms"),
    ],
)
def test_rope_and_qk_norm_options(options):
    base = randomize(tiny())
    model = tiny(**options)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("norm" in k for k in missing)
    randomize(model)
    x = torch.randn(1, 5, 3, 8, 8)
    out = model(x, torch.tensor([1.0]))
    assert out.shape == (1, 5, 6, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    if "qk_norm" in options:
        assert model.blocks[0].attn.q_norm.weight.grad.abs().sum() > 0


def test_temporal_rope_alone_encodes_frame_order():
    """Without temporal sin-cos, RoPE is what tells frames apart: swapping two input frames must not
    simply swap the outputs (it would if temporal attention were blind to position)."""
    model = randomize(tiny(temporal_pos="rope"))
    x = torch.randn(1, 3, 3, 4, 4)
    with torch.no_grad():
        out = model(x, torch.tensor([50.0]))
        out_swapped = model(x[:, [1, 0, 2]], torch.tensor([50.0]))
    assert not torch.allclose(out_swapped[:, [1, 0, 2]], out, atol=1e-4)


def test_class_labels_and_null_class():
    model = randomize(tiny(num_classes=3, class_dropout_prob=0.1)).eval()
    x, t = torch.randn(2, 2, 3, 4, 4), torch.tensor([1.0, 2.0])
    labelled = model(x, t, {"class_label": torch.tensor([0, 2])})
    null = model(x, t, {"class_label": torch.full((2,), model.null_class)})
    torch.testing.assert_close(model(x, t), null)  # a missing label means the null class
    assert not torch.allclose(labelled, null)
    with pytest.raises(ValueError, match="required"):
        randomize(tiny(num_classes=3, class_dropout_prob=0.0))(x, t)


def test_unpatchify_uses_the_reference_channel_order():
    """Patch values are laid out (p, q, c) with c fastest, as the reference's einsum 'nhwpqc->nchpwq'."""
    model = tiny(learn_sigma=False)  # out 3 channels, p 2
    h, w, p, c = 2, 3, 2, 3
    tokens = torch.randn(1, 1, h * w, p * p * c)
    reference = torch.einsum("nhwpqc->nchpwq", tokens.reshape(1, h, w, p, p, c)).reshape(1, c, h * p, w * p)
    torch.testing.assert_close(model.unpatchify(tokens, h, w)[:, 0], reference)


def test_presets():
    assert set(VDT_CONFIGS) == {"VDT-S/2", "VDT-B/2", "VDT-L/2"}
    with torch.device("meta"):
        b = VDT(VDTConfig.from_name("VDT-B/2", in_channels=4, learn_sigma=True))
    assert (len(b.blocks), b.hidden_size, b.num_heads, b.patch_size) == (12, 768, 12, 2)
    assert b.config == VDT_CONFIGS["VDT-B/2"].replace(in_channels=4, learn_sigma=True)


def test_config_from_name_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown size 'VDT-XL/2'"):
        VDTConfig.from_name("VDT-XL/2")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['widht'\]"):
        VDTConfig.from_name("VDT-S/2", widht=3)
    with pytest.raises(ValueError, match="in_channels and learn_sigma must be set"):
        VDT(VDTConfig.from_name("VDT-S/2"))


#################################################################################
#                        Reference checkpoints (manifest)                       #
#################################################################################


def _manifest(name: str) -> tuple[dict, dict]:
    doc = json.loads(MANIFEST.read_text())
    assert doc["source"] == "RERV/VDT" and len(doc["commit"]) == 40
    entry = doc["configs"][name]
    return entry["config"], entry["keys"]


def _model_kwargs(config: dict) -> dict:
    names = ("input_size", "patch_size", "in_channels", "num_classes", "class_dropout_prob", "num_frames", "learn_sigma", "mlp_ratio", "depth", "hidden_size", "num_heads")
    return {k: config[k] for k in names}


def _mae_2d(dim: int, side: int) -> np.ndarray:
    """MAE/DiT get_2d_sincos_pos_embed, written independently: row-major grid, first half = column."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.divmod(np.arange(side * side), side)
    return np.concatenate([one(dim // 2, cols), one(dim // 2, rows)], axis=1)


def _reference_tables(config: dict) -> dict[str, torch.Tensor]:
    """pos_embed and time_embed as the reference fills them (MAE formulas, written independently)."""
    D, side = config["hidden_size"], config["input_size"] // config["patch_size"]
    omega = 1.0 / 10000 ** (np.arange(D // 2) / (D / 2))
    frames = np.outer(np.arange(config["num_frames"]), omega)
    return {
        "pos_embed": torch.from_numpy(_mae_2d(D, side)).float()[None],
        "time_embed": torch.from_numpy(np.concatenate([np.sin(frames), np.cos(frames)], axis=1)).float()[None],
    }


@pytest.mark.parametrize("name", ["VDT-S/2", "VDT-L/2"])
def test_manifest_loads_strictly(name):
    """A state dict with exactly the manifest's keys and shapes loads with strict=True. Weights stay on
    the meta device (L/2 has 860M parameters); the fixed tables are real, so the load hook's value check
    runs against the reference's formulas."""
    config, keys = _manifest(name)
    with torch.device("meta"):
        model = VDT(VDTConfig(**_model_kwargs(config)))
        state = {k: torch.empty(shape) for k, shape in keys.items()}
    state.update(_reference_tables(config))
    assert [list(v.shape) for v in _reference_tables(config).values()] == [keys["pos_embed"], keys["time_embed"]]
    model.load_state_dict(state, strict=True, assign=True)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys


def test_manifest_records_its_source():
    doc = json.loads(MANIFEST.read_text())
    assert doc["file"] == "models.py" and set(doc["configs"]) == {"VDT-S/2", "VDT-L/2"}
    config, keys = _manifest("VDT-L/2")
    assert len(keys) == 9 + 18 * config["depth"] + 4


def test_load_vdt_checkpoint_from_reference_style_files(tmp_path):
    reference = randomize(tiny(num_classes=1))
    state = reference.state_dict()
    # DiT/VDT train.py layout: {"model", "ema", "opt", "args"}; loading prefers "ema"
    ema = {k: v + 1.0 if v.dtype.is_floating_point and k not in ("pos_embed", "time_embed") else v for k, v in state.items()}
    torch.save({"model": state, "ema": ema, "opt": {}, "args": argparse.Namespace(model="VDT-L/2")}, tmp_path / "ckpt.pt")
    model = load_vdt_checkpoint(tiny(num_classes=1), tmp_path / "ckpt.pt")
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    model = load_vdt_checkpoint(tiny(num_classes=1), tmp_path / "ckpt.pt", prefer="model")
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ckpt.safetensors"))
    model = load_vdt_checkpoint(tiny(num_classes=1), tmp_path / "ckpt.safetensors")
    torch.testing.assert_close(model.final_layer.linear.weight, state["final_layer.linear.weight"])


def test_load_vdt_checkpoint_names_what_does_not_fit(tmp_path):
    state = randomize(tiny(num_classes=1)).state_dict()
    broken = dict(state)
    del broken["blocks.1.temporal_fc.bias"]
    broken["blocks.0.extra.weight"] = torch.zeros(2)
    broken["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 32)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as info:
        load_vdt_checkpoint(tiny(num_classes=1), tmp_path / "broken.pt")
    message = str(info.value)
    assert "blocks.1.temporal_fc.bias" in message and "blocks.0.extra.weight" in message
    assert "blocks.0.mlp.fc1.weight: checkpoint (5, 32) vs model (128, 32)" in message

    learned = dict(state)
    learned["pos_embed"] = torch.randn_like(state["pos_embed"])
    torch.save(learned, tmp_path / "learned.pt")
    with pytest.raises(ValueError, match="pos_embed is not the fixed sin-cos table"):
        load_vdt_checkpoint(tiny(num_classes=1), tmp_path / "learned.pt")
    low_precision = {k: v.to(torch.bfloat16) for k, v in state.items()}  # sin-cos tables rounded to bf16 still pass
    torch.save(low_precision, tmp_path / "bf16.pt")
    load_vdt_checkpoint(tiny(num_classes=1), tmp_path / "bf16.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_vdt_checkpoint(tiny(), tmp_path / "nowhere.pt")
