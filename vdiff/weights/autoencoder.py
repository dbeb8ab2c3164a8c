"""Read and write KL video autoencoder weights: ONE loader for vdiff files, diffusers folders / files and sgm
checkpoints (:func:`load_autoencoder`), and one writer (:func:`save_autoencoder`).

Sources, best first:

``diffusers folder`` (recommended for diffusers weights): what ``AutoencoderKL.save_pretrained`` /
    ``AutoencoderKLTemporalDecoder.save_pretrained`` write, ``config.json`` + ``diffusion_pytorch_model.safetensors``
    (or ``.bin``), or a pipeline folder holding them under ``vae/``. The config is read from ``config.json``
    (:func:`config_from_diffusers`), so every architecture field - GroupNorm groups, scaling and shift factors
    included - is exactly the model's; a config vdiff cannot represent is refused, naming the file and field.
``vdiff file``: safetensors written by :func:`save_autoencoder`, the config in its metadata.
``bare diffusers file`` (``diffusion_pytorch_model.safetensors`` alone): a ``config.json`` beside it (a diffusers
    folder) is used as for a folder. Without one, the config is the ``config`` argument, or a guess (the
    ``svd`` preset when the file has a temporal decoder, else ``sd``; a ``UserWarning`` says so). Weights fix
    every shape, and any shape or name that does not fit is an error, but **the GroupNorm group count and the
    scaling / shift factors are not in the weights**: a model made with, e.g., ``norm_num_groups=16`` loads
    with 32 groups unless you pass a config that says 16, and then encodes wrongly. Load the folder instead.
``sgm checkpoint``: the original SVD checkpoint (``svd.safetensors``, keys ``first_stage_model.*``; the other
    model parts in it are skipped) or an sgm autoencoder checkpoint; config as for a bare file (sgm hard-codes
    32 groups).

Every conversion is strict: a key in the file that the conversion does not use, a missing key and a shape
mismatch are all errors (:class:`~vdiff.weights.autoencoder_convert.ConversionError`) naming the keys.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder_convert import (
    SGM_PREFIX,
    ConversionError,
    from_diffusers,
    from_sgm,
    from_vdiff,
    to_diffusers,
    to_sgm,
)
from vdiff.weights.errors import WeightsConfigError
from vdiff.weights.safetensors_io import load_keys, load_metadata, load_state_dict
from vdiff.weights.template import (
    CONFIG_FILE,
    LAYOUTS,
    LoadLayout,
    SaveLayout,
    WeightsRead,
    agreed_config,
    check_known_fields,
    config_beside,
    config_refusal,
    detect_layout,
    metadata_config,
    model_folder,
    read_config_json,
    resolve_config,
    resolve_source,
    save_weights,
)

DIFFUSERS_CONFIG = CONFIG_FILE
DIFFUSERS_STEM = "diffusion_pytorch_model"  # a diffusers model folder's weights file: its config.json lies beside
DIFFUSERS_WEIGHTS = (f"{DIFFUSERS_STEM}.safetensors", f"{DIFFUSERS_STEM}.bin")
DIFFUSERS_KL = "AutoencoderKL"
DIFFUSERS_TEMPORAL = "AutoencoderKLTemporalDecoder"

# The __init__ arguments (and defaults) of diffusers' classes: a config.json may omit any of them.
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    DIFFUSERS_KL: {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
        "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
        "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    },
    DIFFUSERS_TEMPORAL: {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"], "block_out_channels": [64],
        "layers_per_block": 1, "latent_channels": 4, "sample_size": 32, "scaling_factor": 0.18215,
        "force_upcast": True,
    },
}
# Fields that do not change what the weights compute: the default tile size and an fp16 upcast hint.
_DIFFUSERS_IGNORED = ("sample_size", "force_upcast")
_TEMPORAL_MARKERS = ("time_stack", "temporal_res_block", "time_conv_out", "time_mix_conv", ".temporal.")


AutoencoderConfigError = WeightsConfigError  # a config vdiff cannot represent, or contradicting configs
# The key signs of each file layout, in the order they are tried (vdiff files are known by their metadata first).
SIGNS = (
    ("sgm", lambda k: k.startswith(SGM_PREFIX) or ".mid.block_1." in k or ".down.0.block." in k),
    ("diffusers", lambda k: ".mid_block." in k or ".down_blocks." in k),
    ("vdiff", lambda k: ".mid.block1." in k or ".down.0.blocks." in k),
)


# ----------------------------------------------------------------------------- diffusers config.json


def config_from_diffusers(config: Mapping[str, Any], source: str = "config") -> AutoencoderConfig:
    """A diffusers ``AutoencoderKL`` / ``AutoencoderKLTemporalDecoder`` config (``config.json`` as a dict) ->
    the :class:`AutoencoderConfig` that computes the same thing.

    Raises:
        AutoencoderConfigError: naming ``source`` and the field, for an unknown ``_class_name`` or field, or a
            value vdiff cannot represent (``act_fn`` other than ``silu``, other block types, block widths that
            are not multiples of the first, per-channel ``latents_mean`` / ``latents_std``, a temporal decoder
            with ``layers_per_block`` other than 2, ...).
    """

    refuse = config_refusal(config, source)
    class_name = config.get("_class_name")
    if class_name not in _DIFFUSERS_DEFAULTS:
        raise refuse("_class_name", f"vdiff reads diffusers {sorted(_DIFFUSERS_DEFAULTS)} autoencoders only")
    defaults = _DIFFUSERS_DEFAULTS[class_name]
    check_known_fields(config, defaults, source, class_name)
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    temporal = class_name == DIFFUSERS_TEMPORAL

    widths = [int(w) for w in c["block_out_channels"]]
    if not widths or any(w % widths[0] for w in widths):
        raise refuse("block_out_channels", "vdiff's widths are ch * ch_mult with integer multipliers of the first")
    levels = len(widths)
    if list(c["down_block_types"]) != ["DownEncoderBlock2D"] * levels:
        raise refuse("down_block_types", f"vdiff's encoder is {levels} x DownEncoderBlock2D (one per width)")
    if not temporal and list(c["up_block_types"]) != ["UpDecoderBlock2D"] * levels:
        raise refuse("up_block_types", f"vdiff's decoder is {levels} x UpDecoderBlock2D (one per width)")
    if not temporal and c["act_fn"] != "silu":
        raise refuse("act_fn", "vdiff's autoencoder uses SiLU")
    for field in ("latents_mean", "latents_std"):
        if not temporal and c[field] is not None:
            raise refuse(field, "per-channel latent statistics have no place in vdiff's scalar scale/shift contract")
    if temporal and int(c["layers_per_block"]) != 2:
        raise refuse(
            "layers_per_block",
            "diffusers' temporal decoder builds its mid block from layers_per_block resnets; vdiff's (SVD's) has 2",
        )
    try:
        return AutoencoderConfig(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
            ch=widths[0],
            ch_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=int(c["layers_per_block"]),
            z_channels=int(c["latent_channels"]),
            double_z=True,
            mid_attention=bool(c.get("mid_block_add_attention", True)),
            norm="group",
            norm_num_groups=int(c.get("norm_num_groups", 32)),
            decoder="temporal" if temporal else "2d",
            use_quant_conv=bool(c.get("use_quant_conv", True)),
            use_post_quant_conv=False if temporal else bool(c["use_post_quant_conv"]),
            scale_factor=float(c["scaling_factor"]),
            shift_factor=float(c.get("shift_factor") or 0.0),
        )
    except ValueError as error:
        raise AutoencoderConfigError(f"{source}: {error}") from None


def config_to_diffusers(config: AutoencoderConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` (with ``_class_name``) of the model :func:`to_diffusers` exports.

    Raises:
        AutoencoderConfigError: naming the field, for a config diffusers cannot build (another norm, a
            deterministic encoder, or a temporal decoder that is not SVD's: post_quant_conv, shift, groups...).
    """

    def refuse(field: str, why: str) -> AutoencoderConfigError:
        return AutoencoderConfigError(
            f"AutoencoderConfig.{field}={getattr(config, field)!r} has no diffusers equivalent: {why}"
        )

    if config.norm != "group":
        raise refuse("norm", "diffusers' autoencoders use GroupNorm")
    if not config.double_z:
        raise refuse("double_z", "diffusers' encoders always predict mean and log-variance")
    widths = [config.ch * m for m in config.ch_mult]
    common = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "scaling_factor": config.scale_factor,
    }
    if config.decoder == "2d":
        return {
            "_class_name": DIFFUSERS_KL,
            **common,
            "up_block_types": ["UpDecoderBlock2D"] * len(widths),
            "act_fn": "silu",
            "norm_num_groups": config.norm_num_groups,
            "shift_factor": config.shift_factor or None,
            "use_quant_conv": config.use_quant_conv,
            "use_post_quant_conv": config.use_post_quant_conv,
            "mid_block_add_attention": config.mid_attention,
        }
    for field, required in (("norm_num_groups", 32), ("num_res_blocks", 2), ("mid_attention", True),
                            ("use_quant_conv", True), ("use_post_quant_conv", False), ("shift_factor", 0.0)):
        if getattr(config, field) != required:
            raise refuse(field, f"diffusers' AutoencoderKLTemporalDecoder fixes it to {required!r}")
    return {"_class_name": DIFFUSERS_TEMPORAL, **common}


