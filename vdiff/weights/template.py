"""The template every weights reader follows (autoencoder, UNet-SVD, CLIP, VDT, Vista, inflation, I3D): where the
weights are, which layout they are in, which config they fit, and a strict mapping of their keys onto the model's.

- **Where** (:func:`resolve_source`, :func:`model_folder`): a path, hub id or ``$VDIFF_WEIGHTS`` name resolved to a
  file or a model folder (``config.json`` + weights, or a pipeline folder holding one under a subfolder).
- **Which layout** (:func:`detect_layout`): a vdiff file by the config in its metadata, else the first layout
  whose sign one of the file's keys shows; none is an error naming the file.
- **Which config** (:func:`resolve_config`, :func:`read_config_json`, :func:`check_same`): a config dataclass from
  an instance, a preset name, a mapping of its fields or a ``.json`` file; a passed config may only agree with
  the one the weights come with, field by field.
- **Strict key mapping** (:class:`Rule`, :class:`KeyMapper`, :func:`map_keys`): each model key is made from one or
  more source tensors by a rule (renamed, stacked on dim 0, reshaped, combined); every missing, mis-shaped and
  unused source key is collected and raised at once as one :class:`~vdiff.weights.errors.KeyMappingError`
  naming the file and the keys.
- **What was read, built, written** (:class:`WeightsRead`, :func:`record_weights`, :func:`build_loaded`,
  :func:`save_weights`): the state dict with its config and sources; a model built on the meta device and filled
  by assignment (the weights held once); the vdiff / diffusers / sgm writers' one shape.

The readers keep their own name maps and file formats; this module knows no model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from vdiff.weights.errors import KeyMappingError, WeightsConfigError, WeightsError
from vdiff.weights.safetensors_io import file_sha256, resolve_weights_path, save_state_dict

VDIFF_CONFIG_KEY = "vdiff_config"  # safetensors metadata key of a vdiff file's config
CONFIG_FILE = "config.json"  # a diffusers / transformers model folder's config
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what a diffusers model folder's weights are written as
CONTRADICTS = "the config passed contradicts the one stored with the weights (pass config=None to use it)"

LoadLayout = Literal["auto", "vdiff", "diffusers", "sgm"]  # the layouts of a model with vdiff, diffusers, sgm files
SaveLayout = Literal["vdiff", "diffusers", "sgm"]
LAYOUTS = ("auto", "vdiff", "diffusers", "sgm")
Config = TypeVar("Config")
Shape = tuple[int, ...]


#################################################################################
#                                 Configs                                       #
#################################################################################


def read_config_json(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The JSON object of a ``kind`` (``diffusers``, ``transformers``, ``vdiff``...) config file, as stored; an
    unreadable file or another JSON value is a :class:`WeightsConfigError` naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsConfigError(f"{path}: not a readable {kind} config ({error})") from None
    if not isinstance(raw, dict):
        raise WeightsConfigError(f"{path}: a {kind} config holds a JSON object, got {type(raw).__name__}")
    return raw


def resolve_config(cls: type[Config], config: Config | Mapping[str, Any] | str | os.PathLike | None) -> Config | None:
    """A ``cls`` config dataclass (with ``from_name`` / ``from_dict``) from ``config``: an instance (as is), a preset
    name, a mapping of its fields, or a ``.json`` file holding that mapping (what ``to_dict`` writes; errors name
    the file); None stays None."""
    if config is None or isinstance(config, cls):
        return config
    if isinstance(config, os.PathLike) or (isinstance(config, str) and config.endswith(".json")):
        try:
            return cls.from_dict(read_config_json(config, "vdiff"))  # type: ignore[attr-defined]
        except (TypeError, ValueError) as error:
            if isinstance(error, WeightsConfigError):
                raise
            raise WeightsConfigError(f"{os.fspath(config)}: not a valid {cls.__name__} ({error})") from None
    if isinstance(config, str):
        return cls.from_name(config)  # type: ignore[attr-defined]
    if isinstance(config, Mapping):
        return cls.from_dict(dict(config))  # type: ignore[attr-defined]
    raise TypeError(
        f"config must be a {cls.__name__}, a preset name, a mapping of its fields or a .json file, "
        f"got {type(config).__name__}"
    )


def config_refusal(
    config: Mapping[str, Any], source: str, action: str = "be loaded by vdiff"
) -> Callable[[str, str], WeightsConfigError]:
    """``refuse(field, why)``: the error for a field of a ``config.json`` (``config``, read from ``source``) that vdiff
    cannot take, naming the file, the field and its value."""

    def refuse(field: str, why: str) -> WeightsConfigError:
        return WeightsConfigError(f"{source}: {field}={config.get(field, '<missing>')!r} cannot {action}: {why}")

    return refuse


def check_known_fields(
    config: Mapping[str, Any], known: Iterable[str], source: str, kind: str, action: str = "load"
) -> None:
    """Refuse a ``kind`` ``config.json`` with fields (other than ``_private`` ones) outside ``known``: vdiff does not
    know what they change."""
    known = set(known)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise WeightsConfigError(
            f"{source}: unknown {kind} field(s) {unknown}; vdiff does not know what they change, so it does not "
            f"{action} the model (known fields: {sorted(known)})"
        )


def metadata_config(cls: type[Config], metadata: Mapping[str, str], path: str | os.PathLike) -> tuple[Config, str] | None:
    """``(config, source)`` of the config a vdiff file at ``path`` stores in its ``metadata``, or None."""
    stored = metadata.get(VDIFF_CONFIG_KEY)
    if stored is None:
        return None
    return cls.from_dict(json.loads(stored)), f"{path} metadata"  # type: ignore[attr-defined]


def config_beside(weights_path: Path, stem: str = "") -> Path | None:
    """The ``config.json`` beside a bare weights file whose name starts with ``stem`` (a model folder's file), or
    None."""
    beside = weights_path.parent / CONFIG_FILE
    return beside if weights_path.name.startswith(stem) and beside.is_file() else None


def check_same(
    given: Any,
    found: Any,
    source: str,
    ignore: Iterable[str] = (),
    only: Iterable[str] | None = None,
    heading: str = CONTRADICTS,
    verb: str = "says",
) -> None:
    """Raise :class:`WeightsConfigError` naming every field where the config ``given`` contradicts the one ``found``
    with the weights (``source`` names where), except the fields in ``ignore`` (and outside ``only``, if given)."""
    skip, keep = set(ignore), None if only is None else set(only)
    diff = [
        f"{f.name}: passed {getattr(given, f.name)!r}, {source} {verb} {getattr(found, f.name)!r}"
        for f in dataclasses.fields(given)
        if f.name not in skip and (keep is None or f.name in keep) and getattr(given, f.name) != getattr(found, f.name)
    ]
    if diff:
        raise WeightsConfigError(heading + ":\n  " + "\n  ".join(diff))


def agreed_config(given: Config | None, found: Config, source: str, kept: Iterable[str] = ()) -> Config:
    """The config the weights come with (``found``, from ``source``) with the passed one's ``kept`` fields (those the
    weights do not fix); every other field of ``given`` must agree (:func:`check_same`). No ``given``: ``found``."""
    if given is None:
        return found
    kept = tuple(kept)
    check_same(given, found, source, ignore=kept)
    return dataclasses.replace(found, **{name: getattr(given, name) for name in kept})  # type: ignore[type-var]


#################################################################################
#                              Files, folders, layouts                          #
#################################################################################


def resolve_source(
    path: str | os.PathLike, layout: str, layouts: Sequence[str], what: str, folder_layout: str = "diffusers"
) -> Path:
    """The absolute file or model folder ``path`` names (a hub id is fetched, ``$VDIFF_WEIGHTS`` looked in; a
    missing one is a FileNotFoundError naming ``what`` and the places tried), after checking ``layout`` is one of
    ``layouts`` and that a folder is read as ``auto`` or ``folder_layout``."""
    if layout not in layouts:
        raise ValueError(f"unknown weights layout {layout!r}; choose one of {tuple(layouts)}")
    resolved = resolve_weights_path(path, what=what, allow_dir=True).absolute()
    if resolved.is_dir() and layout not in ("auto", folder_layout):
        raise ValueError(f"{resolved} is a folder, read as a {folder_layout} model folder; layout={layout!r} is for files")
    return resolved


def model_folder(folder: Path, subfolder: str, weights: Sequence[str], what: str) -> tuple[Path, Path]:
    """``(config.json, weights file)`` of a model folder, or of its ``subfolder`` (a pipeline folder): the first of
    ``weights`` present. FileNotFoundError naming the folder and what it lacks otherwise."""
    model = folder
    if not (folder / CONFIG_FILE).is_file() and (folder / subfolder / CONFIG_FILE).is_file():
        model = folder / subfolder
    if not (model / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a {what} folder: no {CONFIG_FILE} in it or in {folder / subfolder}")
    for name in weights:
        if (model / name).is_file():
            return model / CONFIG_FILE, model / name
    present = sorted(p.name for p in model.iterdir())
    raise FileNotFoundError(
        f"{model}: no weights file beside {CONFIG_FILE} (looked for {', '.join(weights)}; found: {present}); for "
        "another variant, rename it or pass the file with its config"
    )


Sign = tuple[str, Callable[[str], bool]]  # (layout, whether a key is one of that layout's)


def detect_layout(
    keys: Iterable[str], path: str | os.PathLike, signs: Sequence[Sign], what: str, metadata: Mapping[str, str] | None = None
) -> str:
    """The layout of a weights file: ``vdiff`` when its ``metadata`` holds a vdiff config, else the first layout of
    ``signs`` that one of its ``keys`` shows. None: a :class:`WeightsError` naming the file, the layouts looked for
    and the first keys."""
    if metadata is not None and VDIFF_CONFIG_KEY in metadata:
        return "vdiff"
    keys = list(keys)
    for layout, sign in signs:
        if any(sign(k) for k in keys):
            return layout
    layouts = list(dict.fromkeys((["vdiff"] if metadata is not None else []) + [layout for layout, _ in signs]))
    either = " or ".join([", ".join(layouts[:-1]), layouts[-1]] if len(layouts) > 1 else layouts)
    raise WeightsError(
        f"{path}: holds no {what} keys vdiff knows, so vdiff cannot tell whether it holds {either} weights (first "
        f"keys: {keys[:5]})"
    )


#################################################################################
#                               Strict key mapping                              #
#################################################################################


@dataclass(frozen=True)
class Rule:
    """How one model tensor is made from the source's: the source ``names`` and the ``shapes`` they must have, and
    how they are ``combine``\\ d (default: the one tensor, or several stacked on dim 0). ``squeeze``: a source
    tensor whose shape differs from the expected one only by trailing 1s (a 1x1 conv for a Linear) is reshaped."""

    names: tuple[str, ...]
    shapes: tuple[Shape, ...]
    combine: Callable[[list[Tensor]], Tensor] | None = None
    squeeze: bool = False


def stacked(names: Sequence[str], shape: Shape, squeeze: bool = False) -> Rule:
    """The rule of a model tensor of ``shape`` that is the source tensors ``names`` stacked on dim 0 in equal parts
    (one name: the tensor itself, renamed)."""
    part = (shape[0] // len(names), *shape[1:])
    return Rule(tuple(names), (part,) * len(names), squeeze=squeeze)


@dataclass(frozen=True)
class Wording:
    """How a reader words one missing and one mis-shaped source key. Format fields: ``name`` (the source key),
    ``key`` and ``shape`` (the model's), ``got`` (the source tensor's shape), ``want`` (the shape expected of it),
    ``wants`` (every part's expected shape, for stacked tensors); shapes as Python ``list`` or ``tuple``."""

    missing: str = "{name}  (vdiff {key})"
    mismatch: str = "{name}: {got}, expected {want} (vdiff {key})"
    shapes: Literal["list", "tuple"] = "tuple"

    def shape(self, shape: Sequence[int]) -> str:
        return str(list(shape) if self.shapes == "list" else tuple(shape))


def _squeezed(shape: Shape) -> Shape:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


class KeyMapper:
    """Strict mapping of one source (a ``{name: tensor}`` mapping; one with a ``shape(name)`` method is asked for
    shapes without reading the tensors) onto model keys: :meth:`take` makes each model tensor by its rule,
    recording what is missing or mis-shaped; :meth:`expect_constant` checks a source tensor that carries no weight;
    :meth:`check` raises one :class:`KeyMappingError` for every problem, unused source keys included.

    where: the file (or state dict) named in the error; target: what the tensors must fit (``"the UNet-SVD
    config"``); prefix: prepended to every rule name (the model part's keys in a whole-model file).
    """

    def __init__(
        self,
        source: Mapping[str, Tensor],
        where: str,
        target: str,
        wording: Wording = Wording(),
        prefix: str = "",
    ) -> None:
        self.source, self.where, self.target, self.wording, self.prefix = source, where, target, wording, prefix
        self.missing: list[str] = []
        self.mismatched: list[str] = []
        self.claimed: dict[str, str] = {}  # source name -> the model key it was read for
        self.twice: list[str] = []
        shape = getattr(source, "shape", None)
        self._shape: Callable[[str], Shape] = shape if callable(shape) else (lambda n: tuple(source[n].shape))

    def take(self, key: str, shape: Shape, rule: Rule) -> Tensor | None:
        """The model tensor ``key`` of ``shape`` made by ``rule``, or None (its problems recorded)."""
        fmt = self.wording.shape
        names = [self.prefix + n for n in rule.names]
        for name in names:
            if name not in self.source:
                self.missing.append(self.wording.missing.format(name=name, key=key, shape=fmt(shape)))
            elif self.claimed.setdefault(name, key) != key:
                self.twice.append(f"{name} (read for both {self.claimed[name]} and {key})")
        if any(n not in self.source for n in names):
            return None
        got = [self._shape(n) for n in names]
        fits = [
            g == w or (rule.squeeze and _squeezed(g) == _squeezed(w) and math.prod(g) == math.prod(w))
            for g, w in zip(got, rule.shapes)
        ]
        if not all(fits):
            wants = ", ".join(fmt(w) for w in rule.shapes)
            self.mismatched.extend(
                self.wording.mismatch.format(name=n, key=key, shape=fmt(shape), got=fmt(g), want=fmt(w), wants=wants)
                for n, g, w, ok in zip(names, got, rule.shapes, fits)
                if not ok
            )
            return None
        tensors = [self.source[n] for n in names]
        tensors = [t if tuple(t.shape) == w else t.reshape(w) for t, w in zip(tensors, rule.shapes)]
        if rule.combine is not None:
            return rule.combine(tensors).contiguous()
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)

    def expect_constant(self, name: str, value: Tensor, description: str) -> None:
        """A source tensor ``name`` that carries no weight: if present it must equal ``value`` (else the problem is
        recorded as ``"{name}: must be {description}"``)."""
        if name not in self.source:
            return
        self.claimed.setdefault(name, name)
        tensor = self.source[name]
        if tuple(tensor.shape) != tuple(value.shape) or not torch.equal(tensor.to(value.dtype), value):
            self.mismatched.append(f"{name}: must be {description}")

    def check(self, scope: Iterable[str] | None = None, hint: str = "", **error: Any) -> None:
        """Raise :class:`KeyMappingError` listing every problem: missing and mis-shaped keys, and the keys of
        ``scope`` (default: every source key under the prefix) that no rule read. ``error``: the error's
        ``subject`` / ``compact``."""
        keys = scope if scope is not None else (k for k in self.source if k.startswith(self.prefix))
        unexpected = sorted(k for k in keys if k not in self.claimed) + self.twice
        if self.missing or self.mismatched or unexpected:
            raise KeyMappingError(self.where, self.missing, self.mismatched, unexpected, hint, self.target, **error)


