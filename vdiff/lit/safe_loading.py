"""Reading checkpoint files without running code from them.

A ``.ckpt`` file is a pickle, and unpickling runs whatever callables the file names: a checkpoint someone
sends you, read by a plain unrestricted ``torch.load``, can run any code. Every checkpoint vdiff reads goes
through this module instead:

* :func:`load_checkpoint` reads a file with torch's ``weights_only`` unpickler, which builds tensors,
  containers and numbers, plus the plain-data classes vdiff itself puts in checkpoints (the config objects
  that a module built in Python keeps in its hyperparameters: ``VDTConfig``, ``SamplerConfig``,
  ``EDMDiffusion``, ``SVDConditioning`` ...);
* :func:`refusing_code` wraps Lightning's own loads (``load_from_checkpoint(..., weights_only=True)``, the
  CLI's ``--ckpt_path``) with the same allow-list and the same error;
* :func:`load_distributed_checkpoint` reads a sharded checkpoint folder (torch.distributed.checkpoint)
  whose index and non-tensor entries DCP itself would unpickle without restrictions.

Anything else is refused with :class:`UnsafeCheckpointError`: one message naming the file and the Python
objects it would have had to build.

Which classes are allowed: each module allow-lists the classes it writes when it is imported
(:func:`allow_config_objects_in_checkpoints`; :mod:`vdiff.lit.base` the shared and VDT/autoencoder configs,
:mod:`vdiff.lit.svd` SVD's and Vista's), so Lightning's own loads of a module's checkpoints work once the
module is imported. The loaders here import those modules first, because a checkpoint is read before the
class that wrote it is known. A config class of your own can be allowed the same way.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

# torch's message when its unpickler meets a global it does not allow ("GLOBAL exec was not an allowed global").
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.S)


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint holds Python objects that vdiff does not allow-list: building them could run code.
    ``str()`` names the file and the objects."""


def allow_config_objects_in_checkpoints(*classes: type | tuple[type, str]) -> None:
    """Let ``torch.load(weights_only=True)`` (vdiff's loaders and Lightning's) build these classes: vdiff's
    config objects that modules built in Python keep in their hyperparameters. Only data-holding classes
    whose construction runs no code of the file's choosing belong here. A ``(class, "module.OldName")`` pair
    builds the class where a checkpoint names it by a path it had before a rename."""
    torch.serialization.add_safe_globals(list(classes))


def _allow_vdiff_classes() -> None:
    """Import every vdiff module that allow-lists the classes it writes (they do so when imported)."""
    import vdiff.lit.base  # noqa: F401  shared parts (diffusion, sampler, guidance, masks, protocol), VDT, autoencoder
    import vdiff.lit.svd  # noqa: F401  UNet-SVD, SVD's conditioning and image encoder (VistaModule too)


def _refused_objects(source: str | os.PathLike | BinaryIO, err: BaseException) -> list[str]:
    """The globals of ``source`` that torch's ``weights_only`` unpickler refuses (read statically, without
    unpickling), else the one named in ``err``."""
    names: list[str] = []
    try:
        if not isinstance(source, (str, os.PathLike)):
            source.seek(0)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # noqa: BLE001 - not a torch.save zip file: fall back to torch's message
        names = []
    return sorted(set(names)) or _REFUSED_GLOBAL.findall(str(err))


def refusal_message(name: str, objects: list[str], reason: str = "") -> str:
    """The one-line refusal for the file (or entry) ``name`` holding the Python ``objects``."""
    if objects:
        listed = ", ".join(f"`{o}`" for o in objects)
        plural = "s" if len(objects) > 1 else ""
        return (
            f"{name}: refused to load: it contains the Python object{plural} {listed}, which vdiff does not "
            "allow in checkpoints; loading it could run code. Load only checkpoints you trust; a plain-data "
            "config class of your own can be allowed with "
            "vdiff.lit.safe_loading.allow_config_objects_in_checkpoints(TheClass)."
        )
    return f"{name}: refused to load: torch cannot read it without running code ({reason or 'not a checkpoint'})"


