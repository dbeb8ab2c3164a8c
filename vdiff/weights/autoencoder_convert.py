"""Convert KL-autoencoder weights between vdiff and the diffusers / sgm (original SVD) layouts.

Every conversion walks OUR model's parameter names (built on the meta device from the config, so no memory
is spent), maps each to its name in the other layout, and checks presence and shape. Anything missing,
mis-shaped, or left over in the source is collected and raised at once as a :class:`ConversionError` that
lists the names, so a wrong config or a truncated file is diagnosed in one go.

Layouts
-------
diffusers ``AutoencoderKL`` (SD) and ``AutoencoderKLTemporalDecoder`` (SVD):
    ``encoder.down_blocks.{i}.resnets.{j}.*``, ``*.mid_block.resnets.{0,1}.*``,
    ``*.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``, ``decoder.up_blocks.{i}`` (lowest
    resolution first, like ours), ``spatial_res_block`` / ``temporal_res_block`` / ``time_mixer.mix_factor``,
    ``decoder.time_conv_out``. Note diffusers' temporal decoder builds its mid block from ``layers_per_block``
    resnets; only ``layers_per_block == 2`` matches the SVD architecture (and ours).
sgm (Stability-AI/generative-models, the original SVD checkpoint, keys under ``first_stage_model.``):
    ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``*.mid.{block_1,attn_1,block_2}``
    (attention q/k/v/proj_out are 1x1 convs), ``decoder.up.{L-1-i}`` (highest resolution first),
    ``*.time_stack.{in_layers.0,in_layers.2,out_layers.0,out_layers.3}``, ``*.mix_factor``,
    ``decoder.conv_out.time_mix_conv``. SVD's ``AutoencodingEngine`` has no ``quant_conv``; when a checkpoint
    has none, an identity 1x1 conv stands in (exactly equivalent), and an export of a temporal decoder drops
    them again (they must then be the identity: anything else has no place in sgm's engine). sgm's modules
    hard-code 32 GroupNorm groups, as does diffusers' temporal decoder.

File and folder reading / writing (diffusers ``config.json``, layout detection) is in
:mod:`vdiff.weights.autoencoder`; this module maps names and checks shapes only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.errors import KeyMappingError
from vdiff.weights.template import Rule, Wording, map_keys, model_shapes

Layout = Literal["vdiff", "diffusers", "sgm"]
PEER_GROUPS = 32  # GroupNorm groups hard-coded by sgm's modules and diffusers' temporal decoder
SGM_PREFIX = "first_stage_model."
SGM_IGNORED_PREFIXES = ("loss.", "model_ema.")  # training-only state in sgm autoencoder checkpoints


ConversionError = KeyMappingError  # the autoencoder readers' name for it: missing, mis-shaped and unused keys
TARGET = "the autoencoder config"
# How the autoencoder readers word a missing / mis-shaped source key (tests and users match on it).
WORDING = Wording(missing="{name}  (vdiff {key}, shape {shape})",
                  mismatch="{name}: checkpoint {got} vs model {want} (vdiff {key})", shapes="list")  # fmt: skip


# ----------------------------------------------------------------------------- name maps (ours -> theirs)


def diffusers_key(key: str) -> str:
    """Our parameter name -> its diffusers name."""
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    k = re.sub(r"\.down\.(\d+)\.blocks\.(\d+)\.", r".down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"\.up\.(\d+)\.blocks\.(\d+)\.", r".up_blocks.\1.resnets.\2.", k)
    k = re.sub(r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0.", k)
    k = k.replace(".mid.block1.", ".mid_block.resnets.0.").replace(".mid.block2.", ".mid_block.resnets.1.")
    k = k.replace(".mid.attn.norm.", ".mid_block.attentions.0.group_norm.")
    k = re.sub(r"\.mid\.attn\.([qkv])\.", r".mid_block.attentions.0.to_\1.", k)
    k = k.replace(".mid.attn.proj_out.", ".mid_block.attentions.0.to_out.0.")
    k = k.replace(".spatial.", ".spatial_res_block.").replace(".temporal.", ".temporal_res_block.")
    k = re.sub(r"\.mix_factor$", ".time_mixer.mix_factor", k)
    return k.replace(".skip.", ".conv_shortcut.")


# Old diffusers checkpoints name the attention projections query/key/value/proj_attn.
_DIFFUSERS_LEGACY = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

_SGM_TIME_STACK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}


def sgm_key(key: str, num_levels: int) -> str:
    """Our parameter name -> its name inside sgm's ``first_stage_model`` (without the prefix)."""
    k = re.sub(r"^decoder\.time_conv_out\.", "decoder.conv_out.time_mix_conv.", key)
    k = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.", k)
    k = re.sub(r"\.blocks\.(\d+)\.", r".block.\1.", k)
    k = k.replace(".mid.block1.", ".mid.block_1.").replace(".mid.block2.", ".mid.block_2.")
    k = k.replace(".mid.attn.", ".mid.attn_1.")
    k = re.sub(r"\.temporal\.(norm1|conv1|norm2|conv2)\.", lambda m: f".time_stack.{_SGM_TIME_STACK[m[1]]}.", k)
    k = k.replace(".spatial.", ".")
    return k.replace(".skip.", ".nin_shortcut.")


# ----------------------------------------------------------------------------- core


