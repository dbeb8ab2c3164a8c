"""Where LoRA adapters go in a network: named presets each network class declares.

A network class lists its presets in ``LORA_PRESETS`` (``{name: LoRATargets}``), so
:class:`vdiff.callbacks.LoRA` adapts the right modules of every family with no regex from the user:
``LoRA()`` takes the network's ``"attention"`` preset, ``LoRA(preset="attention+mlp")`` another one.
Module and parameter names are those of the network itself (``re.fullmatch``); nothing here imports peft.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

DEFAULT_LORA_PRESET = "attention"  # q/k/v/out of every attention of the network


class LoRATargets(NamedTuple):
    """One preset of a network.

    modules: regex (``re.fullmatch`` on module names) of the layers that get adapters.
    trainable: regexes (``re.fullmatch`` on parameter names, as after injection) of parameters that train fully
        beside the adapters (e.g. Vista's zero-initialised action projections).
    """

    modules: str
    trainable: tuple[str, ...] = ()


def lora_presets(net: nn.Module) -> dict[str, LoRATargets]:
    """The presets ``net``'s class declares (``LORA_PRESETS``); {} when it declares none."""
    return dict(getattr(type(net), "LORA_PRESETS", None) or {})


def lora_preset(net: nn.Module, name: str = DEFAULT_LORA_PRESET) -> LoRATargets:
    """The preset ``name`` of ``net``; an unknown name (or a network without presets) fails, listing the names."""
    presets = lora_presets(net)
    if not presets:
        raise ValueError(
            f"LoRA: {type(net).__name__} declares no LoRA presets (LORA_PRESETS); give target_modules (a regex of "
            "module names) instead"
        )
    if name not in presets:
        raise ValueError(
            f"LoRA: unknown preset {name!r} for {type(net).__name__}; its presets are: {', '.join(presets)}"
        )
    return presets[name]
