"""Read and write UNet-SVD weights (:class:`vdiff.models.unet_svd.UNetSVD`): vdiff files, diffusers folders and
sgm (the original Stability-AI/generative-models) checkpoints.

Layouts:

``diffusers``  a ``UNetSpatioTemporalConditionModel`` folder (what ``save_pretrained`` writes: ``config.json`` +
               ``diffusion_pytorch_model.safetensors``; also the ``.fp16.safetensors`` variant, a sharded
               ``.safetensors.index.json`` or ``.bin``), or a pipeline folder holding it under ``unet/``. The
               config is read from ``config.json`` (:func:`config_from_diffusers`); a field or value vdiff cannot
               represent is a :class:`UNetSVDConfigError` naming the file and the field. diffusers' ResBlock
               GroupNorm epsilons differ from sgm's (``UNetSVDConfig.norm_eps``): such a folder loads as
               ``norm_eps="diffusers"`` and computes what diffusers computes.
``sgm``        one file (``svd.safetensors``, ``svd_xt.safetensors``, ...) whose UNet is under
               ``model.diffusion_model.`` (the conditioner, first stage and anything else in it are not read).
               sgm files carry no config: it is the ``config`` argument, else the ``svd`` preset (sgm's
               epsilons); every tensor's name and shape is checked against it. The names are sgm's
               ``VideoUNet``'s, recorded for the real SVD config in ``manifests/sgm_svd_unet_keys.json``.
``vdiff``      one ``.safetensors`` file of our own names, the config in its metadata.

vdiff fuses self-attention ``to_q/to_k/to_v`` into ``qkv`` and cross-attention ``to_k/to_v`` into ``kv`` (rows
stacked in that order); everything else maps one tensor to one tensor of the same shape. Every conversion is
strict: missing, mis-shaped and unused tensors are collected and raised at once
(:class:`UNetSVDConversionError`), naming the keys and the file.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights.errors import KeyMappingError, WeightsConfigError
from vdiff.weights.safetensors_io import load_keys, load_metadata, load_state_dict
from vdiff.weights.template import (
    CONFIG_FILE,
    LAYOUTS,
    LoadLayout,
    SaveLayout,
    WeightsRead,
    agreed_config,
    build_loaded,
    check_known_fields,
    config_beside,
    config_refusal,
    detect_layout,
    map_keys,
    metadata_config,
    model_folder,
    read_config_json,
    resolve_config,
    resolve_source,
    save_weights,
    stacked,
)

SGM_PREFIX = "model.diffusion_model."
DIFFUSERS_CLASS = "UNetSpatioTemporalConditionModel"
DIFFUSERS_CONFIG = CONFIG_FILE
DIFFUSERS_SUBFOLDER = "unet"
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
MANIFEST = Path(__file__).resolve().parent / "manifests" / "sgm_svd_unet_keys.json"

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"
# The __init__ arguments (and defaults) of diffusers' UNetSpatioTemporalConditionModel: config.json may omit any.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
    "block_out_channels": [320, 640, 1280, 1280],
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
}
_DIFFUSERS_IGNORED = ("sample_size",)  # a default sample size; changes nothing the weights compute
# UNetSVDConfig fields a diffusers config.json does not hold: taken from the config passed to the reader (or
# the defaults: concat_channels = in_channels - out_channels, no checkpointing).
_NOT_IN_DIFFUSERS = ("concat_channels", "gradient_checkpointing")


UNetSVDConfigError = WeightsConfigError  # a config vdiff cannot represent, or contradicting configs
UNetSVDConversionError = KeyMappingError  # missing, mis-shaped and unused tensors, and where they were
TARGET = "the UNet-SVD config"
# The key signs of each file layout, in the order they are tried (vdiff files are known by their metadata first).
SIGNS = (
    ("sgm", lambda k: k.startswith(SGM_PREFIX)),
    ("diffusers", lambda k: k.startswith(("down_blocks.", "mid_block."))),
    ("vdiff", lambda k: k.startswith(("down.0.res.", "mid.res."))),
)


#################################################################################
#                        Name maps (our name -> peer names)                     #
#################################################################################

# A peer name list of length > 1 means our tensor is their tensors stacked on dim 0 (fused projections).
_BLOCK_LEAVES: dict[str, list[str]] = {  # inside a spatial or temporal transformer block: sgm = diffusers names
    "attn1.qkv.weight": ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"],
    "attn1.proj.weight": ["attn1.to_out.0.weight"],
    "attn1.proj.bias": ["attn1.to_out.0.bias"],
    "attn2.q.weight": ["attn2.to_q.weight"],
    "attn2.kv.weight": ["attn2.to_k.weight", "attn2.to_v.weight"],
    "attn2.proj.weight": ["attn2.to_out.0.weight"],
    "attn2.proj.bias": ["attn2.to_out.0.bias"],
}
_FF = {
    "ff.proj_in": "ff.net.0.proj",
    "ff.proj_out": "ff.net.2",
    "ff_in.proj_in": "ff_in.net.0.proj",
    "ff_in.proj_out": "ff_in.net.2",
}
_RES_DIFFUSERS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}
_RES_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "skip": "skip_connection",
}
_TOP_DIFFUSERS = {
    "conv_in": "conv_in",
    "time_embed.mlp.0": "time_embedding.linear_1",
    "time_embed.mlp.2": "time_embedding.linear_2",
    "added_time_embed.mlp.0": "add_embedding.linear_1",
    "added_time_embed.mlp.2": "add_embedding.linear_2",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embed.mlp.0": "time_embed.0",
    "time_embed.mlp.2": "time_embed.2",
    "added_time_embed.mlp.0": "label_emb.0.0",
    "added_time_embed.mlp.2": "label_emb.0.2",
    "norm_out": "out.0",
    "conv_out": "out.2",
}
_LEVEL = re.compile(r"^(down|up)\.(\d+)\.(res|attn)\.(\d+)\.(.+)$")
_RESAMPLE = re.compile(r"^(down|up)\.(\d+)\.resample\.conv\.(weight|bias)$")
_MID = re.compile(r"^mid\.(res\.(\d+)|attn)\.(.+)$")


def _block_leaf(rest: str) -> list[str]:
    """A transformer block's parameter (``norm1.weight``, ``attn1.qkv.weight``, ``ff.proj_in.bias``...)."""
    if rest in _BLOCK_LEAVES:
        return _BLOCK_LEAVES[rest]
    module, _, param = rest.rpartition(".")
    return [f"{_FF.get(module, module)}.{param}"]