def map_keys(
    source: Mapping[str, Tensor],
    targets: Mapping[str, Shape],
    rule_of: Callable[[str, Shape], Rule],
    where: str,
    target: str,
    wording: Wording = Wording(),
    prefix: str = "",
    scope: Iterable[str] | None = None,
    hint: str = "",
    **error: Any,
) -> dict[str, Tensor]:
    """The model state dict ``{key: tensor}`` for every key and shape of ``targets``, each made from ``source``
    by ``rule_of(key, shape)`` (see :class:`KeyMapper`); one :class:`KeyMappingError` for every problem (``error``:
    its ``subject`` / ``compact``)."""
    mapper = KeyMapper(source, where, target, wording, prefix)
    out = {key: mapper.take(key, shape, rule_of(key, shape)) for key, shape in targets.items()}
    mapper.check(scope, hint, **error)
    return out  # type: ignore[return-value]  # check() raised if any is None


#################################################################################
#                      What was read; building and writing                      #
#################################################################################


@dataclass
class WeightsRead:
    """What a reader found: the state dict in the model's names, the config it fits, and where both came from."""

    state_dict: dict[str, Tensor]
    config: Any
    layout: str  # the file layout read (never "auto")
    weights_path: Path  # absolute path of the weights file read (the index of sharded weights)
    config_source: str  # where the config came from: a config.json path, "<file> metadata", "argument", a preset...
    config_file: Path | None = None  # the config.json the config was read from (None: metadata, argument, preset)
    config_file_content: dict[str, Any] | None = None  # that file's JSON object, as read


