"""Pretrained autoencoders that a recipe can name by ``class_path``: local weights, loaded at construction.

A recipe writes::

    model:
      init_args:
        autoencoder:
          class_path: vdiff.models.pretrained.PretrainedAutoencoder
          init_args: {path: weights/sd-vae-ft-mse.safetensors, layout: diffusers, preset: sd}

LightningCLI builds the model (and so this autoencoder) before ``fit`` starts, so a missing or
mismatched weights file fails before any data is read or any step is taken.

Why a subclass of :class:`~vdiff.models.autoencoder.VideoAutoencoder` and not a wrapper holding one:
the loaded module *is* a VideoAutoencoder - same parameter names (checkpoints of a module trained with
either load into the other), same ``encode``/``decode`` with chunking and tiling, same contract
attributes (``scale_factor``, ``shift_factor``, ``latent_channels``, ``spatial_downsample``,
``temporal_downsample``) - with nothing to delegate and nothing to keep in sync.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder, sd_vae_config, svd_vae_config

Preset = Literal["auto", "sd", "svd"]
PRESETS = {"sd": sd_vae_config, "svd": svd_vae_config}
README_SECTION = 'README section "Pretrained weights"'


class PretrainedAutoencoder(VideoAutoencoder):
    """A :class:`VideoAutoencoder` whose weights come from a LOCAL file, read when it is constructed.

    Args:
        path: weights file (.safetensors, .pt, .ckpt). A relative path that does not exist is also
            looked up in ``$VDIFF_WEIGHTS``; nothing is downloaded.
        layout: key names in the file: ``"diffusers"`` (``AutoencoderKL`` / ``AutoencoderKLTemporalDecoder``,
            e.g. ``sd-vae-ft-mse``), ``"sgm"`` (the original SVD checkpoint) or ``"vdiff"``
            (:meth:`VideoAutoencoder.save_pretrained`).
        preset: architecture, ``"sd"`` (SD 2.1 VAE: 8x, 4 channels, 2D decoder), ``"svd"`` (SVD's
            temporal decoder) or ``"auto"``: the config stored in a vdiff file, else SVD when the file
            has temporal decoder weights and SD otherwise.
        scale_factor: latent scale override (None keeps the preset's or file's, 0.18215 for SD).

    Raises:
        FileNotFoundError: the file is neither at ``path`` nor under ``$VDIFF_WEIGHTS``; the message
            names both places and the README section on pretrained weights.
        ConversionError: the file's tensors do not fit the architecture (missing / mis-shaped keys).
    """

    def __init__(
        self,
        path: str,
        layout: Literal["vdiff", "diffusers", "sgm"] = "diffusers",
        preset: Preset = "auto",
        scale_factor: float | None = None,
    ) -> None:
        # Local imports: vdiff.weights sits above vdiff.models in the layering and imports it.
        from vdiff.weights.autoencoder_convert import load_autoencoder_state_dict
        from vdiff.weights.safetensors_io import resolve_weights_path

        if preset != "auto" and preset not in PRESETS:
            raise ValueError(f"PretrainedAutoencoder: preset must be 'auto' or one of {sorted(PRESETS)}, got {preset!r}")
        try:
            resolved = resolve_weights_path(path, what=f"PretrainedAutoencoder weights file {os.fspath(path)!r}")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} See the {README_SECTION}.") from None
        config: AutoencoderConfig | None = PRESETS[preset]() if preset != "auto" else None
        state_dict, config = load_autoencoder_state_dict(resolved, layout=layout, config=config)
        if scale_factor is not None:
            if not scale_factor > 0:
                raise ValueError(f"PretrainedAutoencoder: scale_factor must be > 0, got {scale_factor}")
            config = dataclasses.replace(config, scale_factor=float(scale_factor))
        super().__init__(config)
        self.load_state_dict(state_dict, strict=True)
        self.weights_path = str(resolved)
        self.layout = layout

    def extra_repr(self) -> str:
        # getattr: repr may run while __init__ is still loading (e.g. in a traceback).
        path, layout = getattr(self, "weights_path", None), getattr(self, "layout", None)
        return f"path={path!r}, layout={layout!r}, scale_factor={getattr(self, 'scale_factor', None)}"