@contextmanager
def refusing_code(source: str | os.PathLike, file: BinaryIO | None = None) -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` (vdiff's or Lightning's) builds vdiff's
    allow-listed classes, and a refused file is raised as :class:`UnsafeCheckpointError` naming ``source``.
    ``file``: the bytes being read when they are not the file ``source`` itself (an entry of a folder)."""
    _allow_vdiff_classes()
    try:
        yield
    except UnsafeCheckpointError:
        raise
    except pickle.UnpicklingError as err:
        reason = _UNPICKLER_REASON.search(str(err))
        objects = _refused_objects(source if file is None else file, err)
        raise UnsafeCheckpointError(
            refusal_message(str(source), objects, reason.group(1) if reason else str(err).splitlines()[0])
        ) from err


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", mmap: bool = False
) -> Any:
    """The object in the checkpoint file ``path`` (usually the checkpoint dict), read with
    ``weights_only=True`` and vdiff's allow-listed classes; :class:`UnsafeCheckpointError` when it holds
    anything else. ``mmap``: map the tensors instead of reading them (for reading a few entries of a large
    file; ignored for files in torch's legacy format, which cannot be mapped)."""
    mmap = mmap and zipfile.is_zipfile(path)
    with refusing_code(path):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


# ----------------------------------------------------------------------------------------------
# Sharded folders (torch.distributed.checkpoint)
# ----------------------------------------------------------------------------------------------

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` index (DCP reads it with plain ``pickle.load``) allowing only the
    data classes DCP writes there: its metadata dataclasses, shapes, dtypes, layouts and relative paths."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module == _DCP_METADATA_MODULE:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # its dataclasses and enums, nothing imported
                return obj
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} was not an allowed global")


def _read_dcp_metadata(folder: Path) -> Any:
    """The ``.metadata`` index of a DCP folder, unpickled without running code (:class:`UnsafeCheckpointError`)."""
    from vdiff.lit.scaling import DCP_METADATA

    index = folder / DCP_METADATA
    with refusing_code(index), index.open("rb") as stream:
        return _DCPMetadataUnpickler(stream).load()


def check_distributed_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse a torch.distributed.checkpoint folder that would run code when Lightning resumes from it: DCP
    unpickles its ``.metadata`` index and its non-tensor entries without limits. Only those are read (no tensor):
    the index through :class:`_DCPMetadataUnpickler`, each entry with ``torch.load(weights_only=True)``;
    :class:`UnsafeCheckpointError` names the file or entry and the refused objects."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    metadata = _read_dcp_metadata(folder)
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # tensors: DCP reads their bytes, it does not unpickle them
        if getattr(info, "transform_descriptors", None):  # compressed or otherwise transformed: read as DCP does
            load_distributed_checkpoint(folder)
            return
        with open(folder / info.relative_path, "rb") as stream:
            stream.seek(info.offset)
            value = io.BytesIO(stream.read(info.length))
        with refusing_code(f"{folder} (entry {index.fqn})", file=value):
            torch.load(value, map_location="cpu", weights_only=True)


def load_distributed_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The state dict saved in a torch.distributed.checkpoint folder (every rank's shards put together),
    on one process. Unlike DCP's own readers, the ``.metadata`` index and the non-tensor entries are read
    without running code (:class:`UnsafeCheckpointError` otherwise); tensors are read as DCP reads them."""
    # What dcp_to_torch_save does (its private planner and loader), with the two unpicklers replaced.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    metadata = _read_dcp_metadata(folder)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # DCP's own unpickles with pickle.load
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(_EmptyStateDictLoadPlanner):  # rebuilds the state dict from the metadata
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # DCP reads non-tensor entries with an unrestricted torch.load: check them with vdiff's
            # loader first (a pickle that loads with weights_only=True builds the same allowed objects either way).
            with refusing_code(f"{folder} (entry {read_item.dest_index.fqn})", file=value):
                torch.load(value, map_location="cpu", weights_only=True)
            value.seek(0)
            super().load_bytes(read_item, value)

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=True)
    except CheckpointException as err:  # DCP collects each rank's exception: raise the refusal itself
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeCheckpointError)]
        if refused:
            raise refused[0] from refused[0].__cause__  # torch's own error stays the cause
        raise
    return state
