"""vdiff.weights.vista: Vista checkpoints (OpenDriveLab/Vista at VISTA_COMMIT) read into UNet-SVD names.

The Vista-layout files here are built BY RENAMING a random tiny UNet-SVD's tensors, with the names written out from
Vista's source (not from the reader):

- every SVD tensor: sgm's VideoUNet name under ``model.diffusion_model.`` (vdiff.weights.unet_svd.to_sgm, itself
  checked against the recorded sgm manifest of the real SVD UNet);
- ``cond_time_embed.mlp.{0,2}.*`` -> ``cond_time_stack_embed.{0,2}.*`` (vwm/modules/diffusionmodules/video_model.py:
  ``self.cond_time_stack_embed = nn.Sequential(linear, SiLU, linear)``);
- ``<cross>.action_kv.weight`` rows ``[:D]`` / ``[D:]`` -> ``<cross>.k_adapter_action_control.weight`` /
  ``v_adapter_action_control.weight`` beside sgm's ``<cross>.to_k.weight`` (vwm/modules/attention.py);
- Vista's hand-made LoRA: ``<attn>.{q,k,v,out}_adapter_down.weight`` ``(r, in)`` and ``_up.weight`` ``(out, r)`` beside
  ``to_q/to_k/to_v/to_out.0`` of every attention (self and cross, spatial ``transformer_blocks.0`` and temporal
  ``time_stack.0``), random here (Vista initialises up at zero).

Converting and loading gives the same UNet outputs as the model the file was made from; LoRA adapters (peft, loaded
by vdiff.callbacks.lora) compute Vista's ``to_q(x) + up(down(x)) * lora_scale`` exactly as ``bin_to_st.py``'s merge
``W += up @ down`` does; EMA and DeepSpeed layouts; every key used or skipped by name; errors name file and keys.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vdiff.callbacks.lora import load_adapter, merge_adapters
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.nn.unet_blocks import ContextCrossAttention
from vdiff.weights.unet_svd import UNetSVDConversionError, read_unet_svd, sgm_manifest, to_sgm, without_vista
from vdiff.weights.vista import (
    LORA_TARGETS,
    VISTA_ACTION_DIM,
    VISTA_COMMIT,
    attention_modules,
    convert_vista,
    load_vista_unet,
    read_vista,
    vista_names,
    vista_unet_config,
)

ACTION_DIM = 40
RANK = 4
P = "model.diffusion_model."
CONFIG = UNetSVDConfig(in_channels=6, out_channels=3, concat_channels=3, model_channels=32, channel_mult=(1, 2),
                       num_res_blocks=1, attention_levels=(1,), head_dim=16, context_dim=24, added_time_embed_dim=32,
                       num_frames=4, cond_frame_time_embed=True, action_dim=ACTION_DIM)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_unet(config: UNetSVDConfig = CONFIG, seed: int = 0) -> UNetSVD:
    model = UNetSVD(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


def vista_layout(model: UNetSVD) -> dict[str, torch.Tensor]:
    """The model's tensors under Vista's names, by renaming (see the module docstring)."""
    config = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = to_sgm({k: v for k, v in state.items() if not UNetSVD.is_vista_parameter(k)}, without_vista(config))
    for layer in ("0", "2"):
        for param in ("weight", "bias"):
            out[f"{P}cond_time_stack_embed.{layer}.{param}"] = state[f"cond_time_embed.mlp.{layer}.{param}"]
    sgm = dict(out)
    kv_names = {}  # our cross-attention module -> its sgm to_k name: found by VALUE (to_k = first half of our kv)
    for key, value in state.items():
        if key.endswith(".attn2.kv.weight"):
            (to_k,) = [n for n, t in sgm.items() if n.endswith("attn2.to_k.weight") and torch.equal(t, value[: len(t)])]
            kv_names[key[: -len(".kv.weight")]] = to_k[: -len("to_k.weight")]
    for module, prefix in kv_names.items() if config.action_dim else ():
        k, v = state[f"{module}.action_kv.weight"].chunk(2, dim=0)
        out[f"{prefix}k_adapter_action_control.weight"] = k.clone()
        out[f"{prefix}v_adapter_action_control.weight"] = v.clone()
    return out


def attention_prefixes(vista: dict[str, torch.Tensor]) -> list[str]:
    return sorted(
        {k[: -len("to_out.0.weight")] for k in vista if k.endswith(("attn1.to_out.0.weight", "attn2.to_out.0.weight"))}
    )


def add_lora(vista: dict[str, torch.Tensor], rank: int = RANK, seed: int = 1) -> dict[str, torch.Tensor]:
    """Vista's hand-made adapters on every attention: down (r, in), up (out, r), random."""
    g = torch.Generator().manual_seed(seed)
    out = dict(vista)
    for prefix in attention_prefixes(vista):
        for proj, base in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
            d_out, d_in = vista[f"{prefix}{base}.weight"].shape
            out[f"{prefix}{proj}_adapter_down.weight"] = torch.randn(rank, d_in, generator=g) / rank
            out[f"{prefix}{proj}_adapter_up.weight"] = torch.randn(d_out, rank, generator=g) * 0.05
    return out