def _res_leaf(rest: str, layout: str) -> list[str]:
    """A SpatioTemporalResBlock's parameter (``spatial.conv1.weight``, ``temporal.norm2.bias``, ``mix_factor``)."""
    if rest == "mix_factor":
        return ["time_mixer.mix_factor"]
    part, module, param = rest.split(".")
    if layout == "diffusers":
        return [f"{part}_res_block.{_RES_DIFFUSERS[module]}.{param}"]
    return [f"{'time_stack.' if part == 'temporal' else ''}{_RES_SGM[module]}.{param}"]


def _attn_leaf(rest: str, layout: str) -> list[str]:
    """A SpatioTemporalTransformer's parameter (``proj_in.weight``, ``blocks.0.attn1.qkv.weight``, ...)."""
    if rest == "mix_factor":
        return ["time_mixer.mix_factor"]
    head, _, tail = rest.partition(".")
    if head in ("blocks", "temporal_blocks"):
        index, _, leaf = tail.partition(".")
        temporal = "temporal_transformer_blocks" if layout == "diffusers" else "time_stack"
        group = "transformer_blocks" if head == "blocks" else temporal
        return [f"{group}.{index}.{name}" for name in _block_leaf(leaf)]
    if head == "frame_embed":
        index, _, param = tail.partition(".")
        layer = {"0": "linear_1", "2": "linear_2"}[index] if layout == "diffusers" else index
        return [f"time_pos_embed.{layer}.{param}"]
    return [rest]  # norm, proj_in, proj_out


