"""Networks configured as data: a preset name, a preset with fields overridden, or the fields themselves.

Every architecture config of vdiff (:class:`~vdiff.models.unet_svd.UNetSVDConfig`,
:class:`~vdiff.models.vdt.VDTConfig`, :class:`~vdiff.models.autoencoder.AutoencoderConfig`) is a dataclass
with named sizes and ``from_name(name, **overrides)`` (as litgpt's ``Config.from_name``). A recipe's
``net:`` may be any of::

    net: svd-xt                                           # the preset
    net: {name: svd-xt, gradient_checkpointing: true}     # the preset with fields overridden
    net: {num_frames: 25}                                 # the fields over the dataclass defaults

:func:`config_from_spec` turns each into the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")

PRESET_KEY = "name"  # the key of a net: mapping that names the preset its other fields override


def config_from_spec(cls: type[Config], spec: Config | str | Mapping[str, Any], what: str = "net") -> Config:
    """The ``cls`` config ``spec`` describes: a ``cls`` instance (itself), a preset name (``cls.from_name``), a
    mapping with ``name`` (that preset with the mapping's other keys as field overrides) or without (those fields
    over the dataclass defaults). A key that is no field is a ValueError in one line naming it, ``what`` (the
    argument, e.g. ``net``) and the valid keys; an unknown preset is ``from_name``'s error listing the names."""
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, str):
        return cls.from_name(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what}: expected a {cls.__name__}, a preset name or a mapping, got {type(spec).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    overrides = {str(key): value for key, value in spec.items()}
    name = overrides.pop(PRESET_KEY, None)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"{what}: unknown {cls.__name__} field(s) {unknown}; the valid keys are {PRESET_KEY!r} (a preset) and "
            f"{fields}"
        )
    if name is not None:
        return cls.from_name(str(name), **overrides)
    return cls(**overrides)
