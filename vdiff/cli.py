"""The ``vdiff`` command line.

``vdiff fit|validate|test|predict -c recipes/X.yaml``
    A :class:`lightning.pytorch.cli.LightningCLI` in subclass mode: the recipe names the
    LightningModule and LightningDataModule by ``class_path`` and their typed ``init_args``, so an
    unknown or mistyped key fails before any training with a message naming it.
``vdiff data synth|inspect|shards|cityscapes|nuscenes ...``
    Data tools (argparse). Each tool module exposes ``add_arguments(parser)`` and ``run(args)``.
``vdiff sample ...`` / ``vdiff encode ...``
    Sampling from a checkpoint and pre-encoding video shards to latent shards.

Errors, the same for every command. A user's mistake (:mod:`vdiff.errors`: a missing or unreadable
file or folder, a checked bad value; for ``fit|validate|test|predict`` a recipe mistake, see
:mod:`vdiff.lit.cli`) is printed as one line, ``vdiff COMMAND: error: MESSAGE`` (for the Lightning
commands followed by a pointer to ``vdiff COMMAND --help``), and ``vdiff`` exits with status 2.
Anything else (a bug, a failure while training) keeps its traceback. ``VDIFF_DEBUG=1`` (or
``--debug`` before any command, or anywhere on a ``fit|validate|test|predict`` command line) shows
the full traceback of user errors too. Called from Python with ``argv`` (tests, notebooks),
:func:`main` lets every exception propagate.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vdiff import __version__
from vdiff.cpu_threads import share_cores_fairly
from vdiff.errors import debug_requested, error_message, is_user_error

# Tool name -> module path. A tool module exposes add_arguments(parser) and run(args) -> int.
DATA_TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("vdiff.data.synthetic", "write procedurally generated driving video shards (with actions)"),
    "inspect": ("vdiff.data.inspect", "summarise shards: counts, durations, fps/resolution, undecodable samples"),
    "shards": ("vdiff.data.convert.folder", "a folder of videos -> shards (scene cuts, motion filter, resumable)"),
    "cityscapes": ("vdiff.data.convert.cityscapes", "Cityscapes leftImg8bit_sequence -> 30-frame clip shards"),
    "nuscenes": ("vdiff.data.convert.nuscenes", "nuScenes CAM_FRONT -> 10 Hz shards with actions"),
    "opendv": ("vdiff.data.convert.opendv", "long driving videos + trim metadata -> 10 Hz clips without actions"),
    "motion-buckets": ("vdiff.data.motion_buckets", "fit SVD's motion_bucket_id map to a shard set's motion scores"),
}
TOP_TOOLS: dict[str, tuple[str, str]] = {
    "sample": ("vdiff.sample", "sample videos from a checkpoint: a task, input video or shards -> mp4s + PNG grid"),
    "encode": ("vdiff.encode", "video shards -> latent shards through an autoencoder"),
    "export": ("vdiff.export", "a checkpoint's network (EMA weights, LoRA merged or not) -> safetensors"),
    "evaluate": ("vdiff.evaluate", "video-quality metrics (PSNR/SSIM/LPIPS/FVD/FID) between two folders or shard sets"),
    "consolidate": ("vdiff.consolidate", "a sharded checkpoint folder (FSDP/ModelParallel) -> one checkpoint file"),
    "weights": ("vdiff.weights.tool", "pretrained weights: list the presets, download ahead of a job, verify hashes"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _tool_help(tools: dict[str, tuple[str, str]], prefix: str) -> str:
    return "\n".join(f"  {prefix}{name:<16} {text}" for name, (_, text) in tools.items())


OVERVIEW = f"""vdiff: Lightning-based latent video diffusion (VDT, SVD-style UNets, video autoencoders).

Training and evaluation (LightningCLI; see `vdiff fit --help`):
  vdiff fit -c recipes/quickstart.yaml      train from a recipe
  vdiff validate|test|predict -c RECIPE --ckpt_path CKPT
  vdiff fit -c RECIPE --print_config         show the full resolved recipe