def bin_to_st_merge(vista: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Vista's bin_to_st.py merge: W[to_x] += up @ down (x/to_x as there), adapter tensors dropped."""
    out = {k: v.clone() for k, v in vista.items() if "_adapter_down" not in k and "_adapter_up" not in k}
    for key in vista:
        m = re.match(r"(.*)(q|k|v|out)_adapter_down\.weight$", key)
        if not m:
            continue
        base = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}[m.group(2)]
        up = vista[f"{m.group(1)}{m.group(2)}_adapter_up.weight"]
        out[f"{m.group(1)}{base}.weight"] = out[f"{m.group(1)}{base}.weight"] + scale * (up @ vista[key])
    return out


def inputs(config: UNetSVDConfig = CONFIG, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    b, t, h = 2, 4, 8
    c = config.in_channels - config.concat_channels
    cond = {
        "context": torch.randn(b, 1, config.context_dim, generator=g),
        "concat": torch.randn(b, 1, config.concat_channels, h, h, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02], [9.0, 60.0, 0.0]]),
    }
    if config.action_dim:
        cond["actions"] = torch.randn(b, config.action_dim, generator=g)
    given = torch.zeros(b, t, 1, 1, 1, dtype=torch.bool)
    given[0, :2] = True  # clip 0: two given frames (the conditioning-frame MLP); clip 1: none
    return torch.randn(b, t, c, h, h, generator=g), torch.tensor([0.3, -0.4]), cond, given


def output(model: UNetSVD, config: UNetSVDConfig = CONFIG) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(config))


