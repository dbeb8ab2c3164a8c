"""LightningCLI set-up for ``vdiff fit|validate|test|predict``.

Recipes name a LightningModule and a LightningDataModule by ``class_path`` (subclass mode), so a
researcher's own subclass trains through the same command. Modules build their own optimizers
from ``OptimizerCallable`` arguments (parameter groups and frozen weights matter), so the CLI's
automatic ``optimizer:`` block is off.

Crash-safe training, installed by default (see :mod:`vdiff.lit.checkpointing`):

* the ``checkpoint:`` group is an :class:`~vdiff.lit.checkpointing.AtomicModelCheckpoint` that always
  keeps ``last.ckpt``, and every checkpoint is written atomically
  (:class:`~vdiff.lit.checkpointing.AtomicCheckpointIO`, unless the recipe names its own CheckpointIO);
* an :class:`~vdiff.lit.checkpointing.RNGState` callback saves and restores the global random states;
* a :class:`~vdiff.lit.progress.StepProgressBar` counts steps to ``max_steps`` with the time left (unless the
  recipe names a progress bar or turns it off), and a recipe's ``trainer.max_time`` becomes a
  :class:`~vdiff.lit.time_budget.TimeBudget`, which says in one line when it ends training before ``max_steps``;
* ``--ckpt_path last`` resumes the newest ``last.ckpt`` of the run - the highest ``version_N`` under
  the logger's ``save_dir/name`` that holds one - *into that same version folder*, and fails before
  any training when there is none. ``--ckpt_path FILE`` also continues in the checkpoint's version
  folder when the file lies in the logger's tree. One line on stderr says what is resumed and where
  the run writes.

Errors in a recipe or on the command line (unknown keys, bad values, missing weight files, nothing to
resume) raise :class:`RecipeError` (a ``ValueError``) with one readable message: jsonargparse's nested
union explanations shrink to the failing key and class (:func:`argument_error_message`), and errors
raised while building the recipe's objects show their innermost cause (:func:`user_error`); anything
that looks like a bug keeps its exception and traceback. ``vdiff`` prints the message (see
:mod:`vdiff.cli`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ProgressBar, Timer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO

from vdiff.data.datamodule import DataPathError
from vdiff.errors import error_message, is_user_error, root_cause
from vdiff.lit.checkpointing import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    ResumeError,
    RNGState,
    checkpoint_position,
    resume_plan,
)
from vdiff.lit.optim import FLAT_OPTIMIZER_ARGUMENTS, migrate_flat_optimizer_arguments
from vdiff.lit.progress import StepProgressBar
from vdiff.lit.safe_loading import UnsafeCheckpointError, refusing_code
from vdiff.lit.time_budget import TimeBudget
from vdiff.lit.weights_check import check_recipe_weights


class RecipeError(ValueError):
    """A mistake in the recipe or on the command line, found while parsing it or building its objects
    (an unknown key, a bad value, a missing weights file, nothing to resume, a data folder without
    shards): ``str()`` is the one message a user needs; ``__cause__`` holds the original exception and
    its traceback."""


def user_error(err: BaseException) -> BaseException | None:
    """The exception a user should read in ``err``'s chain of causes, or None when it looks like a bug.

    jsonargparse wraps errors raised while instantiating classes in several ``ValueError``s
    ("Does not validate against any of the Union subtypes"); the innermost cause is the real one.
    It is shown as a message when it is a user error by :func:`vdiff.errors.is_user_error` with
    ``library_checks`` (the libraries check the recipe's values: a ValueError / TypeError / LookupError /
    ImportError raised by an explicit ``raise`` in any code, e.g. ``ConversionError``; an OSError such as a
    missing file or a ``ResumeError``) or a Lightning ``MisconfigurationException``.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    root = root_cause(err)
    if isinstance(root, MisconfigurationException) or is_user_error(root, library_checks=True):
        return root
    return None