def read_diffusers_config(path: str | os.PathLike) -> AutoencoderConfig:
    """:func:`config_from_diffusers` of a ``config.json`` file (errors name the file)."""
    return config_from_diffusers(read_config_json(path, "diffusers"), source=str(path))


# ----------------------------------------------------------------------------- reading


AutoencoderWeights = WeightsRead  # what read_autoencoder found (config_source "guess: <preset>" when guessed)


_TRAINING_ONLY = ("dropout",)  # fields that change no weight and no eval output: the passed value wins


def read_autoencoder(
    path: str | os.PathLike,
    layout: LoadLayout = "auto",
    config: AutoencoderConfig | Mapping[str, Any] | str | None = None,
) -> AutoencoderWeights:
    """Read autoencoder weights from a LOCAL file or diffusers folder into our names; a hub id is fetched first.

    Args:
        path: a diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``), a
            ``.safetensors`` / ``.pt`` / ``.ckpt`` / ``.bin`` file, or a hub id ``hf://ORG/NAME[/PATH]`` of either; a
            relative path that does not exist is also looked up in ``$VDIFF_WEIGHTS``.
        layout: ``"auto"`` (a folder is diffusers; a file by its metadata and key names), ``"vdiff"``,
            ``"diffusers"`` or ``"sgm"``.
        config: the architecture (an :class:`AutoencoderConfig`, a mapping of its fields, a ``.json`` file of them
            or a preset name of ``AUTOENCODER_CONFIGS``). Where the weights come with a config (a folder's or a file's neighbouring
            ``config.json``, a vdiff file's metadata) that one is used, and a ``config`` that contradicts it is
            an error (except in ``dropout``, a training setting, where the ``config`` passed wins). For a bare file it is the only source of the GroupNorm group count and the scale / shift
            factors; None then guesses the ``svd`` / ``sd`` preset and warns.

    Raises:
        FileNotFoundError: nothing at ``path`` (nor under ``$VDIFF_WEIGHTS``), or a folder without weights.
        AutoencoderConfigError: a config vdiff cannot represent, or contradicting configs (names the field).
        ConversionError: missing, mis-shaped or unused tensors (names the keys and the file).
    """
    given = resolve_config(AutoencoderConfig, config)
    resolved = resolve_source(path, layout, LAYOUTS, f"autoencoder weights ({layout} layout)")

    found: AutoencoderConfig | None = None
    source = "argument"
    config_file: Path | None = None
    if resolved.is_dir():
        config_file, weights_path = model_folder(resolved, "vae", DIFFUSERS_WEIGHTS, "diffusers autoencoder")
        layout = "diffusers"
        state_dict = load_state_dict(weights_path)
    else:
        weights_path = resolved
        keys = load_keys(weights_path) if weights_path.suffix == ".safetensors" else None
        state_dict = None if keys is not None else load_state_dict(weights_path)
        keys = keys if keys is not None else list(state_dict)
        metadata = load_metadata(weights_path)
        if layout == "auto":
            layout = detect_layout(keys, weights_path, SIGNS, "autoencoder", metadata)
        if state_dict is None:  # safetensors: of a full SVD checkpoint read only its first_stage_model.*
            prefixed = layout == "sgm" and any(k.startswith(SGM_PREFIX) for k in keys)
            state_dict = load_state_dict(weights_path, select=(lambda k: k.startswith(SGM_PREFIX)) if prefixed else None)
        if layout == "vdiff" and (stored := metadata_config(AutoencoderConfig, metadata, weights_path)):
            found, source = stored
        elif layout == "diffusers":
            config_file = config_beside(weights_path, DIFFUSERS_STEM)
    config_file_content = None
    if config_file is not None:
        config_file_content = read_config_json(config_file, "diffusers")
        found, source = config_from_diffusers(config_file_content, source=str(config_file)), str(config_file)

    guessed = None
    if found is not None:
        cfg = agreed_config(given, found, source, kept=_TRAINING_ONLY)
    elif given is not None:
        cfg = given
    else:
        names = state_dict if layout != "sgm" else [k for k in state_dict if k.startswith(SGM_PREFIX)] or state_dict
        guessed = "svd" if any(m in k for k in names for m in _TEMPORAL_MARKERS) else "sd"
        cfg, source = AutoencoderConfig.from_name(guessed), f"guess: {guessed}"
        warnings.warn(
            f"{weights_path}: no config given or stored with these {layout} weights; assuming the {guessed!r} preset. "
            "The GroupNorm group count and the scale/shift factors cannot be read from weights: pass config= "
            "(e.g. a preset name) or load the diffusers folder with its config.json.",
            stacklevel=2,
        )

    try:
        if layout == "diffusers":
            ours = from_diffusers(state_dict, cfg)
        elif layout == "sgm":
            ours = from_sgm(state_dict, cfg)
        else:
            ours = from_vdiff(state_dict, cfg)
    except ConversionError as error:
        hint = f"config from {source}"
        if guessed is not None:
            hint += "; pass config= (a preset name or AutoencoderConfig) or load the diffusers folder"
        raise error.with_context(f"{layout} file {weights_path}", hint) from None
    return AutoencoderWeights(ours, cfg, layout, weights_path, source, config_file, config_file_content)


