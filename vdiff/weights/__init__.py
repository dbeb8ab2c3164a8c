"""Pretrained weights: safetensors / torch checkpoint I/O and converters from peer layouts.

The readers read local files (or, for diffusers, model folders); every weights path goes through
:func:`~vdiff.weights.safetensors_io.resolve_weights_path` first: a relative path is also looked up in the directory
named by ``VDIFF_WEIGHTS``, a Hugging Face hub id ``hf://ORG/NAME[@REVISION][/PATH]`` becomes a path in
huggingface_hub's cache (:mod:`vdiff.weights.hub`), and the metric files vdiff knows by name are fetched into the
weights cache on first use (:mod:`vdiff.weights.registry`, :mod:`vdiff.weights.download`; ``vdiff weights``).

Autoencoders: :func:`vdiff.weights.autoencoder.load_autoencoder` / ``save_autoencoder`` (vdiff files, diffusers
folders and files, sgm checkpoints), :class:`vdiff.weights.pretrained.PretrainedAutoencoder` (the same loader
behind a class a recipe can name), name maps in :mod:`vdiff.weights.autoencoder_convert`.

Every reader follows one template (:mod:`vdiff.weights.template`: where the weights are, their layout, their config,
a strict key mapping) and raises one error family (:mod:`vdiff.weights.errors`: ``except WeightsError``).
"""

from vdiff.weights.errors import KeyMappingError, WeightsConfigError, WeightsError
from vdiff.weights.safetensors_io import (
    WEIGHTS_ENV,
    file_sha256,
    load_state_dict,
    resolve_weights_path,
    save_state_dict,
)

__all__ = [
    "WEIGHTS_ENV",
    "KeyMappingError",
    "WeightsConfigError",
    "WeightsError",
    "file_sha256",
    "load_state_dict",
    "resolve_weights_path",
    "save_state_dict",
]
