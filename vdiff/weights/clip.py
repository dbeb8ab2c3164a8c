"""Read CLIP image-embedder weights (SVD's OpenCLIP ViT-H/14 image tower + projection) from LOCAL files into
:class:`vdiff.models.conditioners.CLIPImageEmbedder`. Nothing is downloaded; export is not provided.

Layouts:

``transformers``: what ``CLIPVisionModelWithProjection.save_pretrained`` writes, e.g. SVD's ``image_encoder/``:
    a folder with ``config.json`` and ``model.safetensors`` (or ``model.fp16.safetensors``, a sharded
    ``model.safetensors.index.json``, ``pytorch_model.bin``); a pipeline folder holding it under ``image_encoder/``;
    or the weights file alone with a ``config.json`` beside it. The architecture is read from ``config.json``
    (:func:`config_from_transformers`); a field vdiff cannot represent is a :class:`CLIPConfigError` naming the file
    and the field. A file without any ``config.json`` needs ``config=``.
``open_clip``: open_clip's ``visual.*`` keys (a ``CLIP`` state dict; text-tower keys are other model parts and are
    skipped), the same keys under ``conditioner.embedders.0.open_clip.model.visual.`` (SVD's ``svd.safetensors``,
    whose other parts are skipped too), or a bare visual state dict (``conv1.weight``, ...). These files hold no
    config. The SVD prefix fixes the architecture (sgm's ``FrozenOpenCLIPImageEmbedder`` is ViT-H-14, laion2b,
    GELU), so ``"vit-h-14"`` is used; for the others pass ``config=`` (a ``CLIP_IMAGE_CONFIGS`` name or a
    :class:`CLIPImageEmbedderConfig`): without it ``"vit-h-14"`` is assumed with a ``UserWarning``, because the
    head count and the activation are not in the weights (open_clip's ``ViT-H-14-quickgelu`` has the same shapes).

Name mapping to our modules (``visual`` is timm's ``VisionTransformer``, ``proj`` the projection):

=====================================  ==========================================  ===================================
vdiff                                  open_clip (under ``visual.``)               transformers
=====================================  ==========================================  ===================================
``visual.patch_embed.proj.weight``     ``conv1.weight``                            ``vision_model.embeddings.patch_embedding.weight``
``visual.cls_token`` (1, 1, W)         ``class_embedding`` (W,)                    ``vision_model.embeddings.class_embedding`` (W,)
``visual.pos_embed`` (1, N+1, W)       ``positional_embedding`` (N+1, W)           ``vision_model.embeddings.position_embedding.weight``
``visual.norm_pre.*``                  ``ln_pre.*``                                ``vision_model.pre_layrnorm.*``
``visual.blocks.i.norm1.*``            ``transformer.resblocks.i.ln_1.*``          ``vision_model.encoder.layers.i.layer_norm1.*``
``visual.blocks.i.attn.qkv.*``         ``...resblocks.i.attn.in_proj_{weight,bias}``  ``...layers.i.self_attn.{q,k,v}_proj.*`` (concatenated q, k, v)
``visual.blocks.i.attn.proj.*``        ``...resblocks.i.attn.out_proj.*``          ``...layers.i.self_attn.out_proj.*``
``visual.blocks.i.norm2.*``            ``...resblocks.i.ln_2.*``                   ``...layers.i.layer_norm2.*``
``visual.blocks.i.mlp.fc1.*``          ``...resblocks.i.mlp.c_fc.*``               ``...layers.i.mlp.fc1.*``
``visual.blocks.i.mlp.fc2.*``          ``...resblocks.i.mlp.c_proj.*``             ``...layers.i.mlp.fc2.*``
``visual.norm.*``                      ``ln_post.*``                               ``vision_model.post_layernorm.*``
``proj.weight`` (D, W)                 ``proj`` (W, D), transposed                 ``visual_projection.weight`` (D, W)
=====================================  ==========================================  ===================================

(transformers applies ``post_layernorm`` to the class token only, timm to every token before pooling it: the same
result, LayerNorm being per token.) Every conversion is strict: a key the conversion does not use, a missing key
and a shape mismatch are all collected and raised together (:class:`CLIPConversionError`), naming the keys and the
file. transformers' ``position_ids`` buffer, when a file stores it, must be ``arange(N+1)``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.models.conditioners import CLIPImageEmbedder, CLIPImageEmbedderConfig
from vdiff.weights.safetensors_io import file_sha256, load_state_dict, resolve_weights_path

ClipLayout = Literal["auto", "transformers", "open_clip"]
CLIP_LAYOUTS = ("auto", "transformers", "open_clip")

SGM_CLIP_PREFIX = "conditioner.embedders.0.open_clip.model.visual."  # SVD's svd.safetensors
OPEN_CLIP_PREFIX = "visual."  # an open_clip CLIP state dict
OPEN_CLIP_DEFAULT = "vit-h-14"

TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
TRANSFORMERS_INDEX = "model.safetensors.index.json"
TRANSFORMERS_SUBFOLDER = "image_encoder"  # diffusers pipelines (SVD) keep the CLIP image encoder there
TRANSFORMERS_ARCHITECTURE = "CLIPVisionModelWithProjection"
TRANSFORMERS_MODEL_TYPE = "clip_vision_model"
TRANSFORMERS_POSITION_IDS = "vision_model.embeddings.position_ids"

# CLIPVisionConfig fields -> CLIPImageEmbedderConfig fields (and transformers' defaults, used when a field is absent)
_TRANSFORMERS_FIELDS: dict[str, tuple[str, Any]] = {
    "hidden_size": ("width", 768),
    "intermediate_size": ("mlp_dim", 3072),
    "projection_dim": ("embed_dim", 512),
    "num_hidden_layers": ("depth", 12),
    "num_attention_heads": ("num_heads", 12),
    "image_size": ("image_size", 224),
    "patch_size": ("patch_size", 32),
    "hidden_act": ("act", "quick_gelu"),
    "layer_norm_eps": ("norm_eps", 1e-5),
}
# Fields that do not change what the weights compute (bookkeeping, initialisation, output options).
_TRANSFORMERS_IGNORED = {
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation_autoset",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "initializer_range",
    "initializer_factor",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
    "use_bfloat16",
    "chunk_size_feed_forward",
    "tie_word_embeddings",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tf_legacy_loss",
    "pruned_heads",
}


class CLIPConfigError(ValueError):
    """A config (a transformers ``config.json``, a passed config) vdiff cannot represent or that contradicts
    another; the message names the file and the field."""


class CLIPConversionError(ValueError):
    """Weights that do not fit the image embedder: missing keys, shape mismatches and unused keys, by name."""

    def __init__(self, source: str, missing: list[str], mismatched: list[str], unexpected: list[str], hint: str = ""):
        self.source, self.missing, self.mismatched, self.unexpected, self.hint = (
            source,
            missing,
            mismatched,
            unexpected,
            hint,
        )
        parts = [f"{source}: weights do not fit the CLIP image embedder config" + (f"; {hint}" if hint else "")]
        for title, names in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
            if names:
                shown = "\n    ".join(names[:60]) + (f"\n    ... and {len(names) - 60} more" if len(names) > 60 else "")
                parts.append(f"  {title} ({len(names)}):\n    {shown}")
        super().__init__("\n".join(parts))

    def __reduce__(self):
        return type(self), (self.source, self.missing, self.mismatched, self.unexpected, self.hint)


# ----------------------------------------------------------------------------- transformers config.json


def config_from_transformers(config: Mapping[str, Any], source: str = "config") -> CLIPImageEmbedderConfig:
    """A transformers ``CLIPVisionConfig`` of a ``CLIPVisionModelWithProjection`` (``config.json`` as a dict) ->
    the :class:`CLIPImageEmbedderConfig` that computes the same thing.

    Raises:
        CLIPConfigError: naming ``source`` and the field, for another ``model_type`` / ``architectures``, an unknown
            field, an activation other than ``gelu`` / ``quick_gelu``, a non-square image or patch size,
            ``num_channels`` other than 3, non-zero dropout, or sizes the model cannot have.
    """

    def refuse(name: str, why: str) -> CLIPConfigError:
        return CLIPConfigError(f"{source}: {name}={config.get(name, '<missing>')!r} cannot be loaded by vdiff: {why}")

    if config.get("model_type", TRANSFORMERS_MODEL_TYPE) != TRANSFORMERS_MODEL_TYPE:
        raise refuse("model_type", f"vdiff reads a {TRANSFORMERS_MODEL_TYPE!r} config ({TRANSFORMERS_ARCHITECTURE})")
    architectures = config.get("architectures") or [TRANSFORMERS_ARCHITECTURE]
    if list(architectures) != [TRANSFORMERS_ARCHITECTURE]:
        raise refuse("architectures", f"vdiff reads {TRANSFORMERS_ARCHITECTURE} (the image tower with its projection)")
    known = (
        set(_TRANSFORMERS_FIELDS)
        | _TRANSFORMERS_IGNORED
        | {"model_type", "num_channels", "attention_dropout", "dropout"}
    )
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise CLIPConfigError(
            f"{source}: unknown CLIPVisionConfig field(s) {unknown}; vdiff does not know what they change, so it does "
            f"not load the model (known fields: {sorted(known)})"
        )
    if config.get("pruned_heads"):
        raise refuse("pruned_heads", "vdiff's attention has every head")
    if int(config.get("num_channels", 3)) != 3:
        raise refuse("num_channels", "the image embedder takes RGB frames")
    for name in ("attention_dropout", "dropout"):
        if float(config.get(name) or 0.0) != 0.0:
            raise refuse(name, "vdiff's image embedder has no dropout")
    values: dict[str, Any] = {}
    for theirs, (ours, default) in _TRANSFORMERS_FIELDS.items():
        value = config.get(theirs, default)
        if theirs in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise refuse(theirs, "vdiff's image embedder is square")
            value = value[0]
        values[ours] = value
    try:
        values["norm_eps"] = float(values["norm_eps"])
        return CLIPImageEmbedderConfig(**values)
    except (TypeError, ValueError) as error:
        named = [
            f"{t}={config.get(t, d)!r}"
            for t, (o, d) in _TRANSFORMERS_FIELDS.items()
            if re.search(rf"\b{o}\b", str(error))
        ]
        fields = ", ".join(named) or "the config"
        raise CLIPConfigError(f"{source}: {fields} cannot be loaded by vdiff: {error}") from None


def read_transformers_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a transformers ``config.json`` file, as stored (errors name the file)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CLIPConfigError(f"{path}: not a readable transformers config.json ({error})") from None
    if not isinstance(raw, dict):
        raise CLIPConfigError(f"{path}: a transformers config.json holds a JSON object, got {type(raw).__name__}")
    return raw


def read_transformers_config(path: str | os.PathLike) -> CLIPImageEmbedderConfig:
    """:func:`config_from_transformers` of a ``config.json`` file (errors name the file)."""
    return config_from_transformers(read_transformers_config_json(path), source=str(path))


# ----------------------------------------------------------------------------- name maps


@dataclass(frozen=True)
class _Rule:
    """How one of our tensors is made from the file's: source names, their expected shapes, and the combination."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Callable[[list[Tensor]], Tensor]


