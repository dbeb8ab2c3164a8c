"""Where a diffusion module's frozen autoencoder comes from, recorded in checkpoints and restored.

A latent diffusion checkpoint needs its autoencoder to sample, but the autoencoder is frozen and
usually read from a weights file (SD-VAE: 335 MB), so storing it in every checkpoint wastes disk
and hides which file it was. :func:`describe_autoencoder` records the architecture and, for an
autoencoder loaded from a file (it has ``weights_path``, ``layout`` and ``weights_sha256``, as
:class:`vdiff.weights.pretrained.PretrainedAutoencoder` does), the file and its sha256;
:func:`restore_autoencoder` reloads it from that file and refuses a file that changed or is missing.
An autoencoder that has no file (trained in the same run, built in a test) keeps its weights in the
checkpoint's state dict, and only its architecture is recorded.

The same record serves every frozen, file-backed part (SVD's image encoder too): :func:`describe_weights_file`
writes it, :func:`find_recorded_weights` finds the file again (also under ``$VDIFF_WEIGHTS``), and the config
the part was built with is checked with the weights: the part's config (:func:`check_part_config`, when a
recipe gives the part again on resume) and the ``config.json`` it was read from, recorded as
``config_file: {"path", "content"}`` (None when the config came from elsewhere: a vdiff file's metadata, which
its sha256 covers, or the arguments, which ``config`` records). An edited ``config.json`` beside unchanged weights
is refused on resume and on load (:func:`check_recorded_config_file`), naming the file and each changed key.
Checkpoints written before the config file was recorded load with a warning that it cannot be checked.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from torch import nn

from vdiff.models.autoencoder import AutoencoderConfig, IdentityAutoencoder, VideoAutoencoder

CONFIG_FILE = "config_file"  # in a file-backed part's entry: {"path", "content"} of the config.json read, or None


def describe_weights_file(part: nn.Module) -> dict[str, Any]:
    """``path``, ``layout`` and ``sha256`` of a frozen part read from a weights file (it has ``weights_path``,
    ``layout`` and ``weights_sha256``, as the ``Pretrained*`` classes of :mod:`vdiff.weights` do), and
    ``config_file``: the ``config.json`` its config was read from and that file's JSON object, or None."""
    config_file = getattr(part, "config_file", None)
    return {
        "path": str(part.weights_path),
        "layout": str(getattr(part, "layout", "vdiff")),
        "sha256": str(part.weights_sha256),
        CONFIG_FILE: {"path": str(config_file), "content": part.config_file_content} if config_file else None,
    }


def describe_autoencoder(autoencoder: VideoAutoencoder) -> dict[str, Any]:
    """``{"config": ...}`` plus ``path``, ``layout``, ``sha256`` and ``config_file`` when it was loaded from a file."""
    entry: dict[str, Any] = {"config": autoencoder.config.to_dict()}
    if getattr(autoencoder, "weights_sha256", None) and getattr(autoencoder, "weights_path", None):
        entry.update(describe_weights_file(autoencoder))
    return entry


