"""LightningCLI set-up for ``vdiff fit|validate|test|predict``.

Recipes name a LightningModule and a LightningDataModule by ``class_path`` (subclass mode), so a
researcher's own subclass trains through the same command. Modules build their own optimizers
from ``OptimizerCallable`` arguments (parameter groups and frozen weights matter), so the CLI's
automatic ``optimizer:`` block is off.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


class VdiffLightningCLI(LightningCLI):
    """LightningCLI with vdiff's defaults: any module / data module by class path, checkpoints kept."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        # `last.ckpt` is always written so that `--ckpt_path last` resumes a crashed run.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})


def build_lightning_cli(args: list[str] | None, run: bool = True) -> VdiffLightningCLI:
    return VdiffLightningCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "vdiff", "description": "vdiff: train and evaluate video diffusion models from recipes."},
        args=args,
        run=run,
    )