Data tools (`vdiff data TOOL --help`):
{_tool_help(DATA_TOOLS, "vdiff data ")}

Other commands:
{_tool_help(TOP_TOOLS, "vdiff ")}

A mistake (a missing file, a bad option or recipe value) prints one line, `vdiff COMMAND: error: ...`
(exit status 2); set VDIFF_DEBUG=1 or add --debug to see the full traceback.
`vdiff fit -c RECIPE --ckpt_path last` resumes a run. `vdiff --version` prints the version.
"""


def _rows(rows: Sequence[tuple[str, str]], width: int = 40) -> str:
    return "\n".join(f"  {left:<{width}} {right}" if len(left) <= width else f"  {left}\n  {'':<{width}} {right}"
                     for left, right in rows)  # fmt: skip


COMMON = "Common options (every recipe key can be set on the command line as --section.key VALUE):"
FIT_HELP = f"""vdiff fit: train the model a recipe describes (recipes/*.yaml).

usage: vdiff fit -c RECIPE [-c MORE.yaml ...] [--KEY VALUE ...]

{COMMON}
{_rows([
    ("-c, --config FILE", "a recipe; later -c files and --KEY VALUE options override it"),
    ("--print_config", "print the resolved recipe and exit (nothing is trained)"),
    ("--ckpt_path last|FILE", "resume the newest run of the recipe (last), or from a checkpoint"),
    ("--trainer.max_steps N", "training steps"),
    ("--trainer.max_time DD:HH:MM:SS", "stop training after this long (null: no time limit)"),
    ("--trainer.accelerator gpu|cpu", "and --trainer.devices N, --trainer.precision bf16-mixed"),
    ("--trainer.logger.init_args.save_dir DIR", "where runs, logs and checkpoints go"),
    ("--data.init_args.train SHARDS", "training shards, e.g. a folder `vdiff data shards` wrote"),
    ("--data.init_args.batch_size N", "clips per batch and device"),
    ("--model.init_args.KEY VALUE", "an argument of the recipe's model (--model.help CLASS lists them)"),
])}

Recipes:
{_rows([
    ("vdiff fit -c recipes/quickstart.yaml", "a small VDT on synthetic driving clips (CPU)"),
    ("... --trainer.max_steps 200", "the same, shorter"),
    ("... --ckpt_path last", "resume it after a crash"),
    ("... --print_config > my.yaml", "start a recipe of your own"),
    ("vdiff fit -c recipes/vdt_cityscapes.yaml -c recipes/strategy/ddp.yaml", "on several GPUs"),
])}
"""
LIGHTNING_HELP: dict[str, str] = {"fit": FIT_HELP}
for _command, _split in (("validate", "val"), ("test", "test"), ("predict", "predict")):
    LIGHTNING_HELP[_command] = f"""vdiff {_command}: run a checkpoint on the {_split} data of a recipe.

usage: vdiff {_command} -c RECIPE --ckpt_path FILE|last [--KEY VALUE ...]

{COMMON}
{_rows([
    ("-c, --config FILE", "the recipe the checkpoint was trained with"),
    ("--ckpt_path FILE|last", "the checkpoint (last: the newest run of the recipe)"),
    (f"--data.init_args.{_split} SHARDS", "the shards to read"),
    (f"--trainer.limit_{_split}_batches N", "only the first N batches"),
    ("--print_config", "print the resolved recipe and exit"),
])}
"""


def _print_lightning_help(command: str) -> None:
    """``vdiff fit --help``: what a user looks for first, printed before Lightning is imported (seconds: it imports
    torchmetrics, which imports torchvision and transformers); jsonargparse's full list of options follows."""
    print(LIGHTNING_HELP[command], flush=True)
    print("All options (loading Lightning...)\n", flush=True)


def tool_parser(module_path: str, prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of one tool (``vdiff data shards``, ``vdiff sample`` ...): its module's
    ``add_arguments``. Parsing with it checks a command line without running the tool (tests check the
    commands the docs show with it)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    importlib.import_module(module_path).add_arguments(parser)
    return parser


def _run_tool(module_path: str, prog: str, description: str, argv: Sequence[str], catch: bool) -> int:
    """Parse ``argv`` with the tool's arguments and run it. With ``catch`` (from the shell, no debug switch) a
    user error (:func:`vdiff.errors.is_user_error`) is one line on stderr and exit status 2; anything else, and
    every error without ``catch``, propagates with its traceback."""
    module = importlib.import_module(module_path)
    args = tool_parser(module_path, prog, description).parse_args(list(argv))
    try:
        return int(module.run(args) or 0)
    except Exception as err:
        if not catch or not is_user_error(err):
            raise
        print(f"{prog}: error: {error_message(err, prog)}", file=sys.stderr)
        return 2


def data_main(argv: Sequence[str], catch: bool = False) -> int:
    parser = argparse.ArgumentParser(
        prog="vdiff data",
        description="vdiff data tools",
        epilog=_tool_help(DATA_TOOLS, ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("tool", choices=sorted(DATA_TOOLS), help="which tool")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    tool = argv[0]
    if tool not in DATA_TOOLS:
        parser.error(f"unknown data tool {tool!r}; choose from {', '.join(sorted(DATA_TOOLS))}")
    module_path, text = DATA_TOOLS[tool]
    return _run_tool(module_path, f"vdiff data {tool}", text, argv[1:], catch)


class VdiffCLI:
    """Builds the LightningCLI lazily so that `vdiff data ...` does not pay for importing Lightning."""

    @staticmethod
    def run(argv: Sequence[str] | None) -> None:
        from vdiff.lit.cli import build_lightning_cli

        build_lightning_cli(None if argv is None else list(argv))


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``VDIFF_DEBUG`` set (not 0/empty), or ``--debug`` in ``argv`` (removed from it)."""
    debug = debug_requested()
    if "--debug" in argv:
        debug = True
        argv = [a for a in argv if a != "--debug"]
    return debug, argv


def _run_lightning(command: str, argv: list[str], from_command_line: bool, debug: bool) -> int:
    """Run a LightningCLI command. From the shell a :class:`~vdiff.lit.cli.RecipeError` is printed as
    one message (exit status 2); called with ``argv`` (tests, notebooks) it propagates."""
    if not from_command_line:
        VdiffCLI.run(argv)
        return 0
    from vdiff.lit.cli import RecipeError

    # LightningCLI reads sys.argv itself when run from the shell (it warns when given both).
    sys.argv = [sys.argv[0], *argv]
    try:
        VdiffCLI.run(None)
    except RecipeError as err:
        if debug:
            raise
        prog = f"vdiff {command}" if command in LIGHTNING_COMMANDS else "vdiff"
        print(f"{prog}: error: {err}", file=sys.stderr)
        print(f"See `{prog} --help` for the options; VDIFF_DEBUG=1 shows the full traceback.", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    share_cores_fairly()  # before torch is imported: waiting OpenMP threads sleep, not spin (vdiff.cpu_threads)
    debug = False
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"vdiff {__version__}")
        return 0
    command = argv[0]
    catch = from_command_line and not (debug or debug_requested())
    if command == "data":
        return data_main(argv[1:], catch)
    if command in TOP_TOOLS:
        module_path, text = TOP_TOOLS[command]
        return _run_tool(module_path, f"vdiff {command}", text, argv[1:], catch)
    if command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        print(f"vdiff: unknown command {command!r}\n\n{OVERVIEW}", file=sys.stderr)
        return 2
    env_debug, argv = _debug_requested(argv)
    if command in LIGHTNING_HELP and any(a in ("-h", "--help") for a in argv[1:]):
        _print_lightning_help(command)
    return _run_lightning(command, argv, from_command_line, debug or env_debug)


if __name__ == "__main__":
    sys.exit(main())
