"""LoRA adapters (peft) injected through the network hook, trained with the base network frozen.

:class:`LoRA` is a callback with ``configure_network(trainer, pl_module)``, the hook the base module's
``configure_model`` calls right after building the network (docs/architecture.md, section 5): so the
adapters exist before the strategy wraps (DDP) or shards (``fully_shard``) the network, before the
optimizer is built, and before :class:`~vdiff.callbacks.EMA` collects what it averages. The hook:

1. injects one or more named peft LoRA adapters (``inject_adapter_in_model``) into the modules of a
   preset the network declares (``LORA_PRESETS``, :mod:`vdiff.models.lora_targets`; default
   ``"attention"``: q/k/v/out of every attention, on VDT, UNet-SVD and Vista alike) or chosen by regex
   (``re.fullmatch`` on the module names of the network, e.g. ``r".*temporal_attn\\.(qkv|proj)"``
   for VDT's temporal attention only: VDT fuses q, k and v into one ``qkv`` projection, so one rank-r
   update covers the three), with rank, alpha, dropout and initialisation from the recipe; every
   adapter is active (their updates add);
2. freezes every parameter of the LightningModule except the adapters marked trainable and the
   network parameters matching ``extra_trainable`` (e.g. ``r".*action.*"``), so only those reach the
   optimizer (the base module's parameter groups take trainable parameters only) and the EMA;
3. optionally initialises an adapter from a saved adapter folder (``path``).

Checkpoints. The adapter weights are in the state dict under the network's (injected) parameter names;
``checkpoint["vdiff_lora"]`` records how they were injected (:func:`lora_entry`), which
:func:`vdiff.callbacks.checkpoint_eval.load_module` uses to inject them again before the state dict is
loaded (``load_from_checkpoint`` runs ``configure_model`` without a trainer, so without the hook).
Beside every checkpoint file ``X.ckpt`` the callback writes the adapters in peft's own format,
``X_lora/<adapter>/adapter_model.safetensors`` + ``adapter_config.json`` (and ``X_lora_ema/<adapter>/``
from the EMA weights when the checkpoint has them), loadable by :func:`load_adapter` on a fresh network
or by ``peft.PeftModel.from_pretrained``; a folder is replaced so that a kill at any instant leaves a
complete one (:func:`write_adapter_folders`). :func:`merge_adapters` / :func:`unmerge_adapters` fold the
adapters into the base weights and back; :func:`unload_adapters` leaves a plain network (merged or not).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from vdiff.callbacks.ema import EMA_KEY, full_tensor, local_tensor, reshard_fsdp
from vdiff.data.names import safe_name
from vdiff.lit.load_hooks import after_on_load_checkpoint
from vdiff.models.lora_targets import DEFAULT_LORA_PRESET, lora_preset
from vdiff.models.unet_svd import UNetSVD
from vdiff.models.vdt import VDT
from vdiff.weights.safetensors_io import read_safetensors

LORA_KEY = "vdiff_lora"  # checkpoint entry: how the adapters were injected (lora_entry)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's saved names are those of a PeftModel wrapping the network

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


# ---------------------------------------------------------------------------- peft's file format


def _json_safe(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def config_dict(config: Any) -> dict[str, Any]:
    """A peft config as plain JSON types (what ``adapter_config.json`` holds)."""
    return _json_safe(config.to_dict())


def config_from_dict(data: Mapping[str, Any]):
    """A ``LoraConfig`` from :func:`config_dict`'s output (or an ``adapter_config.json``)."""
    from peft import LoraConfig

    fields = set(LoraConfig.__dataclass_fields__)
    init = {k: v for k, v in data.items() if k in fields and LoraConfig.__dataclass_fields__[k].init}
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters are supported, got peft_type {data.get('peft_type')!r}")
    return LoraConfig(**init)


