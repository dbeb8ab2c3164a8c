"""Pretrained autoencoders that a recipe can name by ``class_path``: local weights, loaded at construction.

A recipe writes::

    model:
      init_args:
        autoencoder:
          class_path: vdiff.weights.pretrained.PretrainedAutoencoder
          init_args: {path: weights/sd-vae-ft-mse, config: sd}   # a diffusers folder, or a file

LightningCLI builds the model (and so this autoencoder) before ``fit`` starts, so a missing or
mismatched weights file fails before any data is read or any step is taken.

Why a subclass of :class:`~vdiff.models.autoencoder.VideoAutoencoder` and not a wrapper holding one:
the loaded module *is* a VideoAutoencoder - same parameter names (checkpoints of a module trained with
either load into the other), same ``encode``/``decode`` with chunking and tiling, same contract
attributes (``scale_factor``, ``shift_factor``, ``latent_channels``, ``spatial_downsample``,
``temporal_downsample``) - with nothing to delegate and nothing to keep in sync. It lives in the weights
layer because reading files is this layer's job; the model file knows no format.
"""

from __future__ import annotations

import dataclasses
import os

from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder import LoadLayout, read_autoencoder
from vdiff.weights.template import record_weights

README_SECTION = 'README section "Pretrained weights"'


class PretrainedAutoencoder(VideoAutoencoder):
    """A :class:`VideoAutoencoder` whose weights come from a LOCAL file or diffusers folder, read when it is
    constructed by :func:`vdiff.weights.autoencoder.read_autoencoder` (the loader behind ``load_autoencoder``).

    Args:
        path: a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a
            pipeline folder with ``vae/``; recommended: the config comes with the weights) or a weights file
            (.safetensors, .pt, .ckpt), or a hub id ``hf://ORG/NAME[/PATH]`` of either (fetched into the Hugging
            Face cache on first use). A relative path that does not exist is also looked up in ``$VDIFF_WEIGHTS``.
        layout: ``"auto"`` (detected), ``"diffusers"`` (``AutoencoderKL`` / ``AutoencoderKLTemporalDecoder``,
            e.g. ``sd-vae-ft-mse``), ``"sgm"`` (the original SVD checkpoint) or ``"vdiff"``
            (:func:`vdiff.weights.autoencoder.save_autoencoder`).
        config: the architecture: an :class:`AutoencoderConfig` (a mapping in YAML), a ``.json`` file of its
            fields, a preset name of ``AUTOENCODER_CONFIGS`` (``"sd"``, ``"svd"``, ...) or None: the config stored with the weights (a
            folder's ``config.json``, a vdiff file's metadata), else a guess with a warning. A bare file gives
            neither its GroupNorm group count nor its scale / shift factors: pass them here.
        scale_factor: latent scale override (None keeps the config's, 0.18215 for SD).

    Attributes:
        weights_path: absolute path of the weights FILE read (inside the folder for a diffusers folder; a
            ``config.json`` beside it is read again when this path is loaded).
        layout: the layout read (``"vdiff"``, ``"diffusers"`` or ``"sgm"``; never ``"auto"``).
        weights_sha256: hex SHA-256 of that file, computed once at construction.
        config_file: absolute path of the ``config.json`` the config was read from (a diffusers folder's, or the
            one beside a bare diffusers file), None when it came from a vdiff file's metadata or the arguments.
        config_file_content: that file's JSON object as read at construction (checkpoints record it: a config
            edited beside unchanged weights is refused on resume and on load).

    Raises:
        FileNotFoundError: the file is neither at ``path`` nor under ``$VDIFF_WEIGHTS``; the message
            names both places and the README section on pretrained weights.
        AutoencoderConfigError: a config vdiff cannot represent, or one contradicting the stored config.
        ConversionError: the file's tensors do not fit the architecture (missing / mis-shaped / unused keys).
    """

    def __init__(
        self,
        path: str,
        layout: LoadLayout = "auto",
        config: AutoencoderConfig | str | None = None,
        scale_factor: float | None = None,
    ) -> None:
        if scale_factor is not None and not scale_factor > 0:
            raise ValueError(f"PretrainedAutoencoder: scale_factor must be > 0, got {scale_factor}")
        try:
            weights = read_autoencoder(path, layout=layout, config=config)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"PretrainedAutoencoder weights {os.fspath(path)!r}: {error} See the {README_SECTION}."
            ) from None
        cfg = weights.config
        if scale_factor is not None:
            cfg = dataclasses.replace(cfg, scale_factor=float(scale_factor))
        super().__init__(cfg)
        self.load_state_dict(weights.state_dict, strict=True)
        record_weights(self, weights)

    def extra_repr(self) -> str:
        # getattr: repr may run while __init__ is still loading (e.g. in a traceback).
        path, layout = getattr(self, "weights_path", None), getattr(self, "layout", None)
        return f"path={path!r}, layout={layout!r}, scale_factor={getattr(self, 'scale_factor', None)}"
