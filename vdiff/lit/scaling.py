"""Scaling a vdiff diffusion module: sharding, activation checkpointing, ``torch.compile`` and fused AdamW.

:meth:`vdiff.lit.base.VideoDiffusionModule.configure_model` builds the network, lets callbacks change it
(``configure_network``: LoRA injects its adapters there) and then calls :func:`configure_scaling`, which in
this order

1. turns on **activation checkpointing** per block when a :class:`Scaling` callback asks for it (the
   network's own ``gradient_checkpointing`` switch where it has one - VDT, UNet-SVD - else torch's
   non-reentrant ``checkpoint_wrapper`` around every block class);
2. **shards** the network with FSDP2 ``fully_shard`` when the trainer's strategy provides a device mesh
   (``ModelParallelStrategy``): every instance of the network's ``block_classes()`` on its own, then the
   network itself (the embedders and the final layer), then any other child of the module that has
   trainable parameters; frozen parts (the autoencoder, a CLIP encoder) stay whole on every rank;
3. **compiles** every block in place (``nn.Module.compile``: state-dict keys do not change), after
   sharding, so FSDP2's hooks stay outside the compiled code (dynamo skips them);
4. selects **fused AdamW** (``fused=True``) when the module builds its own AdamW (no ``optimizer:`` in
   the recipe) and the run is on CUDA (``fused_adamw: null``, the default) or when asked to.

Everything here happens before Lightning builds the optimizers, so the optimizer sees the sharded (DTensor)
parameters, and each step is idempotent: ``configure_model`` may run again (``validate`` after ``fit``).

A recipe turns the switches on with the :class:`Scaling` callback (it only carries the settings)::

    trainer:
      callbacks:
        - class_path: vdiff.lit.scaling.Scaling
          init_args: {activation_checkpointing: true, compile: true}

For Lightning's FSDP (FSDP1, GPUs only) :class:`BlockFSDPStrategy` wraps every block class the network
declares (``block_classes()``) as its own FSDP unit, and optionally checkpoints it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from vdiff.lit.safe_loading import load_checkpoint, load_distributed_checkpoint

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

COMPILED_FLAG = "_vdiff_compiled"  # set on every module compiled by compile_blocks (compiling twice is skipped)


class Scaling(L.Callback):
    """Speed and memory switches of a vdiff diffusion module, read by its ``configure_model``.

    The callback itself does nothing during training; :func:`configure_scaling` looks it up in
    ``trainer.callbacks``. Without one, the defaults apply (no checkpointing, no compile, fused AdamW on CUDA).

    Args:
        activation_checkpointing: recompute every block's activations in backward instead of storing them
            (less memory, about one more forward of compute). Sets the network's ``gradient_checkpointing``
            where it has one, else wraps each block class with torch's non-reentrant ``checkpoint_wrapper``.
        compile: ``torch.compile`` every block (in place, after sharding). The first steps pay the
            compilation; the blocks of one network share one compiled graph.
        compile_mode: ``torch.compile`` mode (None = default; e.g. ``max-autotune-no-cudagraphs``).
        compile_dynamic: ``torch.compile``'s ``dynamic`` (None = automatic; False when every batch has
            the same shape).
        fused_adamw: use AdamW's fused kernel when the module builds its own AdamW: None = on CUDA only,
            True = always (torch also has a fused CPU kernel), False = never (torch's default, foreach).
        reshard_after_forward: FSDP2: free the gathered parameters of a block after its forward (and gather
            again for backward). False keeps them between forward and backward: faster, more memory.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_dynamic: bool | None = None,
        fused_adamw: bool | None = None,
        reshard_after_forward: bool = True,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = bool(activation_checkpointing)
        self.compile = bool(compile)
        self.compile_mode = compile_mode
        self.compile_dynamic = compile_dynamic
        self.fused_adamw = fused_adamw
        self.reshard_after_forward = bool(reshard_after_forward)


def scaling_of(trainer: L.Trainer | None) -> Scaling:
    """The :class:`Scaling` callback of ``trainer`` (the first one), or the defaults."""
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, Scaling):
            return callback
    return Scaling()


# ---------------------------------------------------------------------------- blocks