def peer_names(key: str, config: UNetSVDConfig, layout: Literal["diffusers", "sgm"]) -> list[str]:
    """The ``layout`` name(s) of our parameter ``key`` (several: stacked on dim 0 into ours)."""
    n, levels = config.num_res_blocks, len(config.channel_mult)
    if m := _LEVEL.match(key):
        side, index, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        leaf = _res_leaf(rest, layout) if kind == "res" else _attn_leaf(rest, layout)
        if layout == "diffusers":
            prefix = f"{side}_blocks.{index}.{'resnets' if kind == 'res' else 'attentions'}.{j}"
        else:
            block = 1 + index * (n + 1) + j if side == "down" else index * (n + 1) + j
            prefix = f"{'input_blocks' if side == 'down' else 'output_blocks'}.{block}.{0 if kind == 'res' else 1}"
        return [f"{prefix}.{name}" for name in leaf]
    if m := _RESAMPLE.match(key):
        side, index, param = m.group(1), int(m.group(2)), m.group(3)
        if layout == "diffusers":
            return [f"{side}_blocks.{index}.{'downsamplers' if side == 'down' else 'upsamplers'}.0.conv.{param}"]
        if side == "down":
            return [f"input_blocks.{1 + index * (n + 1) + n}.0.op.{param}"]
        level = levels - 1 - index
        return [f"output_blocks.{index * (n + 1) + n}.{2 if level in config.attention_levels else 1}.conv.{param}"]
    if m := _MID.match(key):
        which, rest = m.group(1), m.group(3)
        if which == "attn":
            prefix = "mid_block.attentions.0" if layout == "diffusers" else "middle_block.1"
            return [f"{prefix}.{name}" for name in _attn_leaf(rest, layout)]
        j = int(m.group(2))
        prefix = f"mid_block.resnets.{j}" if layout == "diffusers" else f"middle_block.{2 * j}"
        return [f"{prefix}.{name}" for name in _res_leaf(rest, layout)]
    module, _, param = key.rpartition(".")
    table = _TOP_DIFFUSERS if layout == "diffusers" else _TOP_SGM
    if module not in table:
        raise KeyError(f"no {layout} name for UNet-SVD parameter {key!r}")
    return [f"{table[module]}.{param}"]


