"""Where a diffusion module's frozen autoencoder comes from, recorded in checkpoints and restored.

A latent diffusion checkpoint needs its autoencoder to sample, but the autoencoder is frozen and
usually read from a weights file (SD-VAE: 335 MB), so storing it in every checkpoint wastes disk
and hides which file it was. :func:`describe_autoencoder` records the architecture and, for an
autoencoder loaded from a file (it has ``weights_path``, ``layout`` and ``weights_sha256``, as
:class:`vdiff.weights.pretrained.PretrainedAutoencoder` does), the file and its sha256;
:func:`restore_autoencoder` reloads it from that file and refuses a file that changed or is missing.
An autoencoder that has no file (trained in the same run, built in a test) keeps its weights in the
checkpoint's state dict, and only its architecture is recorded.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from vdiff.models.autoencoder import AutoencoderConfig, IdentityAutoencoder, VideoAutoencoder


def describe_autoencoder(autoencoder: VideoAutoencoder) -> dict[str, Any]:
    """``{"config": ...}`` plus ``path``, ``layout`` and ``sha256`` when it was loaded from a file."""
    entry: dict[str, Any] = {"config": autoencoder.config.to_dict()}
    sha256 = getattr(autoencoder, "weights_sha256", None)
    path = getattr(autoencoder, "weights_path", None)
    if sha256 and path:
        entry.update(path=str(path), layout=str(getattr(autoencoder, "layout", "vdiff")), sha256=str(sha256))
    return entry


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
    layout = entry.get("layout", "auto")
    try:
        weights = read_autoencoder(path, layout=layout, config=config)
    except AutoencoderConfigError:  # the recorded config overrode a stored one (e.g. its scale factor)
        weights = read_autoencoder(path, layout=layout, config=None)
    autoencoder = VideoAutoencoder(config)  # the recorded architecture and scaling, the file's weights
    autoencoder.load_state_dict(weights.state_dict, strict=True)
    return autoencoder


def find_recorded_weights(entry: dict[str, Any]) -> str:
    """The recorded weights file, or the file of the same name under ``$VDIFF_WEIGHTS`` (a checkpoint
    moved to another machine); the caller's sha256 check makes sure it is the same file. Used for every
    frozen, file-backed part a checkpoint records (autoencoder, image encoder)."""
    from vdiff.weights.safetensors_io import WEIGHTS_ENV

    path = entry["path"]
    if os.path.isfile(path):
        return path
    tried = [path]
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        candidate = os.path.join(os.path.expanduser(root), os.path.basename(path))
        if os.path.isfile(candidate):
            return candidate
        tried.append(candidate)
    raise FileNotFoundError(
        f"this checkpoint's {entry.get('what', 'autoencoder')} weights are not stored in it but read from {path}, "
        "which does not exist "
        f"(tried: {', '.join(tried)}; ${WEIGHTS_ENV} {'is ' + root if root else 'is not set'}); put that file back "
        "(same sha256) or set $VDIFF_WEIGHTS to the folder holding it"
    )