def loaded(state: dict[str, torch.Tensor], config: UNetSVDConfig = CONFIG) -> UNetSVD:
    model = UNetSVD(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def write(tmp_path, tensors, name="vista.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------------ names


def test_vista_names_of_the_real_unet_are_sgms_plus_vistas_layers():
    """svd-xt + Vista's layers: SVD's keys are exactly sgm's recorded manifest; Vista adds 4 cond_time_stack_embed
    tensors and a k/v action projection (D, 19 x 128) to each of the 32 cross-attentions (spatial and temporal)."""
    assert re.fullmatch(r"[0-9a-f]{40}", VISTA_COMMIT) and VISTA_ACTION_DIM == 2432
    config = vista_unet_config()
    with torch.device("meta"):
        model = UNetSVD(config)
    names = {n: model.state_dict()[k].shape for k in model.state_dict() for n in vista_names(k, config)}
    manifest = set(sgm_manifest()["keys"])
    svd_names = {P + n for n in names if "action_control" not in n and not n.startswith("cond_time_stack_embed")}
    assert svd_names == manifest
    extra = sorted(n for n in names if P + n not in manifest)
    assert [n for n in extra if n.startswith("cond_time_stack_embed")] == [
        "cond_time_stack_embed.0.bias", "cond_time_stack_embed.0.weight",
        "cond_time_stack_embed.2.bias", "cond_time_stack_embed.2.weight"]  # fmt: skip
    actions = [n for n in extra if "action_control" in n]
    assert len(actions) == 64
    for name in ("input_blocks.1.1.transformer_blocks.0.attn2.k_adapter_action_control.weight",
                 "input_blocks.1.1.time_stack.0.attn2.v_adapter_action_control.weight",
                 "middle_block.1.time_stack.0.attn2.k_adapter_action_control.weight",
                 "output_blocks.11.1.transformer_blocks.0.attn2.v_adapter_action_control.weight"):  # fmt: skip
        assert name in actions, name
    assert len(attention_modules(config)) == 64  # 16 transformers x (spatial, temporal) x (attn1, attn2): Vista's LoRA
    key = "down.0.attn.0.blocks.0.attn2.action_kv.weight"
    assert model.state_dict()[key].shape == (2 * 320, 2432)


# ------------------------------------------------------------------------------------------------ UNet


def test_a_vista_file_loads_and_computes_what_the_model_computes(tmp_path):
    model = random_unet()
    vista = vista_layout(model)
    vista["conditioner.embedders.0.open_clip.model.visual.conv1.weight"] = torch.zeros(2, 3)
    vista["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3)
    path = write(tmp_path, vista)
    read = read_vista(path, config=CONFIG)
    assert read.weights == "trained" and read.lora is None and not read.lora_merged
    assert set(read.skipped) == {"conditioner (OpenCLIP image tower, read by vdiff.weights.clip; the concat encoder copy)",
                                 "autoencoder (read by vdiff.weights.autoencoder)"}  # fmt: skip
    for key, value in model.state_dict().items():
        assert torch.equal(read.state_dict[key], value), key
    torch.testing.assert_close(output(loaded(read.state_dict)), output(model), rtol=0, atol=0)
    with pytest.raises(UNetSVDConversionError, match="shape mismatch"):  # default config: svd-xt sizes
        read_vista(path)


def test_conversion_writes_a_vdiff_file_net_weights_reads(tmp_path):
    model = random_unet()
    path = write(tmp_path, vista_layout(model))
    out = tmp_path / "out" / "vista_unet.safetensors"
    written = convert_vista(path, out, config=CONFIG)
    assert written == [out]
    weights = read_unet_svd(out, config=CONFIG)
    assert weights.layout == "vdiff" and not weights.filled
    torch.testing.assert_close(output(loaded(weights.state_dict)), output(model), rtol=0, atol=0)


def test_command_line_converts_with_the_files_action_width(tmp_path, monkeypatch, capsys):
    import vdiff.weights.vista as vista_module

    monkeypatch.setattr(vista_module, "vista_unet_config", lambda **overrides: CONFIG.replace(**overrides))
    model = random_unet()
    path = write(tmp_path, add_lora(vista_layout(model)))
    out = tmp_path / "vista_unet.safetensors"
    assert vista_module.main([str(path), str(out)]) == 0  # action width read from the file (ACTION_DIM)
    folder = tmp_path / "vista_unet_lora" / "default"
    assert capsys.readouterr().out.split() == ["wrote", str(out), "wrote", str(folder)]
    net = load_adapter(loaded(read_unet_svd(out, config=CONFIG).state_dict), folder)
    merged = read_vista(path, config=CONFIG, lora="merge").state_dict
    torch.testing.assert_close(output(net), output(loaded(merged)), rtol=0, atol=2e-5)


def test_action_free_phase1_file_reads_with_action_dim_zero_and_fills_later(tmp_path):
    config = CONFIG.replace(action_dim=0)
    model = random_unet(config)
    path = write(tmp_path, vista_layout(model))
    read = read_vista(path, config=config)
    torch.testing.assert_close(output(loaded(read.state_dict, config), config), output(model, config))
    with pytest.raises(UNetSVDConversionError, match="k_adapter_action_control"):  # the config wants actions
        read_vista(path, config=CONFIG)
    out = tmp_path / "phase1.safetensors"
    convert_vista(path, out, config=config)
    filled = read_unet_svd(out, config=CONFIG)  # VistaModule's net: the action projections filled with zeros
    assert filled.filled and all("action_kv" in k for k in filled.filled)


def test_ema_and_deepspeed_layouts(tmp_path):
    """pytorch_model.bin: every key under _forward_module., EMA under model_ema. with LitEma's dotless names."""
    trained, ema = random_unet(seed=0), random_unet(seed=5)
    vista = {f"_forward_module.{k}": v for k, v in vista_layout(trained).items()}
    for name, value in vista_layout(ema).items():
        vista["_forward_module.model_ema." + name[len("model.") :].replace(".", "")] = value
    vista["_forward_module.model_ema.decay"] = torch.tensor(0.9999)
    vista["_forward_module.model_ema.num_updates"] = torch.tensor(10)
    path = tmp_path / "pytorch_model.bin"
    torch.save(vista, path)
    auto = read_vista(path, config=CONFIG)
    assert auto.weights == "ema"
    torch.testing.assert_close(output(loaded(auto.state_dict)), output(ema), rtol=0, atol=0)
    assert any(k.startswith("trained values") for k in auto.skipped)
    plain = read_vista(path, config=CONFIG, weights="trained")
    torch.testing.assert_close(output(loaded(plain.state_dict)), output(trained), rtol=0, atol=0)
    assert any(k.startswith("EMA values") for k in plain.skipped)
    with pytest.raises(ValueError, match="no model_ema"):
        read_vista(write(tmp_path, vista_layout(trained), "plain.safetensors"), config=CONFIG, weights="ema")


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_adapter_is_vistas_hand_made_lora(tmp_path):
    """The peft adapter (loaded by vdiff.callbacks.lora) computes Vista's unmerged forward; merging it gives the
    weights bin_to_st.py gives."""
    model = random_unet()
    vista = add_lora(vista_layout(model))
    path = write(tmp_path, vista)
    read = read_vista(path, config=CONFIG)
    assert read.lora is not None and read.lora.rank == RANK and read.lora.scale == 1.0
    assert len(read.lora.ranks) == 5 * 8  # 4 transformers x (attn1 qkv/proj + attn2 q/kv/proj) x (spatial, temporal)
    assert {v for k, v in read.lora.ranks.items() if k.endswith("attn1.qkv")} == {3 * RANK}
    assert {v for k, v in read.lora.ranks.items() if k.endswith("attn2.kv")} == {2 * RANK}
    for key, value in model.state_dict().items():  # the base weights stay as stored
        assert torch.equal(read.state_dict[key], value), key

    reference = read_vista(write(tmp_path, bin_to_st_merge(vista), "merged.safetensors"), config=CONFIG)
    merged = read_vista(path, config=CONFIG, lora="merge")
    assert merged.lora_merged and merged.lora is None
    for key, value in reference.state_dict.items():
        torch.testing.assert_close(merged.state_dict[key], value, rtol=0, atol=1e-6)
    expected = output(loaded(reference.state_dict))
    assert (expected - output(model)).abs().max() > 1e-3  # the adapters change the model

    folder = read.lora.save(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == LORA_TARGETS and config["r"] == RANK and config["lora_alpha"] == RANK
    net = load_adapter(loaded(read.state_dict), folder)  # peft LoRA, unmerged
    torch.testing.assert_close(output(net), expected, rtol=0, atol=2e-5)
    merge_adapters(net)
    for name, param in net.named_parameters():
        if name.endswith("base_layer.weight"):
            key = name.replace("base_layer.", "")
            torch.testing.assert_close(param, reference.state_dict[key], rtol=0, atol=1e-6)
    assert torch.equal(load_vista_unet(path, config=CONFIG).state_dict()["conv_in.weight"], model.conv_in.weight)


def test_one_cross_attention_matches_vistas_forward_with_lora_scale(tmp_path):
    """Vista's MemoryEfficientCrossAttention with adapters and action control, written out, against our
    ContextCrossAttention with the converted adapter (lora_scale 0.5)."""
    model = random_unet()
    vista = add_lora(vista_layout(model))
    path = write(tmp_path, vista)
    read = read_vista(path, config=CONFIG, lora_scale=0.5)
    net = load_adapter(loaded(read.state_dict), read.lora.save(tmp_path / "adapter"))
    ours = "up.0.attn.0.temporal_blocks.0.attn2"
    prefix = attention_modules(CONFIG)[ours]
    attention = net.get_submodule(ours)
    assert isinstance(attention, ContextCrossAttention)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 7, 64, generator=g), torch.randn(2, 1, 24, generator=g)
    actions = torch.randn(2, ACTION_DIM, generator=g)

    def t(name):
        return vista[P + prefix + name]

    def lora(proj, value):
        return value @ t(f"{proj}_adapter_down.weight").T @ t(f"{proj}_adapter_up.weight").T * 0.5

    q = x @ t("to_q.weight").T + lora("q", x)
    k = context @ t("to_k.weight").T + lora("k", context) + (actions @ t("k_adapter_action_control.weight").T)[:, None]
    v = context @ t("to_v.weight").T + lora("v", context) + (actions @ t("v_adapter_action_control.weight").T)[:, None]
    heads = attention.num_heads
    split = lambda y: y.view(2, y.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, 7, 64)
    expected = o @ t("to_out.0.weight").T + t("to_out.0.bias") + lora("out", o)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, context, actions), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ strictness


def test_every_problem_is_named_with_the_file(tmp_path):
    model = random_unet()
    vista = vista_layout(model)
    unknown = write(tmp_path, {**vista, "loss_fn.buffer": torch.zeros(1)}, "unknown.safetensors")
    with pytest.raises(UNetSVDConversionError, match=r"(?s)unknown.safetensors.*loss_fn\.buffer"):
        read_vista(unknown, config=CONFIG)
    assert read_vista(unknown, config=CONFIG, skip_prefixes=["loss_fn."]).skipped["skip_prefixes 'loss_fn.'"] == [
        "loss_fn.buffer"]  # fmt: skip

    action = next(k for k in vista if k.endswith("v_adapter_action_control.weight"))
    missing = write(tmp_path, {k: v for k, v in vista.items() if k != action}, "missing.safetensors")
    with pytest.raises(UNetSVDConversionError, match=rf"(?s)missing.safetensors.*missing \(1\).*{re.escape(action)}"):
        read_vista(missing, config=CONFIG)

    partial = add_lora(vista)
    up = next(k for k in partial if k.endswith("out_adapter_up.weight"))
    del partial[up]
    with pytest.raises(UNetSVDConversionError, match=re.escape(up)):
        read_vista(write(tmp_path, partial, "partial.safetensors"), config=CONFIG)

    bad = add_lora(vista)
    down = next(k for k in bad if k.endswith("attn2.k_adapter_down.weight"))
    bad[down] = torch.zeros(RANK, 5)
    with pytest.raises(UNetSVDConversionError, match=rf"shape mismatch.*\n.*{re.escape(down)}"):
        read_vista(write(tmp_path, bad, "bad.safetensors"), config=CONFIG)

    with pytest.raises(ValueError, match="cond_frame_time_embed=True"):
        read_vista(write(tmp_path, vista, "ok.safetensors"), config=CONFIG.replace(cond_frame_time_embed=False))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        read_vista(tmp_path / "nowhere.safetensors")


def test_vista_module_reads_a_vista_release_directly_with_layout_vista(tmp_path):
    """net_weights_layout: vista: the evaluation recipe names Vista's release itself (no conversion step); the
    network gets the file's UNet with its LoRA merged, as read_vista(lora="merge") gives it."""
    from vdiff.lit.svd import SVDModule  # VistaModule inherits load_net_weights

    path = write(tmp_path, add_lora(vista_layout(random_unet())))
    module = SVDModule(net=CONFIG, net_weights=str(path), net_weights_layout="vista")
    net = module.load_net_weights(module.build_network())
    merged = read_vista(path, config=CONFIG, lora="merge").state_dict
    for key, value in net.state_dict().items():
        assert torch.equal(value, merged[key]), key
    torch.testing.assert_close(output(net), output(loaded(merged)), rtol=0, atol=0)
