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

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.models.conditioners import CLIPImageEmbedder, CLIPImageEmbedderConfig
from vdiff.weights.errors import KeyMappingError, WeightsConfigError
from vdiff.weights.safetensors_io import load_state_dict
from vdiff.weights.template import (
    KeyMapper,
    Rule,
    WeightsRead,
    Wording,
    agreed_config,
    build_loaded,
    check_known_fields,
    config_refusal,
    detect_layout,
    map_keys,
    model_folder,
    model_shapes,
    read_config_json,
    record_weights,
    resolve_config,
    resolve_source,
)

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
_TRANSFORMERS_IGNORED = {  # (and every _private field)
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


CLIPConfigError = WeightsConfigError  # a config vdiff cannot represent, or contradicting configs
CLIPConversionError = KeyMappingError  # missing, mis-shaped and unused keys, by name
TARGET = "the CLIP image embedder config"
WORDING = Wording(missing="{name}  (vdiff {key}, shape {shape})",
                  mismatch="{name} {got}: expected {wants} (vdiff {key}, shape {shape})", shapes="list")  # fmt: skip
# The key signs of each file layout, in the order they are tried.
SIGNS = (
    ("transformers", lambda k: k.startswith("vision_model.") or k == "visual_projection.weight"),
    ("open_clip", lambda k: _open_clip_prefix([k]) is not None),
)


# ----------------------------------------------------------------------------- transformers config.json


def config_from_transformers(config: Mapping[str, Any], source: str = "config") -> CLIPImageEmbedderConfig:
    """A transformers ``CLIPVisionConfig`` of a ``CLIPVisionModelWithProjection`` (``config.json`` as a dict) ->
    the :class:`CLIPImageEmbedderConfig` that computes the same thing.

    Raises:
        CLIPConfigError: naming ``source`` and the field, for another ``model_type`` / ``architectures``, an unknown
            field, an activation other than ``gelu`` / ``quick_gelu``, a non-square image or patch size,
            ``num_channels`` other than 3, non-zero dropout, or sizes the model cannot have.
    """

    refuse = config_refusal(config, source)
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
    check_known_fields(config, known, source, "CLIPVisionConfig")
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


def read_transformers_config(path: str | os.PathLike) -> CLIPImageEmbedderConfig:
    """:func:`config_from_transformers` of a ``config.json`` file (errors name the file)."""
    return config_from_transformers(read_config_json(path, "transformers"), source=str(path))


# ----------------------------------------------------------------------------- name maps


def _same(name: str, shape: tuple[int, ...]) -> Rule:
    return Rule((name,), (shape,), lambda ts: ts[0])


def _unflatten(name: str, shape: tuple[int, ...], lead: int) -> Rule:  # (W,) -> (1, 1, W); (N, W) -> (1, N, W)
    return Rule((name,), (shape[lead:],), lambda ts: ts[0].reshape(shape))


def _transposed(name: str, shape: tuple[int, ...]) -> Rule:  # open_clip's proj (W, D) -> Linear weight (D, W)
    return Rule((name,), (shape[::-1],), lambda ts: ts[0].t())


def _qkv(names: tuple[str, str, str], shape: tuple[int, ...]) -> Rule:  # separate q, k, v -> fused qkv
    part = (shape[0] // 3, *shape[1:])
    return Rule(names, (part, part, part), lambda ts: torch.cat(ts, dim=0))


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


def _open_clip_rule(key: str, shape: tuple[int, ...], prefix: str) -> Rule:
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


def _transformers_rule(key: str, shape: tuple[int, ...], prefix: str = "") -> Rule:
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
    return model_shapes(CLIPImageEmbedder, config)


def from_open_clip(
    state_dict: Mapping[str, Tensor],
    config: CLIPImageEmbedderConfig,
    prefix: str = OPEN_CLIP_PREFIX,
    source: str = "open_clip weights",
) -> dict[str, Tensor]:
    """open_clip image-tower keys under ``prefix`` -> our names (keys outside ``prefix`` are skipped)."""
    rule = lambda key, shape: _open_clip_rule(key, shape, "")  # noqa: E731  # the mapper adds the prefix
    return map_keys(state_dict, target_shapes(config), rule, source, TARGET, WORDING, prefix=prefix)


def from_transformers(
    state_dict: Mapping[str, Tensor], config: CLIPImageEmbedderConfig, source: str = "transformers weights"
) -> dict[str, Tensor]:
    """``CLIPVisionModelWithProjection`` keys -> our names (every key is in scope; transformers' ``position_ids``
    buffer, when stored, must be ``arange(N+1)``)."""
    mapper = KeyMapper(state_dict, source, TARGET, WORDING)
    out = {key: mapper.take(key, shape, _transformers_rule(key, shape)) for key, shape in target_shapes(config).items()}
    position_ids = torch.arange(config.num_positions).unsqueeze(0)
    mapper.expect_constant(TRANSFORMERS_POSITION_IDS, position_ids, f"arange({config.num_positions}) of shape "
                           f"{list(position_ids.shape)}")  # fmt: skip
    mapper.check()
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- reading


CLIPWeights = WeightsRead  # what read_clip_image_embedder found (config_source "svd: <name>" / "assumed: <name>")


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
        config: the architecture (a :class:`CLIPImageEmbedderConfig`, a mapping of its fields, a ``.json`` file of
            them or a name of ``CLIP_IMAGE_CONFIGS``). Where the weights come with a ``config.json`` that one is used and a
            contradicting ``config`` is an error; for open_clip files it is the only source of the head count and
            the activation (see the module docstring for what is assumed without it).

    Raises:
        FileNotFoundError: nothing at ``path`` (nor under ``$VDIFF_WEIGHTS``: the error names both), or a folder
            without weights.
        CLIPConfigError: a config vdiff cannot represent, contradicting configs, or a transformers file without a
            config (names the file and the field).
        CLIPConversionError: missing, mis-shaped or unused tensors (names the keys and the file).
    """
    given = resolve_config(CLIPImageEmbedderConfig, config)
    resolved = resolve_source(path, layout, CLIP_LAYOUTS, f"CLIP image-embedder weights ({layout} layout)",
                              folder_layout="transformers")  # fmt: skip

    found: CLIPImageEmbedderConfig | None = None
    source = "argument"
    if resolved.is_dir():
        weights = (TRANSFORMERS_WEIGHTS[0], TRANSFORMERS_INDEX, *TRANSFORMERS_WEIGHTS[1:])
        config_json, weights_path = model_folder(resolved, TRANSFORMERS_SUBFOLDER, weights,
                                                 "transformers CLIP image-encoder")  # fmt: skip
        layout = "transformers"
    else:
        weights_path = resolved
        config_json = weights_path.parent / TRANSFORMERS_CONFIG
    state_dict = load_state_dict(weights_path)
    if layout == "auto":
        layout = detect_layout(state_dict, weights_path, SIGNS, "CLIP image-tower")

    if layout == "transformers":
        content = read_config_json(config_json, "transformers") if config_json.is_file() else None
        if content is not None:
            found, source = config_from_transformers(content, source=str(config_json)), str(config_json)
        cfg = agreed_config(given, found, source) if found is not None else given
        if cfg is None:
            raise CLIPConfigError(
                f"{weights_path}: transformers weights without a {TRANSFORMERS_CONFIG} beside them: load the folder "
                "with its config.json, or pass config= (a CLIPImageEmbedderConfig or a size name)"
            )
        try:
            ours = from_transformers(state_dict, cfg, source=f"transformers file {weights_path}")
        except CLIPConversionError as error:
            raise error.with_context(error.source, f"config from {source}") from None
        return CLIPWeights(ours, cfg, layout, weights_path, source, config_json if content is not None else None, content)

    prefix = _open_clip_prefix(list(state_dict))
    if prefix is None:
        raise CLIPConversionError(f"open_clip file {weights_path}",
                                  [f"{OPEN_CLIP_PREFIX}conv1.weight (or under {SGM_CLIP_PREFIX})"], [], [], target=TARGET)  # fmt: skip
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
        raise error.with_context(error.source, f"{where}; config from {source}") from None
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
    return build_loaded(CLIPImageEmbedder, weights.config, weights.state_dict, dtype)


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
        record_weights(self, weights)
