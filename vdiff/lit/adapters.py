"""LoRA adapters (peft) on a vdiff network: inject, train only them, merge, unload, save, load, re-apply.

The mechanics behind the :class:`~vdiff.callbacks.LoRA` callback (which only calls them from its hooks),
usable without a trainer:

* :class:`LoRAAdapter` - one named adapter of a recipe (rank, alpha, targets: a regex or a preset the network
  declares, ``LORA_PRESETS``, :mod:`vdiff.models.lora_targets`) and its peft ``LoraConfig``;
* :func:`inject_adapters` - named adapters into a network in place (peft's ``inject_adapter_in_model``), every
  one active (their updates add); :func:`set_trainable` freezes everything else;
* :func:`merge_adapters` / :func:`unmerge_adapters` fold the adapters into the base weights and back;
  :func:`unload_adapters` leaves a plain network (merged or not);
* :func:`save_adapter` / :func:`load_adapter` - one adapter in peft's file format
  (:mod:`vdiff.weights.peft_files`, which also says where the adapters of a checkpoint or export live);
* checkpoints: ``checkpoint["vdiff_lora"]`` (:data:`LORA_KEY`, :func:`lora_entry`) records how the adapters
  were injected; :func:`adapters_reapplied` injects them again inside ``load_from_checkpoint`` (which builds the
  network without the callback's hook), as :func:`vdiff.lit.module_loading.load_module` does;
  :func:`gathered_adapter_states` / :func:`ema_adapter_states` give the full tensors to write beside one.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vdiff.lit.load_hooks import after_on_load_checkpoint
from vdiff.lit.scaling import full_tensor, local_tensor, reshard_fsdp
from vdiff.models.lora_targets import DEFAULT_LORA_PRESET, lora_preset
from vdiff.models.unet_svd import UNetSVD
from vdiff.models.vdt import VDT
from vdiff.weights.peft_files import (
    DEFAULT_ADAPTER,
    PEFT_PREFIX,
    config_dict,
    config_from_dict,
    read_adapter_config,
    read_adapter_weights,
    write_adapter,
)

LORA_KEY = "vdiff_lora"  # checkpoint entry: how the adapters were injected (lora_entry)

# Regexes (re.fullmatch on module names) of the networks' presets, for recipes that combine them by hand.
VDT_ATTENTION = VDT.LORA_PRESETS["attention"].modules  # q/k/v (fused) and out of every attention, temporal and spatial
VDT_TEMPORAL_ATTENTION = VDT.LORA_PRESETS["temporal-attention"].modules
UNET_SVD_ATTENTION = UNetSVD.LORA_PRESETS["attention"].modules  # q/k/v/out of every attention (SVD, Vista)


@dataclass
class LoRAAdapter:
    """One named adapter of a recipe.

    target_modules: regex (``re.fullmatch`` on module names of the network) or a list of module names
        (peft's suffix matching). None: the network's ``preset``.
    rank, alpha, dropout: LoRA's r, lora_alpha (None = rank, i.e. scale 1) and lora_dropout.
    init: peft's ``init_lora_weights``: True (Kaiming-uniform A, zero B: the network starts unchanged),
        ``"gaussian"``, ``"pissa"``, ``"olora"``, ... or False (random B, the network changes at once).
    use_rslora: scale by alpha / sqrt(rank) instead of alpha / rank.
    exclude_modules: regex or names never adapted.
    path: an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) to start from; its
        config then replaces the fields above.
    trainable: train this adapter (False: a frozen adapter, e.g. a loaded one that stays fixed).
    preset: a preset the network declares (``LORA_PRESETS``: ``attention``, ``attention+mlp``, ...; ``vista``
        also trains the action projections fully), used when ``target_modules`` is None; None = ``attention``.
    """

    target_modules: str | list[str] | None = None
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    init: bool | str = True
    use_rslora: bool = False
    exclude_modules: str | list[str] | None = None
    path: str | None = None
    trainable: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None and self.preset is not None:
            raise ValueError(
                f"LoRA adapter: give target_modules or preset, not both (got {self.target_modules!r} and {self.preset!r})"
            )

    def targets(self, net: nn.Module | None) -> tuple[str | list[str], tuple[str, ...]]:
        """The modules to adapt and the parameters that train fully with them: ``target_modules`` as given, else
        the ``preset`` of ``net`` (an unknown preset fails, listing the network's)."""
        if self.target_modules is not None:
            return self.target_modules, ()
        if net is None:
            raise ValueError("LoRA adapter: no target_modules, and no network to take the preset from")
        preset = lora_preset(net, self.preset or DEFAULT_LORA_PRESET)
        return preset.modules, preset.trainable

    def peft_config(self, net: nn.Module | None = None):
        """peft's ``LoraConfig``; ``net`` resolves a preset (needed when ``target_modules`` is None)."""
        from peft import LoraConfig

        if self.path is not None:
            return read_adapter_config(self.path)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            target_modules=self.targets(net)[0],
            exclude_modules=self.exclude_modules,
            init_lora_weights=self.init,
            use_rslora=self.use_rslora,
        )