def load_autoencoder(
    path: str | os.PathLike,
    layout: LoadLayout = "auto",
    config: AutoencoderConfig | Mapping[str, Any] | str | None = None,
) -> VideoAutoencoder:
    """A :class:`VideoAutoencoder` with the weights of a LOCAL file or diffusers folder (see
    :func:`read_autoencoder` for the arguments and errors), loaded strictly, in train mode as built."""
    weights = read_autoencoder(path, layout=layout, config=config)
    model = VideoAutoencoder(weights.config)
    model.load_state_dict(weights.state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------- writing


def save_autoencoder(model: VideoAutoencoder, path: str | os.PathLike, layout: SaveLayout = "vdiff") -> Path:
    """Write ``model``'s weights; returns the path of the weights file written.

    layout:
        ``"vdiff"``: one ``.safetensors`` file at ``path``, the config in its metadata (reloads with no config).
        ``"diffusers"``: a diffusers model FOLDER at ``path`` (``config.json`` + ``diffusion_pytorch_model.safetensors``),
            which ``diffusers.AutoencoderKL`` / ``AutoencoderKLTemporalDecoder.from_pretrained(path)`` loads.
        ``"sgm"``: one file (``.safetensors`` or a torch suffix) with sgm names under ``first_stage_model.``.
    """
    config = model.config
    state_dict = model.state_dict()
    path = Path(path)
    return save_weights(path, layout, "autoencoder", config, state_dict,
                        diffusers=lambda: (config_to_diffusers(config), to_diffusers(state_dict, config)),
                        sgm=lambda: to_sgm(state_dict, config))  # fmt: skip