def target_shapes(config: AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (model built on the meta device: no memory, no init)."""
    return model_shapes(VideoAutoencoder, config)


def _check_group_norm(config: AutoencoderConfig, layout: str) -> None:
    """Raise unless ``config``'s norms exist in ``layout`` (GroupNorm; 32 groups where the peer hard-codes it)."""
    if config.norm != "group":
        raise ValueError(f"{layout} autoencoders use GroupNorm; config.norm={config.norm!r} has no {layout} layout")
    fixed = layout == "sgm" or config.decoder == "temporal"
    if fixed and config.norm_num_groups != PEER_GROUPS:
        where = "sgm's autoencoder modules" if layout == "sgm" else "diffusers' AutoencoderKLTemporalDecoder"
        raise ValueError(
            f"{where} hard-code {PEER_GROUPS} GroupNorm groups; config.norm_num_groups={config.norm_num_groups} "
            f"has no {layout} layout"
        )


def _import(
    src: dict[str, Tensor],
    config: AutoencoderConfig,
    name_of: Callable[[str], str],
    layout: str,
    fills: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Our state dict from ``src`` by renaming (a 1x1 conv reads as a Linear and back), the keys of ``fills``
    taken from there; one ConversionError listing every problem."""
    fills = fills or {}
    shapes = target_shapes(config)
    targets = {k: s for k, s in shapes.items() if k not in fills}
    out = map_keys(src, targets, lambda k, s: Rule((name_of(k),), (s,), squeeze=True), f"{layout} state dict",
                   TARGET, WORDING)  # fmt: skip
    return {k: out[k] if k in out else fills[k] for k in shapes}


def _export(state_dict: dict[str, Tensor], config: AutoencoderConfig, name_of: Callable[[str], str], layout: str):
    shapes = target_shapes(config)
    ours = map_keys(state_dict, shapes, lambda k, s: Rule((k,), (s,)), f"vdiff state dict (exporting to {layout})",
                    TARGET, Wording(shapes="list"))  # fmt: skip
    return {name_of(k): v for k, v in ours.items()}


# ----------------------------------------------------------------------------- public converters


def from_vdiff(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Check a state dict in our own names against ``config`` (names and shapes; raises ConversionError)."""
    return _import(state_dict, config, lambda k: k, "vdiff")


def from_diffusers(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` / ``AutoencoderKLTemporalDecoder`` state dict -> our state dict."""
    _check_group_norm(config, "diffusers")
    src = {}
    for k, v in state_dict.items():
        for old, new in _DIFFUSERS_LEGACY.items():
            if ".mid_block.attentions." in k:
                k = k.replace(old, new)
        src[k] = v
    return _import(src, config, diffusers_key, "diffusers")


def to_diffusers(state_dict: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    """Our state dict -> diffusers names (``AutoencoderKL`` for a 2D decoder, ``...TemporalDecoder`` else)."""
    _check_group_norm(config, "diffusers")
    return _export(state_dict, config, diffusers_key, "diffusers")


def _identity_conv(channels: int) -> dict[str, Tensor]:
    return {"weight": torch.eye(channels).view(channels, channels, 1, 1), "bias": torch.zeros(channels)}


def from_sgm(
    state_dict: dict[str, Tensor], config: AutoencoderConfig, prefix: str = SGM_PREFIX
) -> dict[str, Tensor]:
    """Original sgm checkpoint (e.g. ``svd.safetensors``) -> our state dict.

    Keys under ``prefix`` are used when present (other model parts in the file are ignored), else all keys.
    ``loss.*`` and ``model_ema.*`` training state is ignored. A checkpoint without ``quant_conv`` /
    ``post_quant_conv`` (SVD's ``AutoencodingEngine``) gets identity 1x1 convs where the config has them.
    """
    _check_group_norm(config, "sgm")
    if any(k.startswith(prefix) for k in state_dict):
        src = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    else:
        src = dict(state_dict)
    src = {k: v for k, v in src.items() if not k.startswith(SGM_IGNORED_PREFIXES)}
    fills: dict[str, Tensor] = {}
    moments = 2 * config.z_channels if config.double_z else config.z_channels
    for name, channels in (("quant_conv", moments), ("post_quant_conv", config.z_channels)):
        if not any(k.startswith(name + ".") for k in src):
            fills.update({f"{name}.{p}": t for p, t in _identity_conv(channels).items()})
    levels = len(config.ch_mult)
    return _import(src, config, lambda k: sgm_key(k, levels), "sgm", fills)


def _is_identity_conv(weight: Tensor, bias: Tensor) -> bool:
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight.shape[0] == weight.shape[1] and torch.equal(weight.flatten(1), eye) and not bias.any()


def to_sgm(state_dict: dict[str, Tensor], config: AutoencoderConfig, prefix: str = SGM_PREFIX) -> dict[str, Tensor]:
    """Our state dict -> sgm names under ``prefix`` (attention projections as 1x1 convs).

    A 2D decoder exports as sgm's legacy ``AutoencoderKL`` (with ``quant_conv`` / ``post_quant_conv``). A
    temporal decoder exports as SVD's ``AutoencodingEngine``, which has neither: they are dropped, and must be
    the identity (as :func:`from_sgm` fills them), else a ``ValueError`` names them.
    """
    _check_group_norm(config, "sgm")
    levels = len(config.ch_mult)
    out = _export(state_dict, config, lambda k: sgm_key(k, levels), "sgm")
    if config.decoder == "temporal":
        for name in ("quant_conv", "post_quant_conv"):
            if f"{name}.weight" not in out:
                continue
            weight, bias = out.pop(f"{name}.weight"), out.pop(f"{name}.bias")
            if not _is_identity_conv(weight, bias):
                raise ValueError(
                    f"to_sgm: {name} is not the identity, and sgm's AutoencodingEngine (SVD's VideoDecoder) has no "
                    f"{name}: this autoencoder has no sgm layout (export it as diffusers or vdiff instead)"
                )
    attn = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")
    return {prefix + k: (v[:, :, None, None] if attn.search(k) else v) for k, v in out.items()}