def block_classes(net: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes the network declares as its blocks (``net.block_classes()``); () when it declares none."""
    declared = getattr(net, "block_classes", None)
    return tuple(declared()) if callable(declared) else ()


def blocks_of(net: nn.Module) -> list[nn.Module]:
    """Instances of the network's block classes, innermost first (a block inside another comes before it),
    so FSDP2 can shard them in that order."""
    classes = block_classes(net)
    if not classes:
        return []
    return [m for m in reversed(list(net.modules())) if m is not net and isinstance(m, classes)]


# ---------------------------------------------------------------------------- activation checkpointing


def enable_activation_checkpointing(net: nn.Module) -> str:
    """Checkpoint every block of ``net``; returns how (``"network"`` or ``"checkpoint_wrapper"``).

    A network with a ``gradient_checkpointing`` attribute (VDT, UNet-SVD) checkpoints its blocks itself in
    ``forward``; its config is updated to say so. Otherwise each instance of ``block_classes()`` is wrapped
    in torch's non-reentrant ``CheckpointWrapper`` (its state-dict keys stay those of the block)."""
    if hasattr(net, "gradient_checkpointing"):
        net.gradient_checkpointing = True
        config = getattr(net, "config", None)
        if config is not None and hasattr(config, "gradient_checkpointing") and hasattr(config, "replace"):
            net.config = config.replace(gradient_checkpointing=True)
        return "network"
    classes = block_classes(net)
    if not classes:
        raise ValueError(
            f"activation checkpointing: {type(net).__name__} has neither a gradient_checkpointing switch nor "
            "block_classes() naming the blocks to checkpoint"
        )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    if not any(isinstance(m, CheckpointWrapper) for m in net.modules()):
        apply_activation_checkpointing(
            net,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda module: isinstance(module, classes),
        )
    return "checkpoint_wrapper"


# ---------------------------------------------------------------------------- sharding (FSDP2)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 ``fully_shard`` has been applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: ``mesh["data_parallel"]`` of ``ModelParallelStrategy``'s 2-D mesh. vdiff
    applies no tensor parallelism, so a tensor-parallel dimension larger than 1 is an error."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"vdiff shards its networks with FSDP2 only (no tensor-parallel plan): the strategy's tensor_parallel_size "
            f"is {mesh['tensor_parallel'].size()}; set ModelParallelStrategy(data_parallel_size=<devices x nodes>, "
            "tensor_parallel_size=1)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_module(
    pl_module: nn.Module, net: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True
) -> list[str]:
    """FSDP2-shard ``net`` (each block, then the network) and every other child of ``pl_module`` with
    trainable parameters; returns the names of the modules sharded. Does nothing when ``net`` is sharded.

    Every trainable parameter must end up in a sharded module: a plain parameter would be neither
    sharded nor averaged across ranks, so the ranks would drift apart silently; that is an error naming it."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(net):
        return []
    mesh = data_parallel_mesh(mesh)
    names = {id(m): n for n, m in net.named_modules()}
    done = []
    for block in blocks_of(net):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
        done.append(names[id(block)])
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)
    done.append("<network>")
    for name, child in pl_module.named_children():
        if child is net or is_sharded(child):
            continue
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward)
            done.append(name)
    plain = [n for n, p in pl_module.named_parameters() if p.requires_grad and not is_dtensor(p)]
    if plain:
        raise RuntimeError(
            f"after sharding, trainable parameters are not sharded (they would not be averaged): {plain[:5]}"
        )
    return done


# ---------------------------------------------------------------------------- sharded tensors (DTensor)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded or replicated FSDP2 / tensor-parallel parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of a DTensor (a view, writes reach the
    parameter), else the parameter's data."""
    return param.to_local() if is_dtensor(param) else param.data


