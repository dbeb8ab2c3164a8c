"""One call for a whole Stable Video Diffusion: its UNet, CLIP image encoder and autoencoder from LOCAL files
(:func:`load_svd`), and back (:func:`save_svd`). Nothing is downloaded.

Layouts:

``diffusers``  a ``StableVideoDiffusionPipeline`` folder (``stable-video-diffusion-img2vid``): ``unet/``
               (``UNetSpatioTemporalConditionModel``), ``vae/`` (``AutoencoderKLTemporalDecoder``) and
               ``image_encoder/`` (transformers ``CLIPVisionModelWithProjection``), each with its
               ``config.json``, read by :func:`~vdiff.weights.unet_svd.read_unet_svd`,
               :func:`~vdiff.weights.autoencoder.read_autoencoder` and
               :func:`~vdiff.weights.clip.read_clip_image_embedder` (so every config field is checked as those
               readers do). ``scheduler/`` and ``feature_extractor/`` hold no weights and are not read; a
               ``model_index.json`` naming another pipeline class is refused.
``sgm``        the original single file, ``svd.safetensors`` / ``svd_xt.safetensors`` (or an sgm ``.ckpt``). Its
               key groups, each accounted for (:func:`classify_sgm_keys`):

               - ``model.diffusion_model.*``: the UNet;
               - ``first_stage_model.*``: the autoencoder (SVD's ``AutoencodingEngine``: no ``quant_conv``, an
                 identity stands in);
               - ``conditioner.embedders.0.open_clip.model.visual.*``: the CLIP image tower and projection;
               - ``conditioner.embedders.0.open_clip.model.{positional_embedding, text_projection, logit_scale,
                 token_embedding.weight, ln_final.*}``: what sgm's ``FrozenOpenCLIPImageEmbedder`` leaves of
                 open_clip's TEXT tower after ``del model.transformer``; never used by SVD: skipped, by name;
               - ``conditioner.embedders.3.encoder.*``: sgm's copy of an SD autoencoder that encodes the
                 conditioning frame for the concat branch (``VideoPredictionEmbedderWithEncoder``). vdiff encodes
                 that frame with the autoencoder above (as diffusers' pipeline does with its ``vae``), so the
                 copy's ``encoder.*`` + ``quant_conv.*`` must compute what ``first_stage_model``'s encoder
                 computes: ``concat_encoder="check"`` compares the tensors, and where they differ compares the
                 posterior modes of a fixed random frame (a copy that folds its ``quant_conv`` into its
                 ``conv_out`` passes; a different encoder is an error naming the keys). Its ``decoder.*`` and
                 ``post_quant_conv.*`` never run in SVD: skipped.

               Any other key is an :class:`SVDWeightsError` naming it and the file (``skip_prefixes`` lists more
               prefixes to skip on purpose, e.g. ``model_ema.`` of a training checkpoint). Only the tensors a part
               uses are read from a safetensors file (a torch checkpoint is read once). sgm files hold no configs:
               those written by :func:`save_svd` carry vdiff's in their metadata; otherwise the arguments, else
               SVD's (UNet ``svd``, autoencoder ``svd``, CLIP ``vit-h-14``).

Exports: ``save_svd(weights, folder, "diffusers")`` writes the three part folders (each loads with its class's
``from_pretrained``; copy ``scheduler/``, ``feature_extractor/`` and ``model_index.json`` from the original
pipeline for a complete ``StableVideoDiffusionPipeline``). ``save_svd(weights, file, "sgm")`` writes one file in
the original layout: UNet, autoencoder, CLIP tower, and the concat-branch encoder copy (``encoder.*`` +
``quant_conv.*`` from the autoencoder) that sgm's conditioner loads.

The UNet's ResBlock GroupNorm epsilons differ between the layouts (sgm 1e-5 everywhere, diffusers 1e-6 in some
blocks; :attr:`UNetSVDConfig.norm_eps`): a UNet read from one layout computes what that layout computes, and an
export to the other is refused unless ``convert_norm_eps=True`` (the same tensors, under the other layout's
epsilons: SVD was trained with sgm's).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.models.conditioners import CLIP_MEAN, CLIP_STD, CLIPImageEmbedder, CLIPImageEmbedderConfig
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights import autoencoder_convert, clip, unet_svd
from vdiff.weights.autoencoder import config_to_diffusers as ae_config_to_diffusers
from vdiff.weights.autoencoder import read_autoencoder
from vdiff.weights.errors import WeightsError
from vdiff.weights.safetensors_io import (
    LazyStateDict,
    load_metadata,
    resolve_weights_path,
    save_state_dict,
)
from vdiff.weights.template import build_loaded, check_same, resolve_config, write_model_folder

SVDLayout = Literal["auto", "diffusers", "sgm"]
SVD_LAYOUTS = ("auto", "diffusers", "sgm")
ConcatEncoderPolicy = Literal["check", "skip"]

UNET_PREFIX = unet_svd.SGM_PREFIX  # "model.diffusion_model."
AUTOENCODER_PREFIX = autoencoder_convert.SGM_PREFIX  # "first_stage_model."
CLIP_PREFIX = clip.SGM_CLIP_PREFIX  # "conditioner.embedders.0.open_clip.model.visual."
OPEN_CLIP_MODEL = "conditioner.embedders.0.open_clip.model."
# open_clip's text-tower leftovers in sgm's FrozenOpenCLIPImageEmbedder (it deletes model.transformer only)
TEXT_TOWER_REMNANTS = tuple(
    OPEN_CLIP_MODEL + name
    for name in ("positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
                 "ln_final.bias", "attn_mask")
)  # fmt: skip
CONCAT_ENCODER_PREFIX = "conditioner.embedders.3.encoder."  # sgm's concat-branch autoencoder copy
CONCAT_COMPARED = ("encoder.", "quant_conv.")  # the parts of it that run (encode, posterior mode)
CONCAT_UNUSED = ("decoder.", "post_quant_conv.")  # the parts of it that never run in SVD
PARTS = ("unet", "vae", "image_encoder")  # the pipeline's weight folders
PIPELINE_CLASS = "StableVideoDiffusionPipeline"
METADATA = {"unet": "vdiff_unet_config", "autoencoder": "vdiff_autoencoder_config",
            "image_encoder": "vdiff_image_encoder_config"}  # fmt: skip
TRANSFORMERS_WEIGHTS = "model.safetensors"


SVDWeightsError = WeightsError  # an SVD file or folder that does not fit (unknown keys, contradicting configs, ...)
CONFIGS = {"unet": UNetSVDConfig, "autoencoder": AutoencoderConfig, "image_encoder": CLIPImageEmbedderConfig}


@dataclass
class SVDWeights:
    """The three networks of an SVD: ``unet`` (:class:`UNetSVD`), ``image_encoder`` (:class:`CLIPImageEmbedder`)
    and ``autoencoder`` (:class:`VideoAutoencoder`), and where they were read from (``layout`` ``"diffusers"`` /
    ``"sgm"``, ``path``; None when built in memory), with the keys of the file that were read on purpose without
    being used (``skipped``: the known parts listed in the module docstring)."""

    unet: UNetSVD
    image_encoder: CLIPImageEmbedder
    autoencoder: VideoAutoencoder
    layout: str | None = None
    path: Path | None = None
    skipped: tuple[str, ...] = ()


#################################################################################
#                              Key accounting (sgm)                             #
#################################################################################


def classify_sgm_keys(keys: Sequence[str], skip_prefixes: Sequence[str] = ()) -> dict[str, list[str]]:
    """Sort the keys of an SVD single file into ``unet``, ``autoencoder``, ``image_encoder``, ``concat_encoder``
    (the copy's compared part), ``skipped`` (the known unused parts and ``skip_prefixes``) and ``unknown``."""
    groups: dict[str, list[str]] = {
        name: [] for name in ("unet", "autoencoder", "image_encoder", "concat_encoder", "skipped", "unknown")
    }
    skip = tuple(skip_prefixes)
    for key in keys:
        if key.startswith(UNET_PREFIX):
            groups["unet"].append(key)
        elif key.startswith(AUTOENCODER_PREFIX):
            groups["autoencoder"].append(key)
        elif key.startswith(CLIP_PREFIX):
            groups["image_encoder"].append(key)
        elif key.startswith(CONCAT_ENCODER_PREFIX) and key[len(CONCAT_ENCODER_PREFIX) :].startswith(CONCAT_COMPARED):
            groups["concat_encoder"].append(key)
        elif (
            key in TEXT_TOWER_REMNANTS
            or (key.startswith(CONCAT_ENCODER_PREFIX) and key[len(CONCAT_ENCODER_PREFIX) :].startswith(CONCAT_UNUSED))
            or (skip and key.startswith(skip))
        ):
            groups["skipped"].append(key)
        else:
            groups["unknown"].append(key)
    return groups


class _SingleFile(LazyStateDict):
    """Tensors of one weights file by selection: a safetensors file reads only what is asked for; a torch
    checkpoint is loaded once."""

    def get(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {k: self[k] for k in names}


#################################################################################
#                                   Reading                                     #
#################################################################################


def _fmt(names: Sequence[str], limit: int = 40) -> str:
    shown = "\n    ".join(names[:limit])
    return shown + (f"\n    ... and {len(names) - limit} more" if len(names) > limit else "")


def _as_config(kind: str, value: Any) -> Any:
    return resolve_config(CONFIGS[kind], value)


def _autoencoder(state: dict[str, Tensor], config: AutoencoderConfig, dtype) -> VideoAutoencoder:
    model = VideoAutoencoder(config)
    model.load_state_dict(state, strict=True)
    stored = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    return model.to(dtype if dtype is not None else stored)


def load_svd(
    path: str | os.PathLike,
    layout: SVDLayout = "auto",
    unet_config: UNetSVDConfig | Mapping[str, Any] | str | None = None,
    autoencoder_config: AutoencoderConfig | Mapping[str, Any] | str | None = None,
    image_encoder_config: CLIPImageEmbedderConfig | Mapping[str, Any] | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    concat_encoder: ConcatEncoderPolicy = "check",
    skip_prefixes: Sequence[str] = (),
) -> SVDWeights:
    """Read a whole SVD from a LOCAL diffusers pipeline folder or an original single file (module docstring).

    Args:
        path: the pipeline folder, or ``svd.safetensors`` / ``svd_xt.safetensors`` / an sgm ``.ckpt``, or a hub id
            of either (``hf://stabilityai/stable-video-diffusion-img2vid-xt``: only the fp32 ``unet/``, ``vae/`` and
            ``image_encoder/`` files are fetched); a relative path that does not exist is also looked up under
            ``$VDIFF_WEIGHTS``.
        layout: ``auto`` (a folder is diffusers, a file sgm), ``diffusers`` or ``sgm``.
        unet_config, autoencoder_config, image_encoder_config: each part's architecture (a config, a preset name
            or its dict). Where the weights bring a config (``config.json``, the metadata :func:`save_svd` writes)
            a passed one may only agree with it (as the part readers check); otherwise it is used, else SVD's.
        dtype: of every tensor (None: as stored).
        concat_encoder: ``check`` sgm's concat-branch encoder copy against the autoencoder (module docstring),
            or ``skip`` it unchecked.
        skip_prefixes: more key prefixes of an sgm file to skip on purpose.

    Raises:
        FileNotFoundError: no such file or folder, or a pipeline folder without one of its parts (named).
        SVDWeightsError: unknown keys, contradicting configs, a different concat-branch encoder.
        UNetSVDConversionError, ConversionError, CLIPConversionError (and the readers' config errors): a part
            whose tensors or config do not fit, naming the keys and the file.
    """
    if layout not in SVD_LAYOUTS:
        raise ValueError(f"unknown SVD layout {layout!r}; choose one of {SVD_LAYOUTS}")
    if concat_encoder not in ("check", "skip"):
        raise ValueError(f"concat_encoder must be 'check' or 'skip', got {concat_encoder!r}")
    resolved = resolve_weights_path(path, what="SVD weights (a diffusers pipeline folder or svd.safetensors)",
                                    allow_dir=True).absolute()  # fmt: skip
    if resolved.is_dir():
        if layout == "sgm":
            raise ValueError(f"{resolved} is a folder (a diffusers pipeline); layout='sgm' is for single files")
        return _load_pipeline(resolved, unet_config, autoencoder_config, image_encoder_config, dtype)
    if layout == "diffusers":
        raise ValueError(f"{resolved} is a file; a diffusers SVD is a pipeline folder (unet/, vae/, image_encoder/)")
    return _load_single_file(resolved, unet_config, autoencoder_config, image_encoder_config, dtype, concat_encoder,
                             skip_prefixes)  # fmt: skip


def _load_pipeline(folder: Path, unet_config, autoencoder_config, image_encoder_config, dtype) -> SVDWeights:
    index = folder / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise SVDWeightsError(f"{index}: not a readable model_index.json ({error})") from None
        if name != PIPELINE_CLASS:
            raise SVDWeightsError(f"{index}: _class_name={name!r}; load_svd reads a {PIPELINE_CLASS} folder")
    absent = [part for part in PARTS if not (folder / part / "config.json").is_file()]
    if absent:
        raise FileNotFoundError(
            f"{folder}: not a diffusers SVD pipeline folder: no {', '.join(f'{p}/config.json' for p in absent)} "
            f"(expected {', '.join(f'{p}/' for p in PARTS)} each with config.json and weights)"
        )
    unet = unet_svd.read_unet_svd(folder / "unet", config=_as_config("unet", unet_config))
    vae = read_autoencoder(folder / "vae", config=_as_config("autoencoder", autoencoder_config))
    encoder = clip.read_clip_image_embedder(folder / "image_encoder",
                                            config=_as_config("image_encoder", image_encoder_config))  # fmt: skip
    return SVDWeights(
        unet=build_loaded(UNetSVD, unet.config, unet.state_dict, dtype),
        image_encoder=build_loaded(CLIPImageEmbedder, encoder.config, encoder.state_dict, dtype),
        autoencoder=_autoencoder(vae.state_dict, vae.config, dtype),
        layout="diffusers",
        path=folder,
    )


def _config_for(kind: str, given: Any, metadata: Mapping[str, str], default: str, path: Path) -> Any:
    given = _as_config(kind, given)
    stored_json = metadata.get(METADATA[kind])
    if stored_json is None:
        return given if given is not None else _as_config(kind, default)
    stored = CONFIGS[kind].from_dict(json.loads(stored_json))
    if given is not None:
        check_same(given, stored, "the file", ignore=("gradient_checkpointing", "dropout"), heading=f"{path}: the "
                   f"{kind} config passed contradicts the one in the file's metadata ({METADATA[kind]}; pass None to use it)")  # fmt: skip
        return given
    return stored


def _load_single_file(path: Path, unet_config, autoencoder_config, image_encoder_config, dtype, concat_encoder,
                      skip_prefixes) -> SVDWeights:  # fmt: skip
    file = _SingleFile(path)
    groups = classify_sgm_keys(list(file), skip_prefixes)
    if groups["unknown"]:
        raise SVDWeightsError(
            f"{path}: {len(groups['unknown'])} key(s) belong to no part of SVD vdiff knows (UNet {UNET_PREFIX}*, "
            f"autoencoder {AUTOENCODER_PREFIX}*, CLIP {CLIP_PREFIX}*, the concat-branch encoder copy "
            f"{CONCAT_ENCODER_PREFIX}*, open_clip's text-tower leftovers); pass skip_prefixes= to skip them on "
            f"purpose:\n    {_fmt(sorted(groups['unknown']))}"
        )
    absent = [prefix for prefix, kind in ((UNET_PREFIX, "unet"), (AUTOENCODER_PREFIX, "autoencoder"),
                                          (CLIP_PREFIX, "image_encoder")) if not groups[kind]]  # fmt: skip
    if absent:
        raise SVDWeightsError(f"{path}: not a whole SVD: no tensor under {', '.join(absent)}")
    metadata = load_metadata(path)
    unet_cfg = _config_for("unet", unet_config, metadata, "svd", path)
    ae_cfg = _config_for("autoencoder", autoencoder_config, metadata, "svd", path)
    clip_cfg = _config_for("image_encoder", image_encoder_config, metadata, clip.OPEN_CLIP_DEFAULT, path)
    where = f"sgm file {path}"

    unet_state = unet_svd.from_sgm(file.get(groups["unet"]), unet_svd.without_vista(unet_cfg), source=where)
    unet_state, _ = unet_svd.fill_vista_extensions(unet_state, unet_cfg)  # Vista's layers, when the config has them
    unet = build_loaded(UNetSVD, unet_cfg, unet_state, dtype)
    del unet_state
    try:
        ae_state = autoencoder_convert.from_sgm(file.get(groups["autoencoder"]), ae_cfg)
    except autoencoder_convert.ConversionError as error:
        raise error.with_context(where, f"autoencoder config {ae_cfg}") from None
    autoencoder = _autoencoder(ae_state, ae_cfg, dtype)
    clip_state = clip.from_open_clip(file.get(groups["image_encoder"]), clip_cfg, CLIP_PREFIX, source=where)
    image_encoder = build_loaded(CLIPImageEmbedder, clip_cfg, clip_state, dtype)
    if groups["concat_encoder"] and concat_encoder == "check":
        _check_concat_encoder(file.get(groups["concat_encoder"]), autoencoder, path)
    skipped = groups["skipped"] + (groups["concat_encoder"] if concat_encoder == "skip" else [])
    return SVDWeights(unet, image_encoder, autoencoder, "sgm", path, tuple(sorted(skipped)))


def _check_concat_encoder(tensors: dict[str, Tensor], autoencoder: VideoAutoencoder, path: Path) -> None:
    """sgm's concat-branch encoder copy must compute what ``autoencoder``'s encoder computes (module docstring)."""
    levels = len(autoencoder.config.ch_mult)
    ours = {k: v for k, v in autoencoder.state_dict().items() if k.startswith(CONCAT_COMPARED)}
    theirs: dict[str, Tensor] = {}
    missing = []
    for key, value in ours.items():
        name = CONCAT_ENCODER_PREFIX + autoencoder_convert.sgm_key(key, levels)
        if name not in tensors:
            missing.append(name)
        elif tensors[name].numel() != value.numel():
            missing.append(f"{name}: shape {list(tensors[name].shape)}, the autoencoder's is {list(value.shape)}")
        else:
            theirs[key] = tensors[name].reshape(value.shape).to(value.dtype)
    used = {CONCAT_ENCODER_PREFIX + autoencoder_convert.sgm_key(k, levels) for k in theirs}
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        raise SVDWeightsError(
            f"{path}: the concat-branch encoder copy ({CONCAT_ENCODER_PREFIX}*) does not fit the autoencoder:"
            + (f"\n  missing or mis-shaped ({len(missing)}):\n    {_fmt(missing)}" if missing else "")
            + (f"\n  unexpected ({len(unexpected)}):\n    {_fmt(unexpected)}" if unexpected else "")
        )
    differ = sorted(k for k, v in theirs.items() if not torch.equal(v, ours[k]))
    if not differ:
        return
    dtype = next(autoencoder.parameters()).dtype
    copy = VideoAutoencoder(autoencoder.config).to(dtype)
    copy.load_state_dict({**autoencoder.state_dict(), **theirs}, strict=True)
    size = 4 * autoencoder.spatial_downsample
    frame = (torch.rand(1, 1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    was_training = autoencoder.training
    with torch.no_grad():
        expected = autoencoder.eval().encode(frame).mode().float()
        got = copy.eval().encode(frame).mode().float()
    autoencoder.train(was_training)
    error = (got - expected).abs().max().item()
    bound = 1e-4 * max(1.0, expected.abs().max().item())
    if not error <= bound:
        names = [CONCAT_ENCODER_PREFIX + autoencoder_convert.sgm_key(k, levels) for k in differ]
        raise SVDWeightsError(
            f"{path}: the concat-branch encoder copy ({CONCAT_ENCODER_PREFIX}*), which sgm uses to encode the "
            f"conditioning frame, computes another posterior mode than {AUTOENCODER_PREFIX}encoder (max difference "
            f"{error:.3g} on a random frame, bound {bound:.3g}); vdiff encodes that frame with the autoencoder, so "
            f"this checkpoint would be conditioned differently. Tensors that differ: {names[:10]}. Pass "
            "concat_encoder='skip' to load it anyway."
        )


#################################################################################
#                                 CLIP export                                   #
#################################################################################


def _export_clip(state: Mapping[str, Tensor], config: CLIPImageEmbedderConfig, rule_of: Callable) -> dict[str, Tensor]:
    """Our CLIP state dict -> a peer's names by inverting the reader's rules (each inversion is checked by applying
    the rule again: the reader reads back exactly these tensors)."""
    shapes = clip.target_shapes(config)
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise clip.CLIPConversionError("vdiff CLIP state dict (exporting)", missing, [], unexpected, target=clip.TARGET)
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        rule = rule_of(key, shape)
        value = state[key].detach()
        if len(rule.names) > 1:
            parts = list(value.split([s[0] for s in rule.shapes], dim=0))
        else:
            target = rule.shapes[0]
            candidates = [value.reshape(target)] if value.numel() == math.prod(target) else []
            if value.ndim == 2 and tuple(value.t().shape) == target:
                candidates.append(value.t())
            parts = next(([c] for c in candidates if torch.equal(rule.combine([c]), value)), [])
        if not parts or not torch.equal(rule.combine(parts), value):
            raise RuntimeError(f"cannot invert the CLIP reader's rule for {key} (to {rule.names})")
        out.update({name: part.contiguous().clone() for name, part in zip(rule.names, parts)})
    return out


def clip_config_to_transformers(config: CLIPImageEmbedderConfig) -> dict[str, Any]:
    """The transformers ``config.json`` of a ``CLIPVisionModelWithProjection`` computing what ``config`` computes.

    Raises:
        clip.CLIPConfigError: for preprocessing mean/std other than CLIP's (a config.json does not hold them).
    """
    if tuple(config.mean) != CLIP_MEAN or tuple(config.std) != CLIP_STD:
        raise clip.CLIPConfigError(
            f"CLIPImageEmbedderConfig mean={config.mean}, std={config.std}: a transformers config.json holds no "
            "preprocessing statistics (they would read back as CLIP's); export the vdiff layout instead"
        )
    return {
        "architectures": [clip.TRANSFORMERS_ARCHITECTURE],
        "model_type": clip.TRANSFORMERS_MODEL_TYPE,
        "hidden_size": config.width,
        "intermediate_size": config.mlp_dim,
        "projection_dim": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_act": config.act,
        "layer_norm_eps": config.norm_eps,
        "num_channels": 3,
        "attention_dropout": 0.0,
        "dropout": 0.0,
    }


def clip_to_transformers(state: Mapping[str, Tensor], config: CLIPImageEmbedderConfig) -> dict[str, Tensor]:
    """Our CLIP state dict -> ``CLIPVisionModelWithProjection`` names."""
    return _export_clip(state, config, clip._transformers_rule)


def clip_to_open_clip(
    state: Mapping[str, Tensor], config: CLIPImageEmbedderConfig, prefix: str = CLIP_PREFIX
) -> dict[str, Tensor]:
    """Our CLIP state dict -> open_clip image-tower names under ``prefix`` (SVD's, by default)."""
    return _export_clip(state, config, lambda k, s: clip._open_clip_rule(k, s, prefix))


#################################################################################
#                                   Writing                                     #
#################################################################################


def _unet_config_for(config: UNetSVDConfig, layout: Literal["diffusers", "sgm"], convert: bool) -> UNetSVDConfig:
    if config.norm_eps == layout:
        return config
    if convert:
        return config.replace(norm_eps=layout)
    try:
        unet_svd._check_norm_eps(config, layout)  # the part writers' refusal, with its explanation
    except unet_svd.UNetSVDConfigError as error:
        raise unet_svd.UNetSVDConfigError(
            f"{error} With save_svd: pass convert_norm_eps=True to export the same tensors under {layout}'s epsilons."
        ) from None
    raise AssertionError("unreachable: the part writers refuse other epsilons")


def save_svd(
    weights: SVDWeights,
    path: str | os.PathLike,
    layout: Literal["diffusers", "sgm"] = "diffusers",
    convert_norm_eps: bool = False,
) -> Path:
    """Write a whole SVD; returns ``path``.

    layout:
        ``"diffusers"``: a FOLDER with ``unet/``, ``vae/`` and ``image_encoder/`` (each loads with diffusers'
            ``UNetSpatioTemporalConditionModel`` / ``AutoencoderKLTemporalDecoder`` and transformers'
            ``CLIPVisionModelWithProjection`` ``from_pretrained``, and the folder with :func:`load_svd`).
        ``"sgm"``: one ``.safetensors`` file in the original ``svd.safetensors`` layout (module docstring), vdiff's
            configs in its metadata.
    convert_norm_eps: export a UNet whose ``norm_eps`` is the other layout's (see the module docstring); without
        it such an export raises :class:`~vdiff.weights.unet_svd.UNetSVDConfigError`.

    Raises:
        UNetSVDConfigError, ValueError, CLIPConfigError: a part the layout cannot represent (naming why): UNet
            norm epsilons (above), an autoencoder whose ``quant_conv`` is not the identity (sgm's has none), CLIP
            preprocessing statistics other than CLIP's (diffusers).
    """
    path = Path(path)
    unet, ae, encoder = weights.unet, weights.autoencoder, weights.image_encoder
    if layout == "diffusers":
        if path.suffix:
            raise ValueError(f"{path}: the diffusers layout is a folder (unet/, vae/, image_encoder/)")
        cfg = _unet_config_for(unet.config, "diffusers", convert_norm_eps)
        files = {  # everything converted (and refused, if it must be) before anything is written
            "unet": (unet_svd.config_to_diffusers(cfg), unet_svd.to_diffusers(unet.state_dict(), cfg),
                     unet_svd.DIFFUSERS_WEIGHTS[0]),
            "vae": (ae_config_to_diffusers(ae.config), autoencoder_convert.to_diffusers(ae.state_dict(), ae.config),
                    "diffusion_pytorch_model.safetensors"),
            "image_encoder": (clip_config_to_transformers(encoder.config),
                              clip_to_transformers(encoder.state_dict(), encoder.config), TRANSFORMERS_WEIGHTS),
        }  # fmt: skip
        for part, (config_json, tensors, weights_name) in files.items():
            write_model_folder(path / part, config_json, tensors, weights_name)
        return path
    if layout == "sgm":
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: the sgm export is one .safetensors file (vdiff's configs go in its metadata)")
        cfg = _unet_config_for(unet.config, "sgm", convert_norm_eps)
        tensors = unet_svd.to_sgm(unet.state_dict(), cfg)
        ae_state = ae.state_dict()
        tensors.update(autoencoder_convert.to_sgm(ae_state, ae.config))
        tensors.update(clip_to_open_clip(encoder.state_dict(), encoder.config))
        levels = len(ae.config.ch_mult)
        for key, value in ae_state.items():  # the concat-branch encoder copy sgm's conditioner loads
            if key.startswith(CONCAT_COMPARED):
                name = autoencoder_convert.sgm_key(key, levels)
                shape = (
                    tensors.get(AUTOENCODER_PREFIX + name, value).shape if key.startswith("encoder.") else value.shape
                )
                tensors[CONCAT_ENCODER_PREFIX + name] = value.detach().reshape(shape).clone()
        metadata = {
            METADATA["unet"]: json.dumps(cfg.to_dict()),
            METADATA["autoencoder"]: json.dumps(ae.config.to_dict()),
            METADATA["image_encoder"]: json.dumps(encoder.config.to_dict()),
        }
        save_state_dict(tensors, path, metadata=metadata)
        return path
    raise ValueError(f"unknown SVD export layout {layout!r}; choose 'diffusers' or 'sgm'")