@functools.lru_cache(maxsize=8)
def _expected_shapes_cached(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    config = UNetSVDConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = UNetSVD(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_shapes(config: UNetSVDConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (from a model built on the meta device: no memory)."""
    key = json.dumps(config.replace(gradient_checkpointing=False).to_dict(), sort_keys=True)
    return dict(_expected_shapes_cached(key))


#################################################################################
#                                 Converters                                    #
#################################################################################


def _import(
    state_dict: Mapping[str, Tensor],
    config: UNetSVDConfig,
    name_of: Callable[[str], list[str]],
    source: str,
    prefix: str = "",
) -> dict[str, Tensor]:
    """Our state dict from the peer tensors ``prefix + name_of(key)`` (several: stacked on dim 0)."""
    return map_keys(state_dict, expected_shapes(config), lambda k, s: stacked(name_of(k), s), source, TARGET,
                    prefix=prefix)  # fmt: skip


def _check_ours(state_dict: Mapping[str, Tensor], config: UNetSVDConfig, source: str) -> dict[str, Tensor]:
    return _import(state_dict, config, lambda k: [k], source)


def _export(
    state_dict: Mapping[str, Tensor], config: UNetSVDConfig, name_of: Callable[[str], list[str]]
) -> dict[str, Tensor]:
    _check_ours(state_dict, config, "vdiff state dict")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        names = name_of(key)
        value = value.detach()
        if len(names) == 1:
            out[names[0]] = value
        else:  # clones: safetensors refuses tensors that share memory
            out.update({name: part.clone() for name, part in zip(names, value.chunk(len(names), dim=0))})
    return out


def _check_norm_eps(config: UNetSVDConfig, layout: Literal["diffusers", "sgm"]) -> None:
    if config.norm_eps != layout:
        raise UNetSVDConfigError(
            f"UNetSVDConfig.norm_eps={config.norm_eps!r} has no {layout} equivalent: {layout}'s UNet hard-codes its "
            "own ResBlock GroupNorm epsilons (sgm 1e-5 everywhere; diffusers 1e-6 in cross-attention down blocks and "
            f"up blocks), so the exported model would compute something else. To convert on purpose (the weights "
            f"then run with {layout}'s epsilons): `vdiff export --layout {layout} --convert-norm-eps`, or "
            "save_unet_svd(..., convert_norm_eps=True)."
        )


def from_vdiff(
    state_dict: Mapping[str, Tensor], config: UNetSVDConfig, source: str = "vdiff state dict"
) -> dict[str, Tensor]:
    """Check a state dict in our own names against ``config`` (names and shapes)."""
    return _check_ours(state_dict, config, source)


def from_diffusers(
    state_dict: Mapping[str, Tensor], config: UNetSVDConfig, source: str = "diffusers state dict"
) -> dict[str, Tensor]:
    """diffusers ``UNetSpatioTemporalConditionModel`` state dict -> ours."""
    return _import(state_dict, config, lambda k: peer_names(k, config, "diffusers"), source)


def to_diffusers(state_dict: Mapping[str, Tensor], config: UNetSVDConfig) -> dict[str, Tensor]:
    """Our state dict -> diffusers names (raises :class:`UNetSVDConfigError` unless ``config.norm_eps`` is
    ``"diffusers"``: diffusers' UNet would compute something else)."""
    _check_norm_eps(config, "diffusers")
    return _export(state_dict, config, lambda k: peer_names(k, config, "diffusers"))


def from_sgm(
    state_dict: Mapping[str, Tensor], config: UNetSVDConfig, prefix: str = SGM_PREFIX, source: str = "sgm state dict"
) -> dict[str, Tensor]:
    """sgm ``VideoUNet`` tensors under ``prefix`` -> ours; tensors outside ``prefix`` are not looked at."""
    if not any(k.startswith(prefix) for k in state_dict):
        raise UNetSVDConversionError(source, [f"{prefix}* (no tensor has this prefix)"], [], [], target=TARGET)
    return _import(state_dict, config, lambda k: peer_names(k, config, "sgm"), source, prefix)


def to_sgm(state_dict: Mapping[str, Tensor], config: UNetSVDConfig, prefix: str = SGM_PREFIX) -> dict[str, Tensor]:
    """Our state dict -> sgm ``VideoUNet`` names under ``prefix`` (raises :class:`UNetSVDConfigError` unless
    ``config.norm_eps`` is ``"sgm"``: sgm's UNet would compute something else)."""
    _check_norm_eps(config, "sgm")
    return {prefix + k: v for k, v in _export(state_dict, config, lambda k: peer_names(k, config, "sgm")).items()}


def sgm_manifest() -> dict[str, Any]:
    """The recorded sgm key manifest of the real SVD UNet: ``{"keys": {name: shape}, "commit": ..., ...}``."""
    return json.loads(MANIFEST.read_text())


#################################################################################
#                           diffusers config.json                               #
#################################################################################


def diffusers_levels(
    c: Mapping[str, Any], refuse: Callable[[str, str], Exception], blocks: tuple[str, str, str, str], heads_field: str
) -> dict[str, Any]:
    """The :class:`UNetSVDConfig` fields of a diffusers UNet's levels (``model_channels``, ``channel_mult``,
    ``num_res_blocks``, ``attention_levels``, ``head_dim``, ``transformer_depth``, ``context_dim``) from its
    ``config.json`` fields ``c`` (defaults filled in), shared by the video UNet and the image UNet it may be
    inflated from. ``blocks``: the (cross-attention down, plain down, cross-attention up, plain up) block types;
    ``heads_field``: the field holding the head count per level. Anything vdiff's levels cannot be is raised as
    ``refuse(field, why)``."""
    cross_down, plain_down, cross_up, plain_up = blocks
    widths = [int(w) for w in c["block_out_channels"]]
    levels = len(widths)
    if not widths or any(w % widths[0] for w in widths):
        raise refuse("block_out_channels", "vdiff's level widths are model_channels times integer multipliers")

    def per_level(field: str) -> int:
        value = c[field]
        values = [value] * levels if isinstance(value, int) else list(value)
        if len(values) != levels or any(not isinstance(v, int) for v in values) or len(set(values)) != 1:
            raise refuse(field, f"vdiff needs one integer for all {levels} levels")
        return values[0]

    down = list(c["down_block_types"])
    if len(down) != levels or any(t not in (cross_down, plain_down) for t in down):
        raise refuse("down_block_types", f"{levels} of {cross_down} / {plain_down} expected")
    attention_levels = tuple(i for i, t in enumerate(down) if t == cross_down)
    up_expected = [cross_up if level in attention_levels else plain_up for level in reversed(range(levels))]
    if list(c["up_block_types"]) != up_expected:
        raise refuse("up_block_types", f"the up blocks must mirror the down blocks: {up_expected}")
    heads = c[heads_field]
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    if len(heads) != levels:
        raise refuse(heads_field, f"one head count per level ({levels}) expected")
    used = sorted({*attention_levels, levels - 1})  # the mid block uses the last level's heads
    head_dims = {widths[i] / heads[i] for i in used}
    if len(head_dims) != 1 or not float(next(iter(head_dims))).is_integer():
        raise refuse(heads_field, f"vdiff needs one integer head width at levels {used} (widths {widths})")
    return {
        "model_channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": per_level("layers_per_block"),
        "attention_levels": attention_levels,
        "head_dim": int(next(iter(head_dims))),
        "transformer_depth": per_level("transformer_layers_per_block"),
        "context_dim": per_level("cross_attention_dim"),
    }


def config_from_diffusers(config: Mapping[str, Any], source: str = "config") -> UNetSVDConfig:
    """A diffusers ``UNetSpatioTemporalConditionModel`` config (``config.json`` as a dict) -> the
    :class:`UNetSVDConfig` that computes the same (``norm_eps="diffusers"``, ``concat_channels = in_channels -
    out_channels``).

    Raises:
        UNetSVDConfigError: naming ``source`` and the field, for another ``_class_name``, an unknown field, or a
            value vdiff cannot represent (block types that do not pair up, per-level depths or widths that
            differ, head widths that differ between levels, ...).
    """

    refuse = config_refusal(config, source)
    if config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise refuse("_class_name", f"vdiff reads diffusers {DIFFUSERS_CLASS} UNets only")
    check_known_fields(config, _DIFFUSERS_DEFAULTS, source, DIFFUSERS_CLASS)
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    levels = diffusers_levels(c, refuse, (CROSS_DOWN, PLAIN_DOWN, CROSS_UP, PLAIN_UP), "num_attention_heads")
    added_dim, projection = int(c["addition_time_embed_dim"]), int(c["projection_class_embeddings_input_dim"])
    if added_dim < 1 or projection % added_dim:
        raise refuse(
            "projection_class_embeddings_input_dim", f"must be a multiple of addition_time_embed_dim={added_dim}"
        )
    in_channels, out_channels = int(c["in_channels"]), int(c["out_channels"])
    if in_channels < out_channels:
        raise refuse("in_channels", f"vdiff reads in_channels - out_channels={out_channels} as the concat channels")
    try:
        result = UNetSVDConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            concat_channels=in_channels - out_channels,
            **levels,
            num_added_time_ids=projection // added_dim,
            added_time_embed_dim=added_dim,
            num_frames=int(c["num_frames"]),
            norm_eps="diffusers",
        )
        result.check()
    except ValueError as error:
        raise UNetSVDConfigError(f"{source}: {error}") from None
    return result


def config_to_diffusers(config: UNetSVDConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` (with ``_class_name``) of the model :func:`to_diffusers` exports.

    Raises:
        UNetSVDConfigError: for ``norm_eps="sgm"`` (diffusers' UNet hard-codes other GroupNorm epsilons: the
            exported model would compute something else).
    """
    _check_norm_eps(config, "diffusers")
    widths, levels = config.widths, len(config.channel_mult)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "sample_size": None,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": [CROSS_DOWN if i in config.attention_levels else PLAIN_DOWN for i in range(levels)],
        "up_block_types": [CROSS_UP if i in config.attention_levels else PLAIN_UP for i in reversed(range(levels))],
        "block_out_channels": list(widths),
        "addition_time_embed_dim": config.added_time_embed_dim,
        "projection_class_embeddings_input_dim": config.num_added_time_ids * config.added_time_embed_dim,
        "layers_per_block": config.num_res_blocks,
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        # levels without attention (other than the last, whose heads the mid block uses) ignore their count
        "num_attention_heads": [max(1, w // config.head_dim) for w in widths],
        "num_frames": config.num_frames,
    }


def read_diffusers_config(path: str | os.PathLike) -> UNetSVDConfig:
    """:func:`config_from_diffusers` of a ``config.json`` file (errors name the file)."""
    return config_from_diffusers(read_config_json(path, "diffusers"), source=str(path))


#################################################################################
#                                 Files                                         #
#################################################################################


@dataclass
class UNetSVDWeights(WeightsRead):
    """What :func:`read_unet_svd` found (config_source ``"preset: svd"`` for sgm files without one), and ``filled``:
    our keys the file lacked, filled by :func:`fill_vista_extensions` (Vista's new layers)."""

    filled: tuple[str, ...] = ()


def read_unet_svd(
    path: str | os.PathLike,
    layout: LoadLayout = "auto",
    config: UNetSVDConfig | Mapping[str, Any] | str | None = None,
) -> UNetSVDWeights:
    """Read UNet-SVD weights from a LOCAL file or diffusers folder into our names; a hub id is fetched first.

    Args:
        path: a diffusers UNet or pipeline folder, or a weights file (``.safetensors``, ``.pt``, ``.ckpt``, ``.bin``),
            or a hub id ``hf://ORG/NAME[/PATH]`` of either; a relative path that does not exist is also looked up under
            ``$VDIFF_WEIGHTS``.
        layout: ``auto`` (a folder is diffusers; a file's layout is found from its metadata and keys), or one of
            ``vdiff``, ``diffusers`` (a bare ``diffusion_pytorch_model.*`` file; its ``config.json`` beside it
            is used) and ``sgm``.
        config: for files without a config (sgm; a bare diffusers file): the architecture (a preset name, a
            :class:`UNetSVDConfig`, its dict or a ``.json`` file of it); sgm defaults to the ``svd`` preset. With a stored config it may
            only agree with it, except in the fields the file does not hold (for diffusers: ``concat_channels``,
            ``gradient_checkpointing``), which it sets.

    Vista's layers (``config.cond_frame_time_embed``, ``config.action_dim``; :data:`VISTA_FIELDS`): no diffusers or
    sgm file holds them, and a vdiff file written without them does not either. A passed config may turn them on
    over any such file (a stored config that has them off does not contradict it); the rest of the file is read as
    strictly as ever, and the tensors it lacks are then filled by :func:`fill_vista_extensions`, explicitly: the given
    frames' time-embedding MLP as a copy of the main one, the action projections as zeros (Vista's initialisation, so
    the model computes what the file's model computes). The filled keys are listed in ``UNetSVDWeights.filled``. A
    file that holds these layers is read with them, and must agree with the config.

    Raises:
        FileNotFoundError: no such file or folder (naming where it looked).
        UNetSVDConfigError: a config vdiff cannot represent, or a passed config contradicting the stored one.
        UNetSVDConversionError: missing, mis-shaped or unused tensors (naming the keys and the file).
    """
    given = resolve_config(UNetSVDConfig, config)
    resolved = resolve_source(path, layout, LAYOUTS, f"UNet-SVD weights ({layout} layout)")

    found: UNetSVDConfig | None = None
    source = "argument"
    metadata: dict[str, str] = {}
    if resolved.is_dir():
        config_json, weights_path = model_folder(resolved, DIFFUSERS_SUBFOLDER, DIFFUSERS_WEIGHTS, "diffusers UNet")
        found, source, layout = read_diffusers_config(config_json), str(config_json), "diffusers"
    else:
        weights_path = resolved
        if weights_path.suffix == ".safetensors":
            metadata = load_metadata(weights_path)
        if layout == "auto":
            layout = detect_layout(load_keys(weights_path), weights_path, SIGNS, "UNet-SVD", metadata)
        if layout == "vdiff" and (stored := metadata_config(UNetSVDConfig, metadata, weights_path)):
            found, source = stored
        elif layout == "diffusers" and (beside := config_beside(weights_path, "diffusion_pytorch_model")):
            found, source = read_diffusers_config(beside), str(beside)

    if found is not None:
        kept = _NOT_IN_DIFFUSERS if layout == "diffusers" else ("gradient_checkpointing",)
        kept += tuple(name for name in VISTA_FIELDS if not getattr(found, name))  # turned on by the argument
        cfg = agreed_config(given, found, source, kept)
    elif given is not None:
        cfg = given
    elif layout == "sgm":
        cfg, source = UNetSVDConfig.from_name("svd"), "preset: svd (sgm files carry no config)"
    else:
        raise UNetSVDConfigError(
            f"{weights_path}: no config stored with these {layout} weights and none passed; the head count and "
            "GroupNorm epsilons cannot be read from weights: pass config= (e.g. 'svd'), or load the diffusers folder"
        )

    where = f"{layout} file {weights_path}"
    if layout == "sgm":
        ours = from_sgm(
            load_state_dict(weights_path, select=lambda k: k.startswith(SGM_PREFIX)), without_vista(cfg), source=where
        )
    elif layout == "diffusers":
        ours = from_diffusers(load_state_dict(weights_path), without_vista(cfg), source=where)
    else:
        tensors = load_state_dict(weights_path)
        ours = from_vdiff(tensors, vista_layers_held(tensors, cfg), source=where)
    ours, filled = fill_vista_extensions(ours, cfg)
    return UNetSVDWeights(ours, cfg, layout, weights_path, source, filled=filled)


def load_unet_svd(
    path: str | os.PathLike,
    layout: LoadLayout = "auto",
    config: UNetSVDConfig | Mapping[str, Any] | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> UNetSVD:
    """A :class:`UNetSVD` with the weights of a LOCAL file or diffusers folder (see :func:`read_unet_svd` for the
    arguments and errors). Built on the meta device and filled with the tensors (no second copy of 1.5B
    parameters), cast to ``dtype`` (None: as stored) on ``device``; in train mode, as built."""
    weights = read_unet_svd(path, layout=layout, config=config)
    return build_loaded(UNetSVD, weights.config, weights.state_dict, dtype, device)


def save_unet_svd(
    model: UNetSVD, path: str | os.PathLike, layout: SaveLayout = "vdiff", convert_norm_eps: bool = False
) -> Path:
    """Write ``model``'s weights; returns the path of the weights file written.

    layout:
        ``"vdiff"``: one ``.safetensors`` file at ``path``, the config in its metadata.
        ``"diffusers"``: a FOLDER at ``path`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
            ``diffusers.UNetSpatioTemporalConditionModel.from_pretrained(path)`` loads (needs ``norm_eps="diffusers"``).
        ``"sgm"``: one file with sgm names under ``model.diffusion_model.`` (the UNet part of an SVD checkpoint).
    convert_norm_eps: write the weights for the layout's own ResBlock GroupNorm epsilons even when ``model``'s
        differ (``norm_eps``; the presets are sgm's): a deliberate conversion, the exported model computes with
        the other epsilons (1e-5 vs 1e-6 in some ResBlocks). Without it such an export is refused.
    """
    config, state_dict, path = model.config, model.state_dict(), Path(path)
    if convert_norm_eps and layout in ("diffusers", "sgm"):
        config = config.replace(norm_eps=layout)  # the epsilons are no weights: the tensors stay as they are
    return save_weights(path, layout, "UNet-SVD", config, state_dict,
                        diffusers=lambda: (config_to_diffusers(config), to_diffusers(state_dict, config)),
                        sgm=lambda: to_sgm(state_dict, config))  # fmt: skip


#################################################################################
#                     Vista's layers over SVD weights                           #
#################################################################################

# UNetSVDConfig fields of the layers Vista adds to SVD (UNetSVD.vista_parameter_names): the given frames' time
# embedding MLP and the cross-attention action projections. SVD files (diffusers, sgm) never hold them.
VISTA_FIELDS: tuple[str, ...] = ("cond_frame_time_embed", "action_dim")
_COND_TIME_EMBED, _MAIN_TIME_EMBED = "cond_time_embed.", "time_embed."
_ACTION_KV = ".action_kv."


def without_vista(config: UNetSVDConfig) -> UNetSVDConfig:
    """``config`` with Vista's layers off: the architecture an SVD file (diffusers, sgm) holds."""
    return config.replace(cond_frame_time_embed=False, action_dim=0)


def vista_layers_held(tensors: Mapping[str, Tensor], config: UNetSVDConfig) -> UNetSVDConfig:
    """``config`` with each of Vista's layers kept on only where ``tensors`` (our names) hold any of it: the
    architecture a vdiff file holds, checked strictly by :func:`from_vdiff`; the rest is :func:`fill_vista_extensions`'s."""
    has_cond = any(k.startswith(_COND_TIME_EMBED) for k in tensors)
    has_actions = any(_ACTION_KV in k for k in tensors)
    return config.replace(
        cond_frame_time_embed=config.cond_frame_time_embed and has_cond,
        action_dim=config.action_dim if has_actions else 0,
    )


def fill_vista_extensions(
    state_dict: Mapping[str, Tensor], config: UNetSVDConfig
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Complete a state dict read from weights without Vista's layers (an SVD checkpoint) for ``config``, as Vista
    initialises them; returns ``(state dict, the keys filled)``.

    - ``cond_frame_time_embed``: every ``cond_time_embed.*`` tensor absent is a copy (clone) of the ``time_embed.*``
      tensor of the same name (what :meth:`UNetSVD.init_cond_time_embed_from_main` does to a built model; Vista's
      ``train.py`` duplicates ``time_embed`` into ``cond_time_stack_embed`` the same way when it starts from SVD);
    - ``action_dim > 0``: every ``*.action_kv.weight`` absent is zeros (the projections' initialisation: zero actions
      and the SVD model's output are then unchanged).

    Nothing else is filled: a state dict that lacks anything else is left to the strict checks (its keys are
    missing). With both layers off, or both present, the state dict comes back as it is with ``()``.
    """
    out = dict(state_dict)
    filled: list[str] = []
    for key, shape in expected_shapes(config).items():
        if key in out:
            continue
        if key.startswith(_COND_TIME_EMBED):
            main = out.get(_MAIN_TIME_EMBED + key[len(_COND_TIME_EMBED) :])
            if main is None:
                continue  # the main MLP is missing too: the strict checks name both
            out[key] = main.clone()
        elif _ACTION_KV in key:
            kv = out.get(key.replace(_ACTION_KV, ".kv."))  # the same attention's context projection: its dtype
            out[key] = torch.zeros(shape, dtype=kv.dtype if kv is not None else torch.float32)
        else:
            continue
        filled.append(key)
    return out, tuple(filled)