def record_weights(module: torch.nn.Module, weights: WeightsRead) -> None:
    """Give a module built from ``weights`` the attributes checkpoints record of its file: ``weights_path``,
    ``layout``, ``weights_sha256`` (hashed now), ``config_file`` and ``config_file_content``."""
    module.weights_path = str(weights.weights_path)
    module.layout = weights.layout
    module.weights_sha256 = file_sha256(weights.weights_path)
    module.config_file = str(weights.config_file) if weights.config_file is not None else None
    module.config_file_content = weights.config_file_content


def build_loaded(
    build: Callable[[Any], torch.nn.Module],
    config: Any,
    state_dict: Mapping[str, Tensor],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """``build(config)`` made on the meta device and filled by assignment with ``state_dict`` (strictly; floating
    tensors cast to ``dtype`` and every tensor moved to ``device``, where given), so the weights are held once; in
    train mode, as built."""
    with torch.device("meta"):
        model = build(config)
    state = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
             for k, v in state_dict.items()}  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: tensors left unloaded: {left}")
    return model


def write_model_folder(folder: Path, config_json: Mapping[str, Any], tensors: Mapping[str, Tensor], weights: str) -> Path:
    """A diffusers / transformers model folder: ``config.json`` and the ``weights`` file; returns the weights path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    save_state_dict(dict(tensors), folder / weights)
    return folder / weights


def save_weights(
    path: str | os.PathLike,
    layout: str,
    what: str,
    config: Any,
    state_dict: Mapping[str, Tensor],
    diffusers: Callable[[], tuple[Mapping[str, Any], Mapping[str, Tensor]]],
    sgm: Callable[[], Mapping[str, Tensor]],
) -> Path:
    """Write a model's weights in ``layout``; returns the weights file written.

    ``vdiff``: one ``.safetensors`` file, ``config.to_dict()`` in its metadata (reloads with no config);
    ``diffusers``: a model folder (``diffusers()`` gives its ``config.json`` and tensors); ``sgm``: one file of
    ``sgm()``'s tensors. Every conversion runs (and refuses) before anything is written.
    """
    path = Path(path)
    if layout == "vdiff":
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: a vdiff {what} file is .safetensors (its config lives in the metadata)")
        save_state_dict(dict(state_dict), path, metadata={VDIFF_CONFIG_KEY: json.dumps(config.to_dict())})
        return path
    if layout == "diffusers":
        if path.suffix:
            raise ValueError(f"{path}: the diffusers layout is a folder (config.json + weights); give a folder path")
        config_json, tensors = diffusers()
        return write_model_folder(path, config_json, tensors, DIFFUSERS_WEIGHTS_FILE)
    if layout == "sgm":
        save_state_dict(dict(sgm()), path)
        return path
    raise ValueError(f"unknown weights layout {layout!r}; choose 'vdiff', 'diffusers' or 'sgm'")


def model_shapes(build: Callable[..., torch.nn.Module], *args: Any) -> dict[str, Shape]:
    """``{name: shape}`` of the state dict of ``build(*args)``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build(*args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


__all__ = [
    "CONFIG_FILE",
    "DIFFUSERS_WEIGHTS_FILE",
    "LAYOUTS",
    "LoadLayout",
    "SaveLayout",
    "VDIFF_CONFIG_KEY",
    "KeyMapper",
    "Rule",
    "Wording",
    "agreed_config",
    "build_loaded",
    "WeightsRead",
    "check_known_fields",
    "check_same",
    "config_beside",
    "config_refusal",
    "detect_layout",
    "map_keys",
    "metadata_config",
    "model_folder",
    "model_shapes",
    "read_config_json",
    "record_weights",
    "resolve_config",
    "resolve_source",
    "save_weights",
    "stacked",
    "write_model_folder",
]
