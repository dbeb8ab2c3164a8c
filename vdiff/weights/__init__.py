"""Pretrained weights: safetensors / torch checkpoint I/O and converters from peer layouts.

Nothing here downloads. Weights are local files; a relative path is also looked up in the directory named by
the environment variable ``VDIFF_WEIGHTS``.
"""

from vdiff.weights.safetensors_io import WEIGHTS_ENV, load_state_dict, resolve_weights_path, save_state_dict

__all__ = ["WEIGHTS_ENV", "load_state_dict", "resolve_weights_path", "save_state_dict"]