# ---------------------------------------------------------------------------- adapters on a network


def tuner_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, peft tuner layer)`` of every adapted module of ``net``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in net.named_modules() if isinstance(module, BaseTunerLayer)]


def adapter_names(net: nn.Module) -> list[str]:
    """Names of the adapters injected into ``net``."""
    return list(getattr(net, "peft_config", {}) or {})


def adapter_parameters(net: nn.Module, adapter: str) -> dict[str, tuple[str, nn.Parameter]]:
    """``{name in net: (name in peft's files without the prefix, parameter)}`` of one adapter.

    peft names drop the adapter name: ``blocks.0.attn.qkv.lora_A.<adapter>.weight`` is saved as
    ``blocks.0.attn.qkv.lora_A.weight``."""
    found: dict[str, tuple[str, nn.Parameter]] = {}
    for module_name, layer in tuner_layers(net):
        for layer_name in layer.adapter_layer_names:
            holder = getattr(layer, layer_name, None)
            if holder is None or adapter not in holder:
                continue
            sub = holder[adapter]
            items = [("", sub)] if isinstance(sub, nn.Parameter) else list(sub.named_parameters())
            for param_name, param in items:
                tail = f".{param_name}" if param_name else ""
                prefix = f"{module_name}." if module_name else ""
                found[f"{prefix}{layer_name}.{adapter}{tail}"] = (f"{prefix}{layer_name}{tail}", param)
    return found


def inject_adapters(net: nn.Module, configs: Mapping[str, Any]) -> nn.Module:
    """Inject peft adapters ``{name: LoraConfig}`` into ``net`` in place and make every adapter of the
    network active (their updates add up). Returns ``net``."""
    from peft import inject_adapter_in_model

    for name, config in configs.items():
        if name in adapter_names(net):
            raise ValueError(f"LoRA: the network already has an adapter named {name!r}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
            inject_adapter_in_model(config, net, adapter_name=name)
        if not adapter_parameters(net, name):
            raise ValueError(f"LoRA adapter {name!r}: target_modules {config.target_modules!r} matched no module")
    active = adapter_names(net)
    for _, layer in tuner_layers(net):
        layer.set_adapter(active)
    return net


def set_trainable(
    pl_module: nn.Module, net: nn.Module, adapters: Sequence[str], extra_trainable: Sequence[str] = ()
) -> list[str]:
    """Freeze every parameter of ``pl_module`` except those of the ``adapters`` and the network's
    parameters whose names fullmatch a regex of ``extra_trainable``. Returns the trainable names (in net)."""
    for param in pl_module.parameters():
        param.requires_grad_(False)
    names: list[str] = []
    for adapter in adapters:
        for name, (_, param) in adapter_parameters(net, adapter).items():
            param.requires_grad_(True)
            names.append(name)
    params = dict(net.named_parameters())
    for pattern in extra_trainable:
        matched = [n for n in params if re.fullmatch(pattern, n)]
        if not matched:
            raise ValueError(f"LoRA: extra_trainable {pattern!r} matches no parameter of the network")
        for name in matched:
            params[name].requires_grad_(True)
            names.append(name)
    return names


def merge_adapters(net: nn.Module, adapters: Sequence[str] | None = None) -> None:
    """Fold the (active, or the named) adapters into the base weights; the adapters stay, inactive in
    the forward until :func:`unmerge_adapters`. For inference and export, not for training."""
    for _, layer in tuner_layers(net):
        layer.merge(safe_merge=True, adapter_names=list(adapters) if adapters is not None else None)


def unmerge_adapters(net: nn.Module) -> None:
    """Undo :func:`merge_adapters`: the base weights are restored (up to rounding)."""
    for _, layer in tuner_layers(net):
        layer.unmerge()


def unload_adapters(net: nn.Module, merge: bool) -> nn.Module:
    """Replace every adapted module by its base module (after merging the adapters into it when
    ``merge``): a plain network with the original parameter names. In place; returns ``net``."""
    for name, layer in sorted(tuner_layers(net), key=lambda item: -item[0].count(".")):
        if merge and not layer.merged:
            layer.merge(safe_merge=True)
        elif not merge and layer.merged:
            layer.unmerge()
        base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, base)
    if hasattr(net, "peft_config"):
        del net.peft_config
    return net


# ---------------------------------------------------------------------------- files and states


