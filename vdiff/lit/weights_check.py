"""Every weights file a recipe names, looked up before anything is built, and all missing ones named at once.

A recipe for SVD or Vista names three to five files (the network's ``net_weights``, the image encoder's and the
autoencoder's ``path``, metric networks' ``fvd_weights`` ...). Built one by one, the first missing file stops the run
and the user learns of the next only after fetching it. :func:`check_recipe_weights` finds every weights path in a
parsed recipe (:func:`recipe_weight_paths`) and resolves each one the way its loader will
(:func:`vdiff.weights.safetensors_io.resolve_weights_path`: a local path, ``$VDIFF_WEIGHTS``, a downloadable preset, a
``hf://`` hub id fetched into the hub cache), then raises one error naming every file that is not there
(:func:`vdiff.weights.safetensors_io.gather_missing_files`). Hub ids are fetched here rather than while the network
is built, which changes nothing else: the loaders find them in the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from vdiff.weights.safetensors_io import MissingWeightsError, gather_missing_files, resolve_weights_path

WEIGHTS_PACKAGE = "vdiff.weights."
README_NOTE = 'README section "Pretrained weights" says where each file comes from.'


def is_weights_key(key: str, class_path: str | None) -> bool:
    """Whether an init argument called ``key`` (of the class ``class_path``, if known) holds a weights path:
    ``net_weights``/``fvd_weights``/... (a name ending in ``weights``), ``pretrained``, or ``path`` of a class in
    :mod:`vdiff.weights` (``PretrainedAutoencoder``, ``PretrainedCLIPImageEmbedder`` ...)."""
    if key.endswith("weights") or key == "pretrained":
        return True
    return key == "path" and class_path is not None and class_path.startswith(WEIGHTS_PACKAGE)


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace as a dict (recursively through lists); anything else as it is."""
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


def recipe_weight_paths(config: Any, prefix: str = "", class_path: str | None = None) -> Iterator[tuple[str, str]]:
    """``(option, path)`` for every weights path in a parsed recipe (a mapping or a jsonargparse Namespace), in
    order; ``option`` is the dotted key a user would set (``model.init_args.autoencoder.init_args.path``).
    Hub ids (``hf://...``) count under any key. ``class_path``: the class whose ``init_args`` ``config`` is."""
    config = _plain(config)
    if isinstance(config, Mapping):
        own = config.get("class_path") if isinstance(config.get("class_path"), str) else None
        for key, value in config.items():
            option = f"{prefix}.{key}" if prefix else str(key)
            value = _plain(value)
            if isinstance(value, str):
                if value.startswith("hf://") or is_weights_key(str(key), class_path):
                    yield option, value
            else:
                yield from recipe_weight_paths(value, option, own if key == "init_args" else None)
    elif isinstance(config, (list, tuple)):
        for index, value in enumerate(config):
            if isinstance(value, str) and value.startswith("hf://"):
                yield f"{prefix}[{index}]", value
            else:
                yield from recipe_weight_paths(value, f"{prefix}[{index}]")


def check_recipe_weights(config: Any) -> None:
    """Resolve every weights path of a parsed recipe (downloading hub ids and presets not cached yet); raise one
    FileNotFoundError naming every missing file (its option and the places tried) when any is missing."""
    paths = list(dict.fromkeys(recipe_weight_paths(config)))
    try:
        gather_missing_files([
            (lambda option=option, path=path: resolve_weights_path(path, what=option, allow_dir=True))
            for option, path in paths
        ])
    except MissingWeightsError as err:  # one file: its own message, with where the presets come from
        if err.note:
            raise
        raise MissingWeightsError(err.what, err.tried, README_NOTE, err.advice) from None
    except FileNotFoundError as err:  # several, or one not cached while offline: the message, then the README note
        if len(err.args) != 1 or not isinstance(err.args[0], str):
            raise
        text = err.args[0].rstrip()
        raise type(err)(f"{text}{'' if text.endswith('.') else '.'} {README_NOTE}") from None
