"""``vdiff consolidate CKPT_DIR OUT``: a sharded checkpoint folder -> one normal checkpoint file.

Sharded runs (``ModelParallelStrategy`` + FSDP2, see ``recipes/strategy/model_parallel_cpu.yaml``, or
``BlockFSDPStrategy`` with ``state_dict_type: sharded``) save every checkpoint as a folder: one
``__<rank>_0.distcp`` file per rank with that rank's shards of the weights and optimizer states
(torch.distributed.checkpoint, DCP), plus Lightning's ``meta.pt`` with everything else (epoch, step,
callback states, hyperparameters, EMA weights as full tensors, vdiff's entries). Resuming a sharded run reads
the folder directly (``--ckpt_path`` FOLDER, with any number of ranks).

This tool gathers the folder into the single file every other vdiff command reads (``vdiff sample``,
``vdiff export``, ``vdiff test --ckpt_path``, ``load_module``), on one process and without a GPU:

* the model's full tensors under ``state_dict`` (DCP's shards put together, as
  :func:`torch.distributed.checkpoint.format_utils.dcp_to_torch_save` does, but without running code from the
  folder: :func:`vdiff.lit.safe_loading.load_distributed_checkpoint`);
* the optimizer states as ``optimizer_states`` in ``torch.optim`` layout (DCP stores them keyed by
  parameter name; here they are keyed by position, as ``Optimizer.state_dict()`` gives them), so a
  single-process or DDP run can resume from the file; ``--no-optimizer`` leaves them out (a smaller file);
* everything in ``meta.pt`` unchanged.

    vdiff consolidate runs/x/version_0/checkpoints/last.ckpt runs/x/last-full.ckpt

The file is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vdiff.lit.scaling import load_sharded_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="a sharded checkpoint folder (*.distcp files, .metadata, meta.pt)"
    )
    parser.add_argument("out", type=Path, help="the checkpoint file to write")
    parser.add_argument("--no-optimizer", action="store_true", help="leave the optimizer states out")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def consolidate(folder: str | os.PathLike, out: str | os.PathLike, optimizer: bool = True) -> dict[str, Any]:
    """Write the single-file checkpoint of the sharded checkpoint ``folder`` to ``out`` (atomically); returns it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = load_sharded_checkpoint(folder, optimizer=optimizer)
    handle, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, out)
    finally:
        Path(partial).unlink(missing_ok=True)
    return checkpoint


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists (use --overwrite to replace it)")
    checkpoint = consolidate(args.checkpoint, args.out, optimizer=not args.no_optimizer)
    state = checkpoint["state_dict"]
    numel = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    where = (
        f"epoch {checkpoint['epoch']}, step {checkpoint['global_step']}"
        if "global_step" in checkpoint
        else "no trainer state"
    )
    optim = len(checkpoint.get("optimizer_states", []))
    print(f"{args.out}: {len(state)} tensors ({numel / 1e6:.2f} M values), {optim} optimizer state(s), {where}")
    return 0