def _same(name: str, shape: tuple[int, ...]) -> _Rule:
    return _Rule((name,), (shape,), lambda ts: ts[0])


def _unflatten(name: str, shape: tuple[int, ...], lead: int) -> _Rule:  # (W,) -> (1, 1, W); (N, W) -> (1, N, W)
    return _Rule((name,), (shape[lead:],), lambda ts: ts[0].reshape(shape))


def _transposed(name: str, shape: tuple[int, ...]) -> _Rule:  # open_clip's proj (W, D) -> Linear weight (D, W)
    return _Rule((name,), (shape[::-1],), lambda ts: ts[0].t())


def _qkv(names: tuple[str, str, str], shape: tuple[int, ...]) -> _Rule:  # separate q, k, v -> fused qkv
    part = (shape[0] // 3, *shape[1:])
    return _Rule(names, (part, part, part), lambda ts: torch.cat(ts, dim=0))


_BLOCK = re.compile(r"visual\.blocks\.(\d+)\.(.+)")
_OPEN_CLIP_BLOCK = {
    "norm1": "ln_1",
    "norm2": "ln_2",
    "attn.proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "visual.patch_embed.proj.weight": "conv1.weight",
    "visual.norm_pre.weight": "ln_pre.weight",
    "visual.norm_pre.bias": "ln_pre.bias",
    "visual.norm.weight": "ln_post.weight",
    "visual.norm.bias": "ln_post.bias",
}
_TRANSFORMERS_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TRANSFORMERS_TOP = {
    "visual.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.norm_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.norm_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.norm.weight": "vision_model.post_layernorm.weight",
    "visual.norm.bias": "vision_model.post_layernorm.bias",
    "proj.weight": "visual_projection.weight",
}


def _open_clip_rule(key: str, shape: tuple[int, ...], prefix: str) -> _Rule:
    if key == "visual.cls_token":
        return _unflatten(prefix + "class_embedding", shape, 2)
    if key == "visual.pos_embed":
        return _unflatten(prefix + "positional_embedding", shape, 1)
    if key == "proj.weight":
        return _transposed(prefix + "proj", shape)
    if key in _OPEN_CLIP_TOP:
        return _same(prefix + _OPEN_CLIP_TOP[key], shape)
    block, rest = _BLOCK.fullmatch(key).groups()  # type: ignore[union-attr]
    base = f"{prefix}transformer.resblocks.{block}."
    if rest.startswith("attn.qkv."):
        return _same(base + "attn.in_proj_" + rest.rsplit(".", 1)[1], shape)
    module, param = rest.rsplit(".", 1)
    return _same(f"{base}{_OPEN_CLIP_BLOCK[module]}.{param}", shape)


def _transformers_rule(key: str, shape: tuple[int, ...], prefix: str = "") -> _Rule:
    if key == "visual.cls_token":
        return _unflatten(prefix + "vision_model.embeddings.class_embedding", shape, 2)
    if key == "visual.pos_embed":
        return _unflatten(prefix + "vision_model.embeddings.position_embedding.weight", shape, 1)
    if key in _TRANSFORMERS_TOP:
        return _same(prefix + _TRANSFORMERS_TOP[key], shape)
    block, rest = _BLOCK.fullmatch(key).groups()  # type: ignore[union-attr]
    base = f"{prefix}vision_model.encoder.layers.{block}."
    if rest.startswith("attn.qkv."):
        param = rest.rsplit(".", 1)[1]
        return _qkv(tuple(f"{base}self_attn.{p}_proj.{param}" for p in "qkv"), shape)  # type: ignore[arg-type]
    module, param = rest.rsplit(".", 1)
    return _same(f"{base}{_TRANSFORMERS_BLOCK[module]}.{param}", shape)


def target_shapes(config: CLIPImageEmbedderConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (the model is built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = CLIPImageEmbedder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _convert(
    src: Mapping[str, Tensor],
    config: CLIPImageEmbedderConfig,
    rule_of: Callable[[str, tuple[int, ...]], _Rule],
    in_scope: Callable[[str], bool],
    source: str,
    buffers: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Our state dict from ``src``; raise CLIPConversionError listing every missing, mis-shaped and unused key.

    in_scope: which source keys belong to the image embedder (the rest are other model parts, skipped).
    buffers: source keys that carry no weight but must hold the given values (transformers' position_ids).
    """
    out: dict[str, Tensor] = {}
    missing, mismatched, used = [], [], set()
    for key, shape in target_shapes(config).items():
        rule = rule_of(key, shape)
        absent = [n for n in rule.names if n not in src]
        if absent:
            missing.extend(f"{n}  (vdiff {key}, shape {list(shape)})" for n in absent)
            continue
        used.update(rule.names)
        tensors = [src[n] for n in rule.names]
        wrong = [f"{n} {list(t.shape)}" for n, t, s in zip(rule.names, tensors, rule.shapes) if tuple(t.shape) != s]
        if wrong:
            expected = ", ".join(str(list(s)) for s in rule.shapes)
            mismatched.append(f"{', '.join(wrong)}: expected {expected} (vdiff {key}, shape {list(shape)})")
            continue
        out[key] = rule.combine(tensors).contiguous()
    for name, value in (buffers or {}).items():
        if name in src:
            used.add(name)
            if tuple(src[name].shape) != tuple(value.shape) or not torch.equal(src[name].to(value.dtype), value):
                mismatched.append(f"{name}: must be arange({value.shape[-1]}) of shape {list(value.shape)}")
    unexpected = sorted(k for k in src if in_scope(k) and k not in used)
    if missing or mismatched or unexpected:
        raise CLIPConversionError(source, missing, mismatched, unexpected)
    return out


def from_open_clip(
    state_dict: Mapping[str, Tensor],
    config: CLIPImageEmbedderConfig,
    prefix: str = OPEN_CLIP_PREFIX,
    source: str = "open_clip weights",
) -> dict[str, Tensor]:
    """open_clip image-tower keys under ``prefix`` -> our names (keys outside ``prefix`` are skipped)."""
    return _convert(
        state_dict, config, lambda k, s: _open_clip_rule(k, s, prefix), lambda k: k.startswith(prefix), source
    )


def from_transformers(
    state_dict: Mapping[str, Tensor], config: CLIPImageEmbedderConfig, source: str = "transformers weights"
) -> dict[str, Tensor]:
    """``CLIPVisionModelWithProjection`` keys -> our names (every key is in scope)."""
    position_ids = torch.arange(config.num_positions).unsqueeze(0)
    return _convert(
        state_dict, config, _transformers_rule, lambda k: True, source, {TRANSFORMERS_POSITION_IDS: position_ids}
    )


# ----------------------------------------------------------------------------- reading


@dataclass
class CLIPWeights:
    """What :func:`read_clip_image_embedder` found: our state dict, the config it fits, and where both came from."""

    state_dict: dict[str, Tensor]
    config: CLIPImageEmbedderConfig
    layout: str  # "transformers" or "open_clip" (never "auto")
    weights_path: Path  # absolute path of the weights file (the index file for sharded weights)
    config_source: str  # a config.json path, "argument", "svd: <name>" or "assumed: <name>"
    config_file: Path | None = None  # the config.json the config was read from (None: argument or assumed)
    config_file_content: dict[str, Any] | None = None  # that file's JSON object, as read


def _resolve_config(config: CLIPImageEmbedderConfig | Mapping[str, Any] | str | None) -> CLIPImageEmbedderConfig | None:
    if config is None or isinstance(config, CLIPImageEmbedderConfig):
        return config
    if isinstance(config, str):
        return CLIPImageEmbedderConfig.from_name(config)
    if isinstance(config, Mapping):
        return CLIPImageEmbedderConfig.from_dict(config)
    raise TypeError(f"config must be a CLIPImageEmbedderConfig, a size name or a mapping, got {type(config).__name__}")


def _check_same(given: CLIPImageEmbedderConfig, found: CLIPImageEmbedderConfig, source: str) -> None:
    diff = [
        f"{name}: passed {getattr(given, name)!r}, {source} says {getattr(found, name)!r}"
        for name in given.to_dict()
        if getattr(given, name) != getattr(found, name)
    ]
    if diff:
        raise CLIPConfigError(
            "the config passed contradicts the one stored with the weights (pass config=None to use it):\n  "
            + "\n  ".join(diff)
        )


def _transformers_folder(folder: Path) -> tuple[Path, Path]:
    """(config.json, weights file or shard index) of a transformers model folder or a pipeline's ``image_encoder/``."""
    model = folder
    if (
        not (folder / TRANSFORMERS_CONFIG).is_file()
        and (folder / TRANSFORMERS_SUBFOLDER / TRANSFORMERS_CONFIG).is_file()
    ):
        model = folder / TRANSFORMERS_SUBFOLDER
    config = model / TRANSFORMERS_CONFIG
    if not config.is_file():
        raise FileNotFoundError(
            f"{folder}: not a transformers CLIP image-encoder folder: no {TRANSFORMERS_CONFIG} in it or in "
            f"{folder / TRANSFORMERS_SUBFOLDER}"
        )
    for name in (TRANSFORMERS_WEIGHTS[0], TRANSFORMERS_INDEX, *TRANSFORMERS_WEIGHTS[1:]):
        if (model / name).is_file():
            return config, model / name
    present = sorted(p.name for p in model.iterdir())
    raise FileNotFoundError(
        f"{model}: no weights file ({', '.join((TRANSFORMERS_WEIGHTS[0], TRANSFORMERS_INDEX, *TRANSFORMERS_WEIGHTS[1:]))}) "
        f"beside {TRANSFORMERS_CONFIG} (found: {present})"
    )


def _load_weights(path: Path) -> dict[str, Tensor]:
    """A weights file, or every shard named by a transformers ``*.index.json``."""
    if not path.name.endswith(".index.json"):
        return load_state_dict(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a readable shard index with a 'weight_map' ({error})") from None
    state_dict: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(load_state_dict(path.parent / shard))
    return state_dict


def _open_clip_prefix(keys: list[str]) -> str | None:
    """Where open_clip image-tower keys sit in ``keys``: the SVD prefix, ``visual.``, ``""`` (bare), or None."""
    for prefix in (SGM_CLIP_PREFIX, OPEN_CLIP_PREFIX, ""):
        if prefix + "conv1.weight" in keys or prefix + "class_embedding" in keys:
            return prefix
    if any(k.startswith(SGM_CLIP_PREFIX) for k in keys):
        return SGM_CLIP_PREFIX
    if any(k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.") for k in keys):
        return OPEN_CLIP_PREFIX
    return None


def detect_layout(state_dict: Mapping[str, Tensor], path: Path) -> str:
    """``transformers`` or ``open_clip`` from a file's key names (raises when neither fits)."""
    keys = list(state_dict)
    if any(k.startswith("vision_model.") or k == "visual_projection.weight" for k in keys):
        return "transformers"
    if _open_clip_prefix(keys) is not None:
        return "open_clip"
    raise ValueError(
        f"{path}: holds no CLIP image-tower keys vdiff knows (transformers 'vision_model.*', open_clip 'visual.*' or "
        f"'{SGM_CLIP_PREFIX}*'); first keys: {keys[:5]}"
    )


def read_clip_image_embedder(
    path: str | os.PathLike,
    layout: ClipLayout = "auto",
    config: CLIPImageEmbedderConfig | Mapping[str, Any] | str | None = None,
) -> CLIPWeights:
    """Read CLIP image-embedder weights from a LOCAL folder or file into our names; a hub id is fetched first.

    Args:
        path: a transformers folder (``config.json`` + weights, or a pipeline folder with ``image_encoder/``), or a
            ``.safetensors`` / ``.pt`` / ``.ckpt`` / ``.bin`` file (open_clip keys, SVD's ``svd.safetensors``, a
            transformers weights file), or a hub id ``hf://ORG/NAME[/PATH]`` of either; a relative path that does not
            exist is also looked up in ``$VDIFF_WEIGHTS``.
        layout: ``"auto"`` (a folder is transformers; a file by its key names), ``"transformers"`` or ``"open_clip"``.
        config: the architecture (a :class:`CLIPImageEmbedderConfig`, a mapping of its fields or a name of
            ``CLIP_IMAGE_CONFIGS``). Where the weights come with a ``config.json`` that one is used and a
            contradicting ``config`` is an error; for open_clip files it is the only source of the head count and
            the activation (see the module docstring for what is assumed without it).

    Raises:
        FileNotFoundError: nothing at ``path`` (nor under ``$VDIFF_WEIGHTS``: the error names both), or a folder
            without weights.
        CLIPConfigError: a config vdiff cannot represent, contradicting configs, or a transformers file without a
            config (names the file and the field).
        CLIPConversionError: missing, mis-shaped or unused tensors (names the keys and the file).
    """
    if layout not in CLIP_LAYOUTS:
        raise ValueError(f"unknown CLIP weights layout {layout!r}; choose one of {CLIP_LAYOUTS}")
    given = _resolve_config(config)
    resolved = resolve_weights_path(path, what=f"CLIP image-embedder weights ({layout} layout)", allow_dir=True)
    resolved = resolved.absolute()

    found: CLIPImageEmbedderConfig | None = None
    source = "argument"
    if resolved.is_dir():
        if layout not in ("auto", "transformers"):
            raise ValueError(
                f"{resolved} is a folder, read as a transformers model folder; layout={layout!r} is for files"
            )
        config_json, weights_path = _transformers_folder(resolved)
        layout = "transformers"
    else:
        weights_path = resolved
        config_json = weights_path.parent / TRANSFORMERS_CONFIG
    state_dict = _load_weights(weights_path)
    if layout == "auto":
        layout = detect_layout(state_dict, weights_path)

    if layout == "transformers":
        content = read_transformers_config_json(config_json) if config_json.is_file() else None
        if content is not None:
            found, source = config_from_transformers(content, source=str(config_json)), str(config_json)
        if found is not None and given is not None:
            _check_same(given, found, source)
        cfg = found or given
        if cfg is None:
            raise CLIPConfigError(
                f"{weights_path}: transformers weights without a {TRANSFORMERS_CONFIG} beside them: load the folder "
                "with its config.json, or pass config= (a CLIPImageEmbedderConfig or a size name)"
            )
        try:
            ours = from_transformers(state_dict, cfg, source=f"transformers file {weights_path}")
        except CLIPConversionError as error:
            raise CLIPConversionError(
                error.source, error.missing, error.mismatched, error.unexpected, f"config from {source}"
            ) from None
        return CLIPWeights(ours, cfg, layout, weights_path, source, config_json if content is not None else None, content)

    prefix = _open_clip_prefix(list(state_dict))
    if prefix is None:
        raise CLIPConversionError(
            f"open_clip file {weights_path}", [f"{OPEN_CLIP_PREFIX}conv1.weight (or under {SGM_CLIP_PREFIX})"], [], []
        )
    if given is not None:
        cfg = given
    elif prefix == SGM_CLIP_PREFIX:
        cfg, source = CLIPImageEmbedderConfig.from_name(OPEN_CLIP_DEFAULT), f"svd: {OPEN_CLIP_DEFAULT}"
    else:
        cfg, source = CLIPImageEmbedderConfig.from_name(OPEN_CLIP_DEFAULT), f"assumed: {OPEN_CLIP_DEFAULT}"
        warnings.warn(
            f"{weights_path}: open_clip weights hold no config; assuming {OPEN_CLIP_DEFAULT!r} (ViT-H/14, 16 heads, "
            "GELU). The head count and the activation cannot be read from weights (open_clip's ViT-H-14-quickgelu has "
            "the same shapes): pass config= to say which model this is.",
            stacklevel=2,
        )
    try:
        ours = from_open_clip(state_dict, cfg, prefix, source=f"open_clip file {weights_path}")
    except CLIPConversionError as error:
        where = f"keys under {prefix!r}" if prefix else "bare visual keys"
        raise CLIPConversionError(
            error.source, error.missing, error.mismatched, error.unexpected, f"{where}; config from {source}"
        ) from None
    return CLIPWeights(ours, cfg, "open_clip", weights_path, source)


def load_clip_image_embedder(
    path: str | os.PathLike,
    layout: ClipLayout = "auto",
    config: CLIPImageEmbedderConfig | Mapping[str, Any] | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> CLIPImageEmbedder:
    """A :class:`CLIPImageEmbedder` with the weights of a LOCAL folder or file (see :func:`read_clip_image_embedder`
    for the arguments and errors), loaded strictly, its tensors in ``dtype`` (SVD's files are float16; the default
    computes in float32). Built on the meta device and filled by assignment, so the weights are held once."""
    weights = read_clip_image_embedder(path, layout=layout, config=config)
    with torch.device("meta"):
        model = CLIPImageEmbedder(weights.config)
    tensors = {k: v.to(dtype) for k, v in weights.state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{weights.weights_path}: tensors left unloaded: {left}")
    return model


class PretrainedCLIPImageEmbedder(CLIPImageEmbedder):
    """A :class:`CLIPImageEmbedder` whose weights come from a LOCAL file or folder, read when it is constructed,
    so a recipe can name it by ``class_path`` and a missing file fails before training.

    Args: as :func:`read_clip_image_embedder` (``path``, ``layout``, ``config``).

    Attributes:
        weights_path: absolute path of the weights file read.
        layout: the layout read (``"transformers"`` or ``"open_clip"``).
        weights_sha256: hex SHA-256 of that file (checkpoints record it instead of storing the weights).
        config_file: absolute path of the ``config.json`` the config was read from (transformers layout), else None.
        config_file_content: that file's JSON object as read at construction (checkpoints record and check it).
    """

    def __init__(
        self,
        path: str,
        layout: ClipLayout = "auto",
        config: CLIPImageEmbedderConfig | str | None = None,
    ) -> None:
        weights = read_clip_image_embedder(path, layout=layout, config=config)
        super().__init__(weights.config)
        self.load_state_dict(weights.state_dict, strict=True)
        self.weights_path: str = str(weights.weights_path)
        self.layout: str = weights.layout
        self.weights_sha256: str = file_sha256(weights.weights_path)
        self.config_file: str | None = str(weights.config_file) if weights.config_file is not None else None
        self.config_file_content: dict[str, Any] | None = weights.config_file_content