def full_tensor(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The full tensor of which ``local`` is this rank's shard laid out like ``param`` (a collective
    for DTensors: every rank must call it), on the CPU."""
    if not is_dtensor(param):
        return local.detach().cpu()
    from torch.distributed.tensor import DTensor

    dist = DTensor.from_local(
        local.to(param.device),
        param.device_mesh,
        param.placements,
        shape=param.shape,
        stride=param.stride(),
        run_check=False,
    )
    return dist.full_tensor().cpu()


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (a tensor of ``param``'s full shape) laid out like ``param``;
    no communication: every rank holds ``full``."""
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def reshard_fsdp(module: nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state. After a forward without backward (validation)
    the root module keeps its parameters unsharded, and its attributes are then plain full tensors:
    a swap must see (and write) the shards, and the next forward must gather them again."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


# ---------------------------------------------------------------------------- compile


def compile_blocks(net: nn.Module, mode: str | None = None, dynamic: bool | None = None) -> int:
    """``torch.compile`` every block of ``net`` in place (the whole network when it declares no blocks);
    returns how many modules were compiled now (0 when they already were)."""
    targets = blocks_of(net) or [net]
    count = 0
    for module in targets:
        if getattr(module, COMPILED_FLAG, False):
            continue
        module.compile(mode=mode, dynamic=dynamic)
        setattr(module, COMPILED_FLAG, True)
        count += 1
    return count


# ---------------------------------------------------------------------------- optimizer


def use_fused_adamw(pl_module: Any, fused: bool | None, device: torch.device | None) -> bool:
    """Make the module's own AdamW fused (``fused=True``): when ``fused`` is True, or None and ``device`` is
    CUDA. Only modules that build the default AdamW (``optimizer_factory`` None, ``optimizer_settings`` set: see
    :mod:`vdiff.lit.optim`) are changed; an ``optimizer_class:`` named in the recipe is left as it is. Returns
    whether it was set."""
    if fused is False or getattr(pl_module, "optimizer_factory", "absent") is not None:
        return False
    if fused is None and (device is None or device.type != "cuda"):
        return False
    pl_module.optimizer_factory = functools.partial(
        torch.optim.AdamW, **pl_module.optimizer_settings.adamw_options(), fused=True
    )
    return True


# ---------------------------------------------------------------------------- entry point


def configure_scaling(pl_module: L.LightningModule, net: nn.Module, trainer: L.Trainer | None) -> dict[str, Any]:
    """Apply :class:`Scaling` (activation checkpointing, sharding, compile, fused AdamW) to ``net``, the
    module's freshly built (and hooked) network, in that order; see the module docstring. Returns what was
    done, for logs and tests."""
    options = scaling_of(trainer)
    done: dict[str, Any] = {}
    if options.activation_checkpointing:
        done["activation_checkpointing"] = enable_activation_checkpointing(net)
    mesh = getattr(pl_module, "device_mesh", None)
    if mesh is not None:
        done["sharded"] = shard_module(pl_module, net, mesh, options.reshard_after_forward)
    if options.compile:
        done["compiled"] = compile_blocks(net, options.compile_mode, options.compile_dynamic)
    device = trainer.strategy.root_device if trainer is not None else None
    done["fused_adamw"] = use_fused_adamw(pl_module, options.fused_adamw, device)
    return done


# ---------------------------------------------------------------------------- sharded checkpoints

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
OPTIMIZER_KEY = re.compile(r"^optimizer_(\d+)$")


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by torch.distributed.checkpoint (it holds ``.metadata``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file()


def optimizer_state_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's ``get_optimizer_state_dict`` layout: ``state``
    ``{name: {...}}``, each group's ``params`` a list of names) -> ``Optimizer.state_dict()``'s layout
    (parameters numbered in group order). A state already keyed by position is returned unchanged."""
    groups = state.get("param_groups", [])
    names = [p for group in groups for p in group.get("params", [])]
    if not names or not all(isinstance(p, str) for p in names):
        return state
    index = {name: i for i, name in enumerate(names)}
    by_name = state.get("state", {})
    unknown = sorted(set(by_name) - set(index))
    if unknown:
        raise ValueError(f"optimizer state for parameters no group lists: {unknown[:5]}")
    new_groups, start = [], 0
    for group in groups:
        count = len(group["params"])
        new_groups.append({**group, "params": list(range(start, start + count))})
        start += count
    return {"state": {index[name]: value for name, value in by_name.items()}, "param_groups": new_groups}


def load_sharded_checkpoint(folder: str | os.PathLike, optimizer: bool = True) -> dict[str, Any]:
    """A sharded checkpoint folder (Lightning's ``ModelParallelStrategy`` / ``FSDPStrategy`` with sharded
    state, written by torch.distributed.checkpoint) as the dict of a normal single-file checkpoint, on one
    process: full tensors under ``state_dict``, optimizer states in ``torch.optim`` layout under
    ``optimizer_states`` (left out when ``optimizer`` is False) and everything of ``meta.pt``. Nothing in the
    folder runs (:mod:`vdiff.lit.safe_loading`: DCP's index and entries and ``meta.pt`` are read without
    running code); an :class:`~vdiff.lit.safe_loading.UnsafeCheckpointError` names what was refused."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder} is already a single checkpoint file (nothing to consolidate)")
    if not is_sharded_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder}: not a sharded checkpoint folder (no {DCP_METADATA} file from torch.distributed.checkpoint)"
        )
    tensors = load_distributed_checkpoint(folder)
    meta = folder / META_FILE
    checkpoint: dict[str, Any] = load_checkpoint(meta) if meta.is_file() else {}
    optimizers: dict[int, Any] = {}
    # ModelParallelStrategy: state_dict, optimizer_0, ...; FSDPStrategy (and Fabric): model, optimizer_0, ...
    model_key = next((k for k in ("state_dict", "model") if k in tensors), None)
    if model_key is None:  # not Lightning's layout: keep the tensors as they are
        checkpoint["state_dict"] = tensors
    else:
        checkpoint["state_dict"] = tensors.pop(model_key)
        optimizers = {int(m.group(1)): v for k, v in tensors.items() if (m := OPTIMIZER_KEY.match(k))}
    if optimizer and optimizers:
        checkpoint["optimizer_states"] = [optimizer_state_by_position(optimizers[i]) for i in sorted(optimizers)]
    else:
        checkpoint.pop("optimizer_states", None)
    return checkpoint


