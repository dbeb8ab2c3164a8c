"""The ``vdiff`` command line.

``vdiff fit|validate|test|predict -c recipes/X.yaml``
    A :class:`lightning.pytorch.cli.LightningCLI` in subclass mode: the recipe names the
    LightningModule and LightningDataModule by ``class_path`` and their typed ``init_args``, so an
    unknown or mistyped key fails before any training with a message naming it.
``vdiff data synth|inspect|shards|cityscapes|nuscenes ...``
    Data tools (argparse). Each tool module exposes ``add_arguments(parser)`` and ``run(args)``.
``vdiff sample ...`` / ``vdiff encode ...``
    Sampling from a checkpoint and pre-encoding video shards to latent shards.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Tool name -> module path. A tool module exposes add_arguments(parser) and run(args) -> int.
DATA_TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("vdiff.data.synthetic", "write procedurally generated driving video shards (with actions)"),
    "inspect": ("vdiff.data.inspect", "summarise shards: counts, durations, fps/resolution, undecodable samples"),
    "shards": ("vdiff.data.convert.folder", "a folder of videos -> shards (scene cuts, motion filter, resumable)"),
    "cityscapes": ("vdiff.data.convert.cityscapes", "Cityscapes leftImg8bit_sequence -> 30-frame clip shards"),
    "nuscenes": ("vdiff.data.convert.nuscenes", "nuScenes CAM_FRONT -> 10 Hz shards with actions"),
    "opendv": ("vdiff.data.convert.opendv", "long driving videos + trim metadata -> 10 Hz clips without actions"),
}
TOP_TOOLS: dict[str, tuple[str, str]] = {
    "sample": ("vdiff.sample", "sample videos from a checkpoint: a task, input video or shards -> mp4s + PNG grid"),
    "encode": ("vdiff.encode", "video shards -> latent shards through an autoencoder"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _tool_help(tools: dict[str, tuple[str, str]], prefix: str) -> str:
    return "\n".join(f"  {prefix}{name:<12} {text}" for name, (_, text) in tools.items())


OVERVIEW = f"""vdiff: Lightning-based latent video diffusion (VDT, SVD-style UNets, video autoencoders).

Training and evaluation (LightningCLI; see `vdiff fit --help`):
  vdiff fit -c recipes/quickstart.yaml      train from a recipe
  vdiff validate|test|predict -c RECIPE --ckpt_path CKPT
  vdiff fit -c RECIPE --print_config         show the full resolved recipe

Data tools (`vdiff data TOOL --help`):
{_tool_help(DATA_TOOLS, "vdiff data ")}

Other commands:
{_tool_help(TOP_TOOLS, "vdiff ")}
"""


def _run_tool(module_path: str, prog: str, description: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(module_path)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    return int(module.run(args) or 0)


def data_main(argv: Sequence[str]) -> int:
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
    return _run_tool(module_path, f"vdiff data {tool}", text, argv[1:])


class VdiffCLI:
    """Builds the LightningCLI lazily so that `vdiff data ...` does not pay for importing Lightning."""

    @staticmethod
    def run(argv: Sequence[str] | None) -> None:
        from vdiff.lit.cli import build_lightning_cli

        build_lightning_cli(None if argv is None else list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # vdiff never downloads at run time
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return 0
    command = argv[0]
    if command == "data":
        return data_main(argv[1:])
    if command in TOP_TOOLS:
        module_path, text = TOP_TOOLS[command]
        return _run_tool(module_path, f"vdiff {command}", text, argv[1:])
    if command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        print(f"vdiff: unknown command {command!r}\n\n{OVERVIEW}", file=sys.stderr)
        return 2
    # LightningCLI reads sys.argv itself when run from the shell (it warns when given both).
    VdiffCLI.run(None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