def adapter_state_dict(net: nn.Module, adapter: str, values: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """One adapter's weights under peft's saved names (``base_model.model.<module>.lora_A.weight``).
    ``values`` ({name in net: tensor}) replaces the live parameters (e.g. gathered or EMA values)."""
    state = {}
    for name, (peft_name, param) in adapter_parameters(net, adapter).items():
        value = values[name] if values is not None else param.detach()
        state[PEFT_PREFIX + peft_name] = value.detach().cpu().contiguous()
    return state


def save_adapter(net: nn.Module, adapter: str, folder: str | Path) -> Path:
    """Save one adapter of ``net`` (not sharded) in peft's format into ``folder``."""
    return write_adapter(folder, net.peft_config[adapter], adapter_state_dict(net, adapter))


def load_adapter(net: nn.Module, folder: str | Path, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Inject the adapter saved in ``folder`` into ``net`` (a network without it, e.g. a fresh one) under
    the name ``adapter`` and load its weights strictly. Returns ``net``."""
    folder = Path(folder)
    inject_adapters(net, {adapter: read_adapter_config(folder)})
    load_adapter_weights(net, adapter, read_adapter_weights(folder), source=str(folder))
    return net


def load_adapter_weights(net: nn.Module, adapter: str, state: Mapping[str, Tensor], source: str = "state") -> None:
    """Copy peft-format weights (:func:`adapter_state_dict`'s names) into an injected adapter; every
    missing, unexpected or mis-shaped name is an error."""
    params = {peft_name: param for peft_name, param in adapter_parameters(net, adapter).values()}
    given = {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    missing, unexpected = sorted(set(params) - set(given)), sorted(set(given) - set(params))
    shapes = [k for k in set(params) & set(given) if tuple(params[k].shape) != tuple(given[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source}: adapter {adapter!r} does not fit the network (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, mis-shaped {sorted(shapes)[:5]})"
        )
    with torch.no_grad():
        for key, param in params.items():
            local_tensor(param).copy_(given[key].to(param.dtype))


def gathered_adapter_states(
    pl_module: nn.Module, net: nn.Module, adapters: Sequence[str]
) -> dict[str, dict[str, Tensor]]:
    """``{adapter: its full tensors under peft's names}`` on the CPU, for files beside a checkpoint. Sharded
    (FSDP2) parameters are gathered: a collective, so every rank must call it."""
    reshard_fsdp(pl_module)
    states = {}
    for name in adapters:
        values = {n: full_tensor(p, local_tensor(p)) for n, (_, p) in adapter_parameters(net, name).items()}
        states[name] = adapter_state_dict(net, name, values)
    return states


def ema_adapter_states(
    net: nn.Module, network: str, ema: Mapping[str, Tensor], adapters: Sequence[str]
) -> dict[str, dict[str, Tensor]]:
    """``{adapter: its tensors under peft's names}`` taken from a checkpoint's EMA weights (``ema``: full tensors
    by the LightningModule's parameter names, the network under the attribute ``network``), for every adapter
    the EMA averaged whole (none when it tracked other parameters)."""
    prefix = f"{network}."
    values = {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}
    states = {}
    for name in adapters:
        if all(n in values for n in adapter_parameters(net, name)):
            states[name] = adapter_state_dict(net, name, values)
    return states


# ---------------------------------------------------------------------------- checkpoints


def lora_entry(
    net: nn.Module, network: str, trainable: Sequence[str], extra_trainable: Sequence[str]
) -> dict[str, Any]:
    """The ``checkpoint["vdiff_lora"]`` entry: plain types only."""
    return {
        "network": network,
        "adapters": {name: config_dict(net.peft_config[name]) for name in adapter_names(net)},
        "trainable": list(trainable),
        "extra_trainable": list(extra_trainable),
    }


def apply_lora_entry(pl_module: nn.Module, entry: Mapping[str, Any]) -> None:
    """Inject the adapters a checkpoint recorded into ``pl_module``'s network (no-op when it has them)
    and set which parameters train as in the run that wrote it."""
    net = getattr(pl_module, entry["network"], None)
    if net is None:
        raise ValueError(f"checkpoint entry {LORA_KEY!r}: the module has no network {entry['network']!r} (not built?)")
    have = adapter_names(net)
    wanted = {name: config_from_dict(data) for name, data in entry["adapters"].items() if name not in have}
    if wanted:
        inject_adapters(net, wanted)
    set_trainable(pl_module, net, entry.get("trainable", list(entry["adapters"])), entry.get("extra_trainable", ()))


@contextmanager
def adapters_reapplied(cls: type, entry: Mapping[str, Any] | None) -> Iterator[None]:
    """Within the block, ``cls.load_from_checkpoint`` injects the recorded adapters right before the
    state dict is loaded: Lightning calls ``configure_model`` (which builds the network, without the
    hook: there is no trainer) and then ``on_load_checkpoint``, after which this injects them
    (:func:`vdiff.lit.load_hooks.after_on_load_checkpoint`)."""
    if not entry:
        yield
        return
    with after_on_load_checkpoint(cls, lambda module, _checkpoint: apply_lora_entry(module, entry)):
        yield


STRUCTURE_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
)  # what decides the adapters' parameters and function (not peft's version)


def adapter_structure(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{adapter: {field of STRUCTURE_FIELDS: value}}`` of a ``vdiff_lora`` entry: what two runs must share for
    one's adapter weights to mean the same in the other."""
    return {name: {k: config.get(k) for k in STRUCTURE_FIELDS} for name, config in entry["adapters"].items()}
