"""Checkpoints that survive a crash, and resumes that continue exactly where a run stopped.

``vdiff fit`` installs all of this by default (:mod:`vdiff.lit.cli`); a plain ``lightning.Trainer``
can use the pieces directly:

* :class:`AtomicCheckpointIO` - a ``CheckpointIO`` plugin that writes ``<path>.tmp`` in the target
  folder, flushes and fsyncs it, then ``os.replace``-s it over ``<path>`` (and fsyncs the folder). A
  process killed mid-save leaves the previous checkpoint intact (and at worst a stale ``.tmp``).
  Lightning's own writer serialises into memory and moves a file from the system temp folder, which
  is a non-atomic copy when that folder lies on another file system.
* :class:`AtomicModelCheckpoint` - Lightning's ``ModelCheckpoint`` whose ``save_last="link"``
  replaces ``last.ckpt`` atomically too (Lightning removes the old link, then creates the new one),
  and which keeps its ``last.ckpt`` bookkeeping on resume when the same folder is spelled
  differently (relative vs absolute ``save_dir``). Every other write goes through the trainer's
  ``CheckpointIO``. On SIGTERM (what schedulers send before a time limit or a preemption) it writes
  ``last.ckpt`` once the current step is done, says so in one line, and the process exits with
  status 143 (128 + SIGTERM) instead of Lightning's 0, so a ``&&`` chain stops and a requeue script
  sees it (:meth:`AtomicModelCheckpoint.on_exception`).
* :class:`RNGState` - a callback that saves the global torch (CPU and CUDA), numpy and python
  ``random`` states in checkpoints and restores them when training resumes, so mask sampling,
  diffusion noise and timesteps continue the uninterrupted run's sequence bitwise.
* :func:`find_last_checkpoint` / :func:`resume_plan` - what ``--ckpt_path last`` resumes: the newest
  ``last*.ckpt`` of the run (same logger ``save_dir`` and ``name``), and the version folder to
  continue logging into.
* :func:`load_ema_weights` / :func:`has_ema_weights` - the EMA weights a checkpoint holds
  (``checkpoint["ema_state_dict"]``, :data:`EMA_KEY`: full fp32 tensors by parameter name, as the
  ``EMA`` callback writes them), put in place of the trained ones.

How :class:`RNGState` keeps the random stream exact: the training stream is *owned* by the training
batches. At the end of every training batch the callback records the global states, and at the
start of the next training batch it puts them back. Whatever runs in between - validation (which
draws noise and masks), the creation of data-loader iterators (each draws a seed from the global
torch generator), checkpoint writing, other callbacks - therefore leaves training randomness
unchanged, and a checkpoint (written between two batches) holds exactly the state the next batch
starts from. Lightning restores callback states before it builds the data loaders and before
``on_train_start``; the saved state is applied at the first resumed batch, after all of that.
Under DDP every rank's states are gathered into the checkpoint (rank 0 writes it) and each rank
restores its own; with a different world size the states are not restored (a warning says so).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from vdiff.lit.safe_loading import UnsafeCheckpointError, check_distributed_checkpoint, load_checkpoint
from vdiff.lit.scaling import is_sharded_checkpoint

TMP_SUFFIX = ".tmp"
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM  # 143: the shell's status of a process ended by SIGTERM
EMA_KEY = "ema_state_dict"  # checkpoint entry: the EMA callback's averaged weights, full fp32 tensors by name
_LAST_PATTERN = re.compile(rf"^{re.escape(ModelCheckpoint.CHECKPOINT_NAME_LAST)}(-v\d+)?\.ckpt$")
_VERSION_PATTERN = re.compile(r"^version_(\d+)$")


class ResumeError(FileNotFoundError):
    """``--ckpt_path last`` found nothing to resume from (the message names the folders searched)."""


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial ``path``: write ``<path>.tmp`` beside it,
    fsync, ``os.replace``, fsync the folder. On an exception the ``.tmp`` is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see :func:`atomic_torch_save`); remote
    (``s3://`` ...) paths use Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = str(path)[len("file://"):] if str(path).startswith("file://") else str(path)
        atomic_torch_save(checkpoint, local)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with an atomic ``save_last="link"`` and path-spelling-proof resume
    bookkeeping (see the module docstring). Arguments are ``ModelCheckpoint``'s; its state is stored
    under ``ModelCheckpoint``'s key, so checkpoints of either class resume with the other."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Lightning 2.6 writes `last.ckpt` at the end of validation only when a top-k checkpoint was
        # written at the same step, so with `save_top_k: 0` (vdiff's default) and the default
        # epoch trigger, validation inside an epoch never left anything to resume from.
        if (
            self.save_last
            and self._every_n_epochs >= 1
            and (trainer.current_epoch + 1) % self._every_n_epochs == 0
            and not self._should_skip_saving_checkpoint(trainer)
            and not self._should_save_on_train_epoch_end(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # Lightning 2.6 writes `last.ckpt` at the end of training only when nothing was saved before,
        # so a run with periodic checkpoints ended with a stale `last.ckpt`: write the final state.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException):
            self._stop_on_sigterm(trainer, exception)

    def _stop_on_sigterm(self, trainer: L.Trainer, exception: SIGTERMException) -> None:
        """Lightning's SIGTERM handler only sets ``trainer.received_sigterm``; its loops raise
        ``SIGTERMException`` (a ``SystemExit`` with status 0) once the current step (or validation batch)
        is done. Write ``last.ckpt`` (unless it already holds this step), say where in one line, and make
        the exit status 143."""
        if exception.code is None:
            exception.code = SIGTERM_EXIT_STATUS
        step = trainer.global_step
        if trainer.state.fn != TrainerFn.FITTING:
            where = "not training, no checkpoint written"
        elif trainer.sanity_checking or step == 0:
            where = "nothing trained yet, no checkpoint written"
        elif not self.save_last:
            where = "no checkpoint written (checkpoint.save_last is off)"
        else:
            if self._last_global_step_saved != step or not self.last_model_path:
                save_last = self.save_last
                self.save_last = True  # a file, not a link to an older top-k checkpoint
                try:
                    self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
                finally:
                    self.save_last = save_last
            where = f"saved {self.last_model_path}; continue with --ckpt_path last"
        if trainer.is_global_zero:
            print(f"vdiff: stopped by SIGTERM at step {step} (epoch {trainer.current_epoch}): {where} "
                  f"(exit status {exception.code})", file=sys.stderr, flush=True)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            tmp = linkpath + TMP_SUFFIX
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
                os.replace(tmp, linkpath)
            except OSError:
                # no symlinks (e.g. Windows without the privilege): an atomic copy
                if os.path.lexists(tmp):
                    os.remove(tmp)
                shutil.copyfile(filepath, tmp)
                os.replace(tmp, linkpath)
            _fsync_dir(os.path.dirname(os.path.abspath(linkpath)))
        trainer.strategy.barrier()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        if (
            stored
            and self.dirpath
            and stored != self.dirpath
            and _is_local(str(stored))
            and _is_local(str(self.dirpath))
            and os.path.realpath(stored) == os.path.realpath(self.dirpath)
        ):
            # The same folder spelled differently: re-spell the stored paths so that `last.ckpt` is
            # overwritten (Lightning would otherwise start `last-v1.ckpt` beside it).
            state_dict = dict(state_dict, dirpath=self.dirpath)
            for key in ("last_model_path", "best_model_path", "kth_best_model_path"):
                value = state_dict.get(key)
                if value and os.path.realpath(os.path.dirname(value)) == os.path.realpath(self.dirpath):
                    state_dict[key] = os.path.join(str(self.dirpath), os.path.basename(value))
        super().load_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------
# Random states
# ----------------------------------------------------------------------------------------------


def capture_rng_states() -> dict[str, Any]:
    """The global random states: torch CPU (and every CUDA device), numpy, python ``random``.

    Only tensors, ints, floats and strings, so checkpoints stay loadable with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_states` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(f"RNGState: the checkpoint has {len(cuda)} CUDA generator states, this process sees "
                          f"{torch.cuda.device_count()} devices; CUDA random states are not restored", stacklevel=2)


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RNGState(L.Callback):
    """Save the global random states in checkpoints and continue them exactly on resume.

    The global torch / numpy / python states are recorded at the end of every training batch and
    put back at the start of the next one (so validation, data-loader creation and checkpointing
    between batches do not shift training randomness), saved in checkpoints, and restored at the
    first training batch after a resume. See the module docstring.
    """

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, Any] | None = None  # this rank's state for the next training batch
        self._loaded: dict[str, Any] | None = None  # from a checkpoint, applied at the next batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._loaded is not None:
            self._state = self._pick(self._loaded, trainer.global_rank, trainer.world_size)
            self._loaded = None
        if self._state is not None:
            restore_rng_states(self._state)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._state = capture_rng_states()

    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None and self._state is None:  # saved again before any resumed batch
            return self._loaded
        state = self._state if self._state is not None else capture_rng_states()
        rank, world = _dist_world()
        if world == 1:
            return {"world_size": 1, "ranks": [state]}
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, state)
        return {"world_size": world, "ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict
        self._state = None

    @staticmethod
    def _pick(loaded: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
        ranks = loaded.get("ranks") or []
        if int(loaded.get("world_size", len(ranks))) != world or rank >= len(ranks):
            warnings.warn(
                f"RNGState: the checkpoint holds random states of {len(ranks)} rank(s), this run has {world}; "
                "global random states are not restored (training randomness will differ from an uninterrupted run)",
                stacklevel=2,
            )
            return None
        return ranks[rank]


# ----------------------------------------------------------------------------------------------
# Finding what to resume
# ----------------------------------------------------------------------------------------------


def last_checkpoints_in(folder: str | os.PathLike) -> list[Path]:
    """``last.ckpt`` / ``last-vN.ckpt`` files in ``folder`` (not ``.tmp`` leftovers), newest mtime first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # A sharded checkpoint (ModelParallelStrategy, FSDP) is a folder named like the file.
    found = [p for p in folder.iterdir() if _LAST_PATTERN.match(p.name) and (p.is_file() or is_sharded_checkpoint(p))]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def find_last_checkpoint(root_dir: str | os.PathLike, version: int | str | None = None) -> Path | None:
    """The ``last*.ckpt`` a run under logger root ``root_dir`` (``save_dir/name``) resumes from.

    With ``version`` given: that version folder only. Otherwise the *highest-numbered*
    ``version_N`` folder that holds one (version numbers, not file times, decide: copying or touching
    files does not change the choice; a newer run that crashed before its first checkpoint is skipped).
    Folders with other names (string versions) are only used when given as ``version``. Within a
    folder, the newest file by mtime when there are several (``last.ckpt``, ``last-v1.ckpt``).
    """
    root = Path(root_dir)
    if version is not None:
        name = version if isinstance(version, str) else f"version_{version}"
        found = last_checkpoints_in(root / name / "checkpoints")
        return found[0] if found else None
    if not root.is_dir():
        return None
    versions = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _VERSION_PATTERN.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, folder in versions:
        found = last_checkpoints_in(folder / "checkpoints")
        if found:
            return found[0]
    return None


@dataclass
class ResumePlan:
    """What ``vdiff fit --ckpt_path ...`` resumes and where the run writes.

    ckpt_path: the checkpoint file. version: the logger version to continue (None: the logger's own
    choice). log_dir: where logs and checkpoints go (None when unknown).
    """

    ckpt_path: str
    version: int | str | None
    log_dir: str | None


def _version_of_folder(name: str) -> int | str:
    m = _VERSION_PATTERN.match(name)
    return int(m.group(1)) if m else name


def resume_plan(
    ckpt_path: str,
    logger_root: str | None,
    logger_version: int | str | None,
    checkpoint_dirpath: str | None,
    default_root_dir: str | None = None,
) -> ResumePlan:
    """Resolve ``ckpt_path`` (``"last"`` or a file) against the run's folders.

    logger_root: the first logger's ``save_dir/name`` (None without a versioned logger).
    logger_version: the version the user fixed in the logger (None: the next free one).
    checkpoint_dirpath: ``ModelCheckpoint(dirpath=...)`` when set (then ``last`` is looked for there).
    default_root_dir: the trainer's, where checkpoints go without a logger.

    Raises :class:`ResumeError` when ``"last"`` finds nothing; the message names the folders searched.
    """
    if ckpt_path == "last":
        if checkpoint_dirpath:
            found = last_checkpoints_in(checkpoint_dirpath)
            where = f"{checkpoint_dirpath} (checkpoint.dirpath)"
            found_path = found[0] if found else None
        elif logger_root is not None:
            found_path = find_last_checkpoint(logger_root, logger_version)
            if logger_version is not None:
                name = logger_version if isinstance(logger_version, str) else f"version_{logger_version}"
                where = os.path.join(logger_root, name, "checkpoints")
            else:
                where = os.path.join(logger_root, "version_*", "checkpoints")
        else:
            folder = os.path.join(default_root_dir or os.getcwd(), "checkpoints")
            found = last_checkpoints_in(folder)
            found_path = found[0] if found else None
            where = folder
        if found_path is None:
            searched = os.path.abspath(where.split(" (")[0])
            raise ResumeError(
                f"--ckpt_path last: nothing to resume, no last.ckpt in {where}"
                + ("" if searched == where else f" (searched {searched})")
                + ". Start a new run without --ckpt_path, or give a checkpoint file: --ckpt_path PATH."
            )
        ckpt_path = str(found_path)
    elif not (Path(ckpt_path).is_file() or is_sharded_checkpoint(ckpt_path)):
        if _is_local(ckpt_path):
            raise ResumeError(f"--ckpt_path {ckpt_path}: no such checkpoint file (or sharded checkpoint folder)")
        return ResumePlan(ckpt_path, None, None)
    # Continue in the checkpoint's version folder when it lies in this logger's tree.
    version: int | str | None = None
    log_dir: str | None = None
    if logger_root is not None and not checkpoint_dirpath:
        ckpt = Path(ckpt_path).resolve()
        root = Path(logger_root).resolve()
        if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == root:
            folder = ckpt.parent.parent.name
            found_version = _version_of_folder(folder)
            if logger_version is None or logger_version == found_version:
                version = found_version
                log_dir = os.path.join(logger_root, folder)
    return ResumePlan(ckpt_path, version, log_dir)


def checkpoint_position(path: str) -> str:
    """``"epoch E, step S"`` of a checkpoint (read memory-mapped), or ``""`` when unreadable. A file that
    would run code when loaded is refused (:class:`~vdiff.lit.safe_loading.UnsafeCheckpointError`); so is a
    sharded checkpoint folder whose DCP index or non-tensor entries would, or whose ``meta.pt`` would."""
    if Path(path).is_dir():
        check_distributed_checkpoint(path)
        path = str(Path(path) / "meta.pt")
        if not Path(path).is_file():
            return ""
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - only for a status line; Lightning reports real load errors
        return ""
    return f"epoch {ckpt.get('epoch', '?')}, step {ckpt.get('global_step', '?')}"


# ----------------------------------------------------------------------------------------------
# EMA weights in a checkpoint
# ----------------------------------------------------------------------------------------------


def load_ema_weights(module: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Copy ``checkpoint["ema_state_dict"]`` into ``module`` if present; return whether it was. A name the
    module lacks is an error (KeyError naming it)."""
    ema = checkpoint.get(EMA_KEY)
    if not ema:
        return False
    params = dict(module.named_parameters())
    missing = [n for n in ema if n not in params]
    if missing:
        raise KeyError(f"EMA weights name parameters the module lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value.to(params[name].dtype))
    return True


def has_ema_weights(path: str | os.PathLike) -> bool:
    """Whether the training checkpoint at ``path`` holds EMA weights (read without running code; tensors
    mapped, not read)."""
    return bool(load_checkpoint(path, mmap=True).get(EMA_KEY))