# ---------------------------------------------------------------------------- FSDP1 (Lightning's FSDPStrategy)


def network_of(pl_module: nn.Module) -> nn.Module | None:
    """The network a vdiff module trains (``pl_module.net``), built by ``configure_model``."""
    return getattr(pl_module, "net", None)


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` (FSDP1, GPUs only) wrapping every block
    class the module's network declares (``net.block_classes()``) as its own FSDP unit.

    Args:
        activation_checkpointing: checkpoint each block (torch's ``checkpoint_wrapper`` inside its FSDP unit).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD`` or ``NO_SHARD``.
        state_dict_type: ``sharded`` (a folder of per-rank files; ``vdiff consolidate`` makes one file) or ``full``.
        use_orig_params: keep the original parameters visible (needed when frozen and trained parameters share
            an FSDP unit, e.g. the autoencoder beside the embedders, and for ``torch.compile``).
        cpu_offload: keep parameters and gradients in host memory between uses.
        limit_all_gathers: throttle all-gathers ahead of compute (bounds memory).
        kwargs: any other :class:`~lightning.pytorch.strategies.FSDPStrategy` argument.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "sharded",
        use_orig_params: bool = True,
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=use_orig_params,
            cpu_offload=cpu_offload or None,
            limit_all_gathers=limit_all_gathers,
            **kwargs,
        )
        self.block_checkpointing = bool(activation_checkpointing)

    def block_policy(self, pl_module: nn.Module) -> set[type[nn.Module]]:
        """The block classes of the module's network (an error when it declares none)."""
        net = network_of(pl_module)
        classes = block_classes(net) if net is not None else ()
        if not classes:
            raise ValueError(
                f"BlockFSDPStrategy: {type(pl_module).__name__}'s network "
                f"({type(net).__name__ if net is not None else 'not built'}) declares no block_classes(); "
                "give auto_wrap_policy explicitly"
            )
        return set(classes)

    def setup_environment(self) -> None:
        if self.root_device.type == "cpu":  # FSDP1 itself needs an accelerator; fail before any process group
            raise ValueError(
                "BlockFSDPStrategy (Lightning's FSDPStrategy, FSDP1) needs GPUs; to shard on CPU use "
                "ModelParallelStrategy (recipes/strategy/model_parallel_cpu.yaml), which vdiff shards with FSDP2"
            )
        super().setup_environment()

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        pl_module = self.lightning_module if self.lightning_module is not None else model
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(self.block_policy(pl_module))
        if self.block_checkpointing and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, self.block_policy(pl_module))
        return super()._setup_model(model)


def iter_compiled(net: nn.Module) -> Iterator[nn.Module]:
    """Modules of ``net`` compiled by :func:`compile_blocks`."""
    return (m for m in net.modules() if getattr(m, COMPILED_FLAG, False))
