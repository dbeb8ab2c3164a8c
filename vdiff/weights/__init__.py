"""Pretrained weights: safetensors / torch checkpoint I/O and converters from peer layouts.

Nothing here downloads. Weights are local files (or, for diffusers, local model folders); a relative path is
also looked up in the directory named by the environment variable ``VDIFF_WEIGHTS``.

Autoencoders: :func:`vdiff.weights.autoencoder.load_autoencoder` / ``save_autoencoder`` (vdiff files, diffusers
folders and files, sgm checkpoints), :class:`vdiff.weights.pretrained.PretrainedAutoencoder` (the same loader
behind a class a recipe can name), name maps in :mod:`vdiff.weights.autoencoder_convert`.
"""

from vdiff.weights.safetensors_io import (
    WEIGHTS_ENV,
    file_sha256,
    load_state_dict,
    resolve_weights_path,
    save_state_dict,
)

__all__ = ["WEIGHTS_ENV", "file_sha256", "load_state_dict", "resolve_weights_path", "save_state_dict"]