def recipe_message(err: BaseException) -> str:
    """The one-line message of a user error found while building or running a recipe; a data path is named
    by its recipe key (``data.init_args.train: ...``)."""
    if isinstance(err, DataPathError):
        return f"data.init_args.{err.argument}: {err.detail}"
    return error_message(err)


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)\s*(?:<([^>`]*)>)?`")  # :class:`~a.B`, :ref:`text <x>`
_LITERAL = re.compile(r"``(.+?)``")
_DIRECTIVE = re.compile(r"\.\. (\w+)::\s*")


def plain_text(text: str) -> str:
    """Docstring text without Sphinx markup, for ``--help``: ``:class:`~a.b.C``` -> ``C`` (``a.b.C`` without the
    ``~``), ``:ref:`text <target>``` -> ``text``, double backquotes dropped, ``.. warning::`` -> ``Warning:``."""

    def role(match: re.Match) -> str:
        short, title, target = match.groups()
        if target is not None:
            return title or target
        return title.rsplit(".", 1)[-1] if short else title

    text = _LITERAL.sub(r"\1", _ROLE.sub(role, text))
    return _DIRECTIVE.sub(lambda m: f"{m.group(1).capitalize()}: ", text)


class VdiffHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter over :func:`plain_text`: the help of recipe options comes from docstrings
    (Lightning's and vdiff's), written for Sphinx."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain_text(text), width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain_text(text), width, indent)

    def start_section(self, heading: str | None) -> None:  # a group's title: its class docstring's first line
        super().start_section(None if heading is None else plain_text(heading))


_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)$')
_CLASS_PATH = re.compile(r"^- Problem with given class_path '(?P<cls>[^']+)':\s*(?P<rest>.*)$")
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: .*|Given value type: .*|Given value: .*)$"
)
_NONE_ALTERNATIVE = re.compile(r"^- Expected a <class 'NoneType'>")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _leaves(lines: list[str], context: tuple[str, ...]) -> list[str]:
    """Leaf messages of a jsonargparse error block, each prefixed with the keys/classes leading to it."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        text = line.strip()
        # the lines of this entry's nested block: the following, more indented lines
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > _indent(line)):
            j += 1
        block = lines[i + 1 : j]
        i = j
        if text == "Errors:":  # the alternatives of a union
            out.extend(_leaves(block, context))
            continue
        if not text or _NOISE.match(text) or _NONE_ALTERNATIVE.match(text):
            continue  # union noise, and the "or None" alternative of every Optional argument
        match = _PARSER_KEY.match(text) or _CLASS_PATH.match(text)
        if match:
            name = match.groupdict().get("key") or match.group("cls")
            rest = match.group("rest").strip()
            if rest:
                out.append(": ".join((*context, name, rest)))
            out.extend(_leaves(block, (*context, name)))
            continue
        text = text[2:] if text.startswith("- ") else text
        out.append(": ".join((*context, text)) if context else text)
        out.extend(_leaves(block, context))
    return out


def argument_error_message(message: str) -> str:
    """jsonargparse's nested error text -> the message(s) that matter, one per line.

    ``Parser key "model": ... Problem with given class_path 'X': Option 'lrr' is not accepted ...``
    becomes ``model: X: Option 'lrr' is not accepted``.
    """
    leaves = list(dict.fromkeys(_leaves(message.splitlines(), ())))
    return "\n".join(leaves) if leaves else message.strip()


class VdiffLightningCLI(LightningCLI):
    """LightningCLI with vdiff's defaults: any module / data module by class path, checkpoints kept
    and written atomically, exact resumes, and errors raised instead of printed with the usage."""

    def init_parser(self, **kwargs: Any):
        # Raise parse errors (vdiff.cli prints them as one message) instead of printing the usage.
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("formatter_class", VdiffHelpFormatter)  # --help without Sphinx markup
        return super().init_parser(**kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # one line instead of argparse's 60 lines of [--option VALUE]; `vdiff fit --help` prints the common options
        parser.usage = f"vdiff {subcommand} -c RECIPE [--KEY VALUE ...]"
        return parser

    def parse_arguments(self, parser: Any, args: Any) -> None:
        from jsonargparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise RecipeError(argument_error_message(str(err))) from err
        subcommand = self.config.get("subcommand")
        warning = dropped_ema_warning(self.config[subcommand] if subcommand else self.config)
        if warning:
            _rank_zero_print(warning)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a checkpoint's hyperparameters into the config (torch.load, weights_only=True):
        # same error handling, and a file that would run code is refused in one message naming it.
        from jsonargparse import ArgumentError

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        try:
            with refusing_code(str(ckpt_path)):
                super()._parse_ckpt_path()
        except ArgumentError as err:
            raise RecipeError(argument_error_message(str(err))) from err
        except UnsafeCheckpointError as err:
            raise RecipeError(str(err)) from err
        self._move_flat_optimizer_arguments()

    def _move_flat_optimizer_arguments(self) -> None:
        """A checkpoint written before the ``optimizer`` group brings flat ``lr``, ``betas``... with its hyperparameters
        (as ``dict_kwargs``: no argument takes them now): move them into the group, with a warning, as
        ``load_from_checkpoint`` does (:func:`vdiff.lit.optim.migrate_flat_optimizer_arguments`)."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        extra = model.get("dict_kwargs") if model is not None else None
        if not extra:
            return
        group = model.get("init_args.optimizer")
        hparams = {"optimizer": group.as_dict() if hasattr(group, "as_dict") else group, **extra}
        if not migrate_flat_optimizer_arguments(hparams, str(model.get("class_path"))):
            return
        for name in FLAT_OPTIMIZER_ARGUMENTS:
            extra.pop(name, None)
        if not extra:
            del model["dict_kwargs"]
        moved = {subcommand: {"model": {"class_path": model["class_path"], "init_args": {"optimizer": hparams["optimizer"]}}}}
        self.config = self.parser.parse_object(moved, self.config)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # `last.ckpt` is always written so that `--ckpt_path last` resumes a crashed run.
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})

    def instantiate_classes(self) -> None:
        try:
            subcommand = self.config.get("subcommand")
            # every missing weights file named at once, before the first loader stops at its own
            check_recipe_weights(self.config[subcommand] if subcommand else self.config)
            super().instantiate_classes()
        except DataPathError as err:  # from check_data: named by its recipe key
            raise RecipeError(recipe_message(err)) from err
        except Exception as err:
            cause = user_error(err)
            if cause is None:
                raise
            raise RecipeError(recipe_message(cause)) from err

    def _run_subcommand(self, subcommand: str) -> None:
        # A data module that checks its paths only in setup (not in check_data): still one message.
        try:
            super()._run_subcommand(subcommand)
        except DataPathError as err:
            raise RecipeError(recipe_message(err)) from err

    # ------------------------------------------------------------------ trainer

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        check_data = getattr(self.datamodule, "check_data", None)
        if self.subcommand is not None and callable(check_data):
            check_data(self.subcommand)  # a missing or empty data folder fails before the trainer starts
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if not any(isinstance(c, RNGState) for c in callbacks):
            callbacks.append(RNGState())
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())  # steps of max_steps and the time left, not `Epoch 19/-2`
        if config.get("max_time") is not None and "max_time" not in kwargs and not any(
            isinstance(c, Timer) for c in callbacks
        ):  # Lightning's Timer, which says in one line when the budget ends training before max_steps
            callbacks.append(TimeBudget(config["max_time"]))
            kwargs["max_time"] = None
        kwargs.setdefault("callbacks", callbacks)
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs.setdefault("plugins", plugins)
        if self.subcommand is not None:
            self._resolve_ckpt_path(config, kwargs)
        tips = _WithoutLightningTips()  # the Trainer advertises Lightning's cloud logger while it is built
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(tips)
        try:
            return super().instantiate_trainer(**kwargs)
        finally:
            logging.getLogger("lightning.pytorch.utilities.rank_zero").removeFilter(tips)

    def _resolve_ckpt_path(self, trainer_config: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """Turn ``--ckpt_path last`` into a file (or fail) and, for ``fit``, point the logger at the
        checkpoint's version folder, before the trainer is built."""
        sub = self.config_init[self.subcommand]
        if sub.get("weights_only") is None:  # Lightning would read the file with torch's default: never run its code
            sub["weights_only"] = True
        ckpt_path = sub.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
            return
        logger = kwargs.get("logger", trainer_config.get("logger"))
        default_root_dir = trainer_config.get("default_root_dir") or os.getcwd()
        if logger is None or logger is True:
            logger = _default_logger(default_root_dir)
            kwargs["logger"] = logger
        loggers = [] if logger is False else list(logger) if isinstance(logger, (list, tuple)) else [logger]
        first = loggers[0] if loggers else None
        if first is not None and not (hasattr(first, "root_dir") and hasattr(first, "_version")):
            if ckpt_path == "last":  # a logger whose folders we do not know: Lightning's own lookup
                return
            first = None
        checkpoint = self._get(self.config_init, "checkpoint", default=None)
        dirpath = getattr(checkpoint, "dirpath", None)
        plan = resume_plan(
            str(ckpt_path),
            logger_root=None if first is None else str(first.root_dir),
            logger_version=None if first is None else first._version,
            checkpoint_dirpath=None if dirpath is None else str(dirpath),
            default_root_dir=default_root_dir,
        )
        sub["ckpt_path"] = plan.ckpt_path
        try:
            position = checkpoint_position(plan.ckpt_path)  # refuses a file that would run code, before training
        except UnsafeCheckpointError as err:
            raise RecipeError(str(err)) from err
        if self.subcommand != "fit":
            return
        if plan.version is not None:
            for each in loggers:  # every logger writing under the same root continues that version
                if (
                    isinstance(each, Logger)
                    and hasattr(each, "_version")
                    and hasattr(each, "root_dir")
                    and os.path.realpath(each.root_dir) == os.path.realpath(first.root_dir)
                ):
                    each._version = plan.version
        writes = plan.log_dir or (first.log_dir if first is not None else None)
        if dirpath:
            writes = f"{writes} (checkpoints: {dirpath})" if writes else str(dirpath)
        _rank_zero_print(
            f"vdiff fit: resuming from {plan.ckpt_path}{f' ({position})' if position else ''}; "
            f"writing to {writes or default_root_dir}"
        )


def _callback_class_paths(callbacks: Any) -> list[str]:
    """The class paths of a recipe's ``trainer.callbacks`` value (a list of class_path/init_args mappings)."""
    items = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
    paths = []
    for item in items:
        class_path = item if isinstance(item, str) else item.get("class_path") if hasattr(item, "get") else None
        paths.append(str(class_path if class_path is not None else type(item).__name__))
    return paths


def _is_ema(class_path: str) -> bool:
    # By class name: vdiff.lit sits below vdiff.callbacks (EMA, or a subclass named like it).
    return class_path.rsplit(".", 1)[-1].endswith("EMA")


def dropped_ema_warning(config: Any) -> str | None:
    """One line when a recipe file of ``config`` (the parsed config of one subcommand; its ``config`` entry
    lists the ``-c`` files) lists an EMA callback but the final ``trainer.callbacks`` has none: a later ``-c``
    file with ``callbacks:`` or ``--trainer.callbacks`` replaced the list (``callbacks+:`` appends). None otherwise."""
    import yaml

    trainer = config.get("trainer") or {}
    if any(_is_ema(path) for path in _callback_class_paths(trainer.get("callbacks"))):
        return None
    for file in config.get("config") or []:
        if not hasattr(file, "get_content"):  # an inline config string, not a file
            continue
        try:
            recipe = yaml.safe_load(file.get_content())
        except (OSError, yaml.YAMLError):  # already read by the parser; nothing to say about it here
            continue
        recipe_trainer = recipe.get("trainer") if isinstance(recipe, dict) else None
        if not isinstance(recipe_trainer, dict):
            continue
        listed = [p for key in ("callbacks", "callbacks+") for p in _callback_class_paths(recipe_trainer.get(key))]
        if any(_is_ema(path) for path in listed):
            return (
                f"vdiff: warning: {file} lists an EMA callback but this run has none: a later -c file or "
                "--trainer.callbacks replaced the callback list (append with `callbacks+:` as in recipes/callbacks/, "
                "or --trainer.callbacks+=CLASS)"
            )
    return None


class _WithoutLightningTips(logging.Filter):
    """Drops Lightning's product tips ("💡 Tip: ... try installing litlogger"), not meant for vdiff's users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def _default_logger(default_root_dir: str) -> Logger:
    """The logger Lightning builds for ``logger: true`` (built here so that its version can be set)."""
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
    from lightning.fabric.plugins.environments.slurm import SLURMEnvironment
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE:
        return TensorBoardLogger(save_dir=default_root_dir, version=SLURMEnvironment.job_id())
    return CSVLogger(save_dir=default_root_dir)


def _rank_zero_print(message: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, file=sys.stderr, flush=True)


def build_lightning_cli(args: list[str] | None, run: bool = True) -> VdiffLightningCLI:
    return VdiffLightningCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        # allow_abbrev=False: a mistyped option (`--trainer.max_step`) is an error, not silently another option.
        parser_kwargs={"prog": "vdiff", "description": "vdiff: train and evaluate video diffusion models from recipes.",
                       "allow_abbrev": False},
        args=args,
        run=run,
    )


__all__ = ["RecipeError", "ResumeError", "VdiffLightningCLI", "build_lightning_cli", "dropped_ema_warning", "user_error"]