def read_adapter_config(folder: str | Path):
    path = adapter_source(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"no adapter config at {path} (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    return config_from_dict(json.loads(path.read_text()))


def adapter_state_dict(net: nn.Module, adapter: str, values: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """One adapter's weights under peft's saved names (``base_model.model.<module>.lora_A.weight``).
    ``values`` ({name in net: tensor}) replaces the live parameters (e.g. gathered or EMA values)."""
    state = {}
    for name, (peft_name, param) in adapter_parameters(net, adapter).items():
        value = values[name] if values is not None else param.detach()
        state[PEFT_PREFIX + peft_name] = value.detach().cpu().contiguous()
    return state


def write_adapter(folder: str | Path, config: Any, state: Mapping[str, Tensor]) -> Path:
    """Write an adapter folder in peft's format: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + "\n")
    save_file(dict(state), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def save_adapter(net: nn.Module, adapter: str, folder: str | Path) -> Path:
    """Save one adapter of ``net`` (not sharded) in peft's format into ``folder``."""
    return write_adapter(folder, net.peft_config[adapter], adapter_state_dict(net, adapter))


def load_adapter(net: nn.Module, folder: str | Path, adapter: str = "default") -> nn.Module:
    """Inject the adapter saved in ``folder`` into ``net`` (a network without it, e.g. a fresh one) under
    the name ``adapter`` and load its weights strictly. Returns ``net``."""
    folder = Path(folder)
    inject_adapters(net, {adapter: read_adapter_config(folder)})
    load_adapter_weights(net, adapter, read_adapter_weights(folder), source=str(folder))
    return net


def read_adapter_weights(folder: str | Path) -> dict[str, Tensor]:
    """The tensors of an adapter folder's ``adapter_model.safetensors`` (peft's names), read through
    :func:`adapter_source` (an interrupted replacement of the folder still reads a complete adapter)."""
    return read_safetensors(adapter_source(folder) / ADAPTER_WEIGHTS)


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


def _structure(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {k: config.get(k) for k in STRUCTURE_FIELDS} for name, config in entry["adapters"].items()}


def adapter_folder(checkpoint_path: str | Path, ema: bool = False) -> Path:
    """Where the adapters of checkpoint ``X.ckpt`` are written: ``X_lora/`` (``X_lora_ema/`` for EMA)."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_lora{'_ema' if ema else ''}")


def named_adapter_folder(folder: str | Path, name: str) -> Path:
    """``folder/<name>``, the folder of adapter ``name`` beside a checkpoint or an export. Adapter names come
    from recipes and from checkpoints (a stranger's file too), so only plain names (letters, digits, ``_``,
    ``-``) may name a folder: ``../x`` or ``/abs`` would write or read outside ``folder``."""
    if safe_name(name) != name:
        raise ValueError(
            f"LoRA adapter name {name!r} cannot name a folder under {folder}: use letters, digits, '_' and '-' only"
        )
    return Path(folder) / name


def _swap_names(folder: Path) -> tuple[Path, Path]:
    """``(X_lora.tmp, X_lora.old)``: the new folder being written and the replaced one, beside ``folder``."""
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def write_adapter_folders(folder: Path, configs: Mapping[str, Any], states: Mapping[str, Mapping[str, Tensor]]) -> None:
    """``folder/<adapter>/`` for every adapter, replacing an older folder so that a process killed at any
    instant leaves a complete folder: the new one is written as ``folder.tmp``; the old one is renamed to
    ``folder.old``, ``folder.tmp`` to ``folder``, then ``folder.old`` is deleted. Between the two renames
    (no ``folder``) :func:`adapter_source` reads the complete ``folder.tmp``, and the next write finishes the
    swap first (:func:`recover_adapter_folders`)."""
    recover_adapter_folders(folder)
    tmp, old = _swap_names(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    for name, state in states.items():
        write_adapter(named_adapter_folder(tmp, name), configs[name], state)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_adapter_folders(folder: Path) -> None:
    """Finish a replacement of ``folder`` by :func:`write_adapter_folders` that a kill interrupted: with no
    ``folder`` but a ``folder.old``, the complete ``folder.tmp`` (renamed only when written) becomes ``folder``
    (``folder.old`` when there is no ``folder.tmp``); a leftover ``folder.old`` beside ``folder`` is deleted."""
    tmp, old = _swap_names(folder)
    if not folder.exists() and old.exists():
        os.replace(tmp if tmp.exists() else old, folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)


def adapter_source(folder: str | Path) -> Path:
    """Where to read the adapter folder ``folder`` (``X_lora/<adapter>``) from: itself, or, while a replacement
    of ``X_lora`` by :func:`write_adapter_folders` was interrupted between its renames (no ``X_lora``, an
    ``X_lora.old``), the complete copy in ``X_lora.tmp`` (else ``X_lora.old``). Reading changes no file."""
    folder = Path(folder)
    parent = folder.parent
    tmp, old = _swap_names(parent)
    if folder.exists() or parent.exists() or not old.exists():
        return folder
    for swapped in (tmp, old):
        if (swapped / folder.name).is_dir():
            return swapped / folder.name
    return folder


# ---------------------------------------------------------------------------- the callback


class LoRA(L.Callback):
    """Inject LoRA adapters into the network through ``configure_network`` and train only them.

    Args:
        adapters: ``{name: LoRAAdapter}`` (several named adapters, all active). None: one adapter named
            ``default`` from the flat arguments below.
        target_modules, rank, alpha, dropout, init, preset: the single adapter's settings (see
            :class:`LoRAAdapter`). Neither ``target_modules`` nor ``preset``: the network's ``attention`` preset
            (q/k/v/out of every attention), so ``LoRA()`` works on every family.
        extra_trainable: regexes (``re.fullmatch``) of network parameter names that train too (e.g.
            ``[".*action.*"]``); names are those after injection (an adapted ``x.weight`` is ``x.base_layer.weight``).
        network: the LightningModule attribute holding the network (vdiff modules: ``net``).
        save_adapter_files: write peft-format adapter folders beside every checkpoint file.

    A recipe (or ``-c recipes/callbacks/lora.yaml``, which adds ``LoRA(preset: attention)`` to a recipe's callbacks)::

        trainer:
          callbacks:
            - class_path: vdiff.callbacks.LoRA
              init_args: {preset: attention+mlp, rank: 8}
            - class_path: vdiff.callbacks.LoRA
              init_args:
                adapters:
                  temporal: {target_modules: '.*temporal_attn\\.(qkv|proj)', rank: 16, alpha: 16}
                extra_trainable: ['.*action.*']
    """

    def __init__(
        self,
        adapters: dict[str, LoRAAdapter] | None = None,
        target_modules: str | list[str] | None = None,
        rank: int = 16,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: bool | str = True,
        extra_trainable: list[str] | None = None,
        network: str = "net",
        save_adapter_files: bool = True,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        if adapters is None:
            adapters = {"default": LoRAAdapter(target_modules, rank, alpha, dropout, init, preset=preset)}
        elif target_modules is not None or preset is not None:
            raise ValueError("LoRA: give adapters or the flat target_modules/preset, not both")
        if not adapters:
            raise ValueError("LoRA: no adapters given")
        self.adapters = {name: a if isinstance(a, LoRAAdapter) else LoRAAdapter(**a) for name, a in adapters.items()}
        self.extra_trainable = list(extra_trainable or [])
        self.network = network
        self.save_adapter_files = save_adapter_files
        self.trainable: list[str] = []  # trainable parameter names (in the network) after the hook
        self._entry: dict[str, Any] | None = None
        self._pending: tuple[dict[str, Any], dict[str, dict[str, Tensor]]] | None = None

    # ------------------------------------------------------------------ the network hook

    def configure_network(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, self.network, None)
        if not isinstance(net, nn.Module):
            raise TypeError(f"LoRA: {type(pl_module).__name__}.{self.network} is not a network")
        inject_adapters(net, {name: spec.peft_config(net) for name, spec in self.adapters.items()})
        for name, spec in self.adapters.items():
            if spec.path is not None:
                load_adapter_weights(net, name, read_adapter_weights(spec.path), source=spec.path)
        trainable = [name for name, spec in self.adapters.items() if spec.trainable]
        extra = list(self.extra_trainable)  # plus what the adapters' presets train fully (Vista's action projections)
        for spec in self.adapters.values():
            if spec.path is None:
                extra += [p for p in spec.targets(net)[1] if p not in extra]
        self.trainable = set_trainable(pl_module, net, trainable, extra)
        self._entry = lora_entry(net, self.network, trainable, extra)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._entry is None:
            return
        checkpoint[LORA_KEY] = self._entry
        if not self.save_adapter_files:
            return
        # Full adapter tensors for the files beside the checkpoint: gathered here, on every rank (sharded
        # parameters need a collective), written by rank 0 once the checkpoint itself is written.
        net = getattr(pl_module, self.network)
        reshard_fsdp(pl_module)
        states = {}
        for name in self._entry["adapters"]:
            values = {n: full_tensor(p, local_tensor(p)) for n, (_, p) in adapter_parameters(net, name).items()}
            states[name] = adapter_state_dict(net, name, values)
        self._pending = ({n: net.peft_config[n] for n in states}, states) if trainer.is_global_zero else None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(LORA_KEY)
        if stored is None or self._entry is None:
            return
        have, saved = _structure(self._entry), _structure(stored)
        if have != saved:  # the state dict may still fit (same shapes) while computing something else
            raise ValueError(
                f"LoRA: the checkpoint's adapters were injected differently from this run's: {saved} vs {have}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every checkpoint the trainer writes (ModelCheckpoint's, trainer.save_checkpoint's, also after
        # fit) passes through strategy.save_checkpoint, which knows the path: wrap it (once per strategy;
        # the wrapper stays with the trainer) to write the adapter folders beside the file, and
        # remove_checkpoint to delete them with it.
        strategy = trainer.strategy
        if not self.save_adapter_files or getattr(strategy, "_vdiff_lora_files", None) is self:
            return
        save, remove = strategy.save_checkpoint, strategy.remove_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
            ema = checkpoint.get(EMA_KEY)  # read before the strategy may pop entries
            save(checkpoint, filepath, storage_options=storage_options)
            self._write_beside(trainer, filepath, ema)

        def remove_checkpoint(filepath) -> None:
            remove(filepath)
            if trainer.is_global_zero:
                for ema in (False, True):
                    folder = adapter_folder(filepath, ema)
                    for each in (folder, *_swap_names(folder)):
                        shutil.rmtree(each, ignore_errors=True)

        strategy.save_checkpoint, strategy.remove_checkpoint = save_checkpoint, remove_checkpoint
        strategy._vdiff_lora_files = self

    def _write_beside(self, trainer: L.Trainer, filepath, ema: Mapping[str, Tensor] | None) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not trainer.is_global_zero:
            return
        configs, states = pending
        write_adapter_folders(adapter_folder(filepath), configs, states)
        if ema:
            net = getattr(trainer.lightning_module, self.network)
            prefix = f"{self.network}."
            values = {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}
            ema_states = {}
            for name in states:
                names = adapter_parameters(net, name)
                if all(n in values for n in names):
                    ema_states[name] = adapter_state_dict(net, name, values)
            if ema_states:
                write_adapter_folders(adapter_folder(filepath, ema=True), configs, ema_states)