def config_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key (nested ones dotted) whose value differs between two configs, leaving out
    provenance that changes nothing computed (``*_version``, ``_name_or_path``: written by whatever saved the file)."""

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not str(key).endswith(("_version", "_name_or_path")):
                    out.update(flat(item, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: value}

    old, new = flat(json.loads(json.dumps(recorded))), flat(json.loads(json.dumps(now)))  # tuples -> lists
    missing = "(absent)"
    return [f"{key}: {json.dumps(old.get(key, missing))} -> {json.dumps(new.get(key, missing))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, missing) != new.get(key, missing)]


def check_config_file(entry: dict[str, Any], path: str | None, content: dict[str, Any] | None, what: str) -> None:
    """The config file a frozen part read (``path`` and its JSON ``content``; None: its config came from no file)
    against the one the checkpoint recorded; raises ``ValueError`` naming the file and the changed keys. An entry
    written before configs were recorded (no ``config_file``) is accepted with a warning when there is a file."""
    if CONFIG_FILE not in entry:
        if path is not None:
            warnings.warn(
                f"{path}: this checkpoint was written before vdiff recorded the config of its {what}, so a change to "
                "this file cannot be detected; the next checkpoint of a resumed run records it",
                stacklevel=3,
            )
        return
    recorded = entry[CONFIG_FILE]
    if recorded is None and path is None:
        return
    if recorded is None:
        raise ValueError(
            f"{path}: the {what} now reads its config from this file, but the checkpoint was trained with the config "
            f"of {entry['path']} without it; remove the file or start a new run"
        )
    if path is None:
        raise ValueError(
            f"{recorded['path']}: the {what} config file this checkpoint was trained with is missing beside "
            f"{entry['path']}; put it back"
        )
    changes = config_changes(recorded["content"], content or {})
    if changes:
        raise ValueError(
            f"{path}: the {what} config changed since the checkpoint was written ({'; '.join(changes)}); the weights "
            "are the same file, so restore the config this checkpoint was trained with or start a new run"
        )


def recorded_config_file_now(entry: dict[str, Any], weights_path: str) -> str | None:
    """Where the recorded config file is now: the file of the same name beside ``weights_path`` (the weights file
    found, maybe under ``$VDIFF_WEIGHTS``) when it was beside the recorded weights, else its recorded path; None
    when none is recorded."""
    recorded = entry.get(CONFIG_FILE)
    if not recorded:
        return None
    if os.path.dirname(recorded["path"]) == os.path.dirname(entry["path"]):
        return os.path.join(os.path.dirname(weights_path), os.path.basename(recorded["path"]))
    return recorded["path"]


def check_recorded_config_file(entry: dict[str, Any], weights_path: str, what: str) -> None:
    """Before a part is read again from ``weights_path`` (load): its recorded config file must be there unchanged.
    Raises ``ValueError`` naming the file and the changed keys (or saying it is missing or unreadable)."""
    path = recorded_config_file_now(entry, weights_path)
    if path is None:
        return
    if not os.path.isfile(path):
        raise ValueError(
            f"{path}: the {what} config file this checkpoint was trained with is missing beside {weights_path} "
            f"(recorded as {entry[CONFIG_FILE]['path']}); put it back"
        )
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: the {what} config file cannot be read ({error})") from None
    check_config_file(entry, path, content if isinstance(content, dict) else {"(not an object)": content}, what)


def check_part_config(entry: dict[str, Any], part: nn.Module, what: str) -> None:
    """On resume, the frozen part a recipe gives again (the recorded weights file, checked by sha256) must have the
    recorded config: read from the same ``config.json`` with the same content, and built with the same config
    (e.g. the same ``scale_factor`` override). Raises ``ValueError`` naming the file and the changed keys."""
    check_config_file(entry, getattr(part, "config_file", None), getattr(part, "config_file_content", None), what)
    changes = config_changes(entry["config"], part.config.to_dict())
    if changes:
        raise ValueError(
            f"{entry['path']}: the {what} given is built with another config than the one this checkpoint was "
            f"trained with ({'; '.join(changes)}); give it the recorded config or start a new run"
        )


def restore_autoencoder(entry: dict[str, Any], current: nn.Module) -> VideoAutoencoder | None:
    """The autoencoder a checkpoint recorded, or None when ``current`` already is it.

    ``current`` is the module's autoencoder as constructed: the identity (``load_from_checkpoint``
    without one), in which case the recorded one is rebuilt (from its file when it had one, else
    with the architecture only: its weights then come from the state dict); or one built from a
    recipe (resuming), which must be the same file.
    """
    if not isinstance(entry, dict) or "config" not in entry:
        raise ValueError("checkpoint entry 'vdiff_autoencoder' is malformed: expected a dict with 'config'")
    config = AutoencoderConfig.from_dict(entry["config"])
    sha256 = entry.get("sha256")
    if not isinstance(current, IdentityAutoencoder):
        current_sha = getattr(current, "weights_sha256", None)
        if sha256 and current_sha != sha256:
            have = (f"the weights file {getattr(current, 'weights_path', '?')} (sha256 {current_sha[:12]}...)"
                    if current_sha else f"an autoencoder without a weights file ({type(current).__name__})")
            raise ValueError(
                f"this module was given {have}, which is not the autoencoder this checkpoint was trained with "
                f"({entry['path']}, sha256 {sha256[:12]}...): the checkpoint does not store its weights; use that file"
            )
        if sha256:
            check_part_config(entry, current, "autoencoder")
        return None
    if not sha256:
        return VideoAutoencoder(config)
    from vdiff.weights.autoencoder import AutoencoderConfigError, read_autoencoder
    from vdiff.weights.safetensors_io import file_sha256

    path = find_recorded_weights(entry)
    actual = file_sha256(path)
    if actual != sha256:
        raise ValueError(
            f"{path}: the autoencoder weights file changed since the checkpoint was written "
            f"(sha256 {actual[:12]}... != recorded {sha256[:12]}...)"
        )
    check_recorded_config_file(entry, path, "autoencoder")
    layout = entry.get("layout", "auto")
    try:
        weights = read_autoencoder(path, layout=layout, config=config)
    except AutoencoderConfigError:  # the recorded config overrode a stored one (e.g. its scale factor)
        weights = read_autoencoder(path, layout=layout, config=None)
    check_config_file(entry, weights.config_file and str(weights.config_file), weights.config_file_content, "autoencoder")
    autoencoder = VideoAutoencoder(config)  # the recorded architecture and scaling, the file's weights
    autoencoder.load_state_dict(weights.state_dict, strict=True)
    return autoencoder


def find_recorded_weights(entry: dict[str, Any]) -> str:
    """The recorded weights file, or, when it is gone (a checkpoint moved to another machine): for a file of
    huggingface_hub's cache (the part was named by a hub id), the same file of the same commit in this machine's cache
    (fetched when missing and online: :func:`vdiff.weights.hub.hub_id_of_cached_path`); else the file under
    ``$VDIFF_WEIGHTS`` that ends like the recorded path, the longest match first: ``sd-vae/diffusion_pytorch_model.safetensors``
    for a diffusers folder moved there, ``tiny-vae.safetensors`` for a bare file. The caller's sha256 check makes
    sure it is the same file. Used for every frozen, file-backed part a checkpoint records (autoencoder, image
    encoder)."""
    from vdiff.weights.download import WeightsUnavailableError
    from vdiff.weights.hub import hub_id_of_cached_path, resolve_hub_path
    from vdiff.weights.safetensors_io import WEIGHTS_ENV

    path = entry["path"]
    if os.path.isfile(path):
        return path
    hub, unavailable = hub_id_of_cached_path(path), None
    if hub is not None:
        try:
            return str(resolve_hub_path(hub))
        except WeightsUnavailableError as err:  # offline and not cached here: a copy under $VDIFF_WEIGHTS may do
            unavailable = err
    tried = [path]
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        # The recorded path's trailing parts under $VDIFF_WEIGHTS, the longest first: a diffusers or transformers
        # folder moved there keeps its name (sd-vae/diffusion_pytorch_model.safetensors), a bare file needs none.
        parts = os.path.normpath(path).split(os.sep)[1:]
        for start in range(len(parts)):
            candidate = os.path.join(os.path.expanduser(root), *parts[start:])
            if os.path.isfile(candidate):
                return candidate
            tried.append(candidate)
    raise FileNotFoundError(
        f"this checkpoint's {entry.get('what', 'autoencoder')} weights are not stored in it but read from {path}, "
        "which does not exist "
        f"(tried: {', '.join(tried)}; ${WEIGHTS_ENV} {'is ' + root if root else 'is not set'}); put that file back "
        "(same sha256) or set $VDIFF_WEIGHTS to a folder holding it (or its model folder, by the same name)"
        + (f"; {unavailable}" if unavailable is not None else "")
    )
