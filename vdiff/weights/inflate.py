"""Inflate a Stable Diffusion 2.1 image UNet into SVD's video UNet (:class:`vdiff.models.unet_svd.UNetSVD`).

What SVD did first (Blattmann et al., 2023): take an image UNet, keep its layers as the "spatial" half of every
block pair, add the temporal layers, and train. :func:`load_inflated_state_dict` builds that starting point from
a LOCAL SD-2.1-style image UNet, such that **the video UNet computes exactly what the image UNet computes, frame
by frame**, until training moves the new layers.

Entry points: :func:`load_inflated_state_dict` (``path, config -> state dict``, for ``SVDModule`` to load),
:func:`inflate_unet` (a built :class:`UNetSVD`), and ``python -m vdiff.weights.inflate SRC OUT.safetensors`` (writes
a vdiff UNet-SVD file that ``SVDModule(net_weights=...)`` reads like any other).

Sources (local, or a hub id ``hf://ORG/NAME[/PATH]`` fetched first; a relative path that does not exist is also
looked up under ``$VDIFF_WEIGHTS``):

``diffusers``  a ``UNet2DConditionModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, the
               ``.fp16`` variant, a sharded index or ``.bin``), or a pipeline folder holding it under ``unet/``
               (``stabilityai/stable-diffusion-2-1``). The architecture comes from ``config.json``; every field is
               checked, and one vdiff cannot represent exactly is an :class:`InflationError` naming the file
               and the field.
``sgm``        the original single file (``v2-1_768-ema-pruned.safetensors`` / ``.ckpt``): the UNet under
               ``model.diffusion_model.`` (ldm's ``UNetModel``, whose names are those of sgm's ``VideoUNet``
               without its temporal layers); the VAE, the text encoder and the schedule buffers in the file are
               not read. Such files hold no config: the ``config`` argument gives it (default: the ``svd``
               preset, whose spatial half IS SD 2.1: 320/640/1280/1280, head dim 64, context 1024).

Mapping. Every spatial parameter of the video UNet takes the image UNet's tensor of the same role (the names
of :func:`vdiff.weights.unet_svd.peer_names`; diffusers' video ResBlock names are the image ones under
``spatial_res_block.``; self-attention q/k/v and cross-attention k/v are stacked into ``qkv`` / ``kv``; a 1x1
``proj_in`` / ``proj_out`` conv of a non-linear-projection UNet becomes the same Linear). Every tensor of the
image UNet is used; :data:`DROPPED` lists the ones deliberately left out (none). Anything missing, mis-shaped
or left over is one :class:`~vdiff.weights.unet_svd.UNetSVDConversionError` naming the keys and the file.

Differences between SD 2.1 and SVD's UNet, each handled explicitly:

- **input channels** (4 vs ``4 + concat_channels``): ``conv_in`` keeps SD's kernel on the first channels (the
  noisy latent; UNetSVD concatenates ``[x, concat]``) and gets ZERO kernels on the concat channels, so the
  conditioning-frame latent changes nothing until trained.
- **added time ids** (``fps_id``, ``motion_bucket_id``, ``cond_aug``; SD 2.1 has none): the embedder's first
  layer gets PyTorch's default init, its LAST layer is zero (weight and bias), so it adds exactly 0 to the
  timestep embedding.
- **context**: SD 2.1 cross-attends to 77 OpenCLIP text tokens of width 1024; UNetSVD takes ``(B, N, 1024)`` for
  any ``N`` (SVD: one CLIP image token). The weights do not depend on ``N``.
- **ResBlock GroupNorm epsilon**: SD 2.1 uses 1e-5 everywhere (ldm and diffusers alike), which is
  ``norm_eps="sgm"``; a config with ``norm_eps="diffusers"`` (diffusers' VIDEO UNet's 1e-6 in some blocks) is
  refused, since the inflated network would no longer equal the image one.
- **noise level**: UNetSVD embeds ``noise_level`` exactly as ``UNet2DConditionModel`` embeds its timestep with
  SD 2.1's ``flip_sin_to_cos=True, freq_shift=0`` (``[cos, sin]`` of ``t * 10000**(-i/half)``, width
  ``model_channels``, then the same Linear-SiLU-Linear), so the two networks agree for the SAME scalar: the
  video UNet must be given SD 2.1's DDPM timestep ``t`` (0..999), not EDM's ``c_noise = ln(sigma)/4``, for its
  spatial layers to see what they were trained on. :class:`SD21VScalingPrecond` is SVD's V-scaling
  preconditioning with that noise input (the sigma of a clip mapped to SD 2.1's timestep by
  :func:`sd21_timestep`); with it the EDM denoiser of the inflated model at ``sigma_t`` equals SD 2.1-v's
  x0-prediction at ``t`` (``tests/weights/test_inflate.py`` checks both).

Temporal layers and why the output is EXACTLY the image model's. The blocks blend ``lerp(s, t, 1 - alpha)``
(``alpha*s + (1-alpha)*t``, ``alpha = sigmoid(mix_factor)``). ``alpha`` cannot be made exactly 1 usefully: in
float32 ``sigmoid(m)`` rounds to 1.0 only for ``m`` above about 17, where its gradient (and the temporal branch's,
scaled by ``1 - alpha = 0``) vanishes, so the temporal layers would never train. Instead the temporal branch is
made to return its INPUT exactly, and ``lerp(s, s, w) == s`` bit for bit for any ``w``:

- temporal ResBlock ``t = s + conv2(...)``: ``conv2`` weight and bias zero, so ``t == s``;
- temporal transformer block: the input is ``h + frame_embed(frames)`` with the frame MLP's LAST layer zero (so
  ``+ 0``), and each of its four residual branches (``ff_in``, frame self-attention, cross-attention, ``ff``)
  ends in a zero projection (``ff_in.proj_out``, ``attn1.proj``, ``attn2.proj``, ``ff.proj_out``), so it returns
  ``h``;
- ``mix_factor`` keeps SVD's initial 0.5 (``alpha = 0.62``): gradients reach the temporal branch with weight
  ``1 - alpha``, the zero projections get non-zero gradients at the first step (as in zero-initialised residual
  branches), and the layers before them once those have moved.

Every other temporal tensor gets PyTorch's default init, drawn from a generator seeded with ``seed`` (the same
file and seed give the same tensors). The blends are then ``s + 0``-style operations on finite values, so the
equality holds for any input, not only approximately (the test measures the video UNet against
``UNet2DConditionModel`` frame by frame: the differences left are those of two implementations of the same
image network, SDPA vs diffusers' attention, about 1e-6).

Training the inflated model "temporal only" (``SVDModule(train="temporal")``) freezes everything
:meth:`UNetSVD.is_temporal_parameter` does not name, including the two NEW non-temporal parts above (the concat
kernels of ``conv_in`` and ``added_time_embed``): they then stay zero, so such a run learns neither from the
concat latent nor from the added time ids; :func:`new_parameter_names` names them for a recipe that should train
them too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.diffusion.ddpm import make_betas
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights.errors import WeightsConfigError, WeightsError
from vdiff.weights.safetensors_io import load_keys, load_state_dict
from vdiff.weights.template import (
    KeyMapper,
    Rule,
    build_loaded,
    check_known_fields,
    check_same,
    config_beside,
    config_refusal,
    detect_layout,
    model_folder,
    read_config_json,
    resolve_config,
    resolve_source,
    stacked,
)
from vdiff.weights.unet_svd import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_SUBFOLDER,
    DIFFUSERS_WEIGHTS,
    SGM_PREFIX,
    TARGET,
    diffusers_levels,
    expected_shapes,
    peer_names,
)

ImageLayout = Literal["auto", "diffusers", "sgm"]
IMAGE_LAYOUTS = ("auto", "diffusers", "sgm")
DIFFUSERS_IMAGE_CLASS = "UNet2DConditionModel"
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MERGE_FACTOR = 0.5  # SVD's initial mix_factor (vdiff.nn.unet_blocks' default)
DROPPED: tuple[str, ...] = ()  # image-UNet tensors deliberately not used by the inflation: none
# Fields the video config adds to the image UNet's; everything else must match the image UNet.
VIDEO_ONLY_FIELDS = ("concat_channels", "num_added_time_ids", "added_time_embed_dim", "num_frames",
                     "gradient_checkpointing", "cond_frame_time_embed", "action_dim")  # fmt: skip
# Vista's layers (UNetSVDConfig.cond_frame_time_embed / action_dim, where this vdiff has them): the given frames'
# time-embedding MLP starts as a copy of the main one, the cross-attention action projections at zero, so the
# inflated network still computes the image UNet.
_VISTA_OFF = {"cond_frame_time_embed": False, "action_dim": 0}
_COND_TIME_EMBED, _MAIN_TIME_EMBED = "cond_time_embed.", "time_embed."
# Temporal tensors set to zero (module docstring): temporal ResBlock conv2, the four residual-branch output
# projections of every temporal transformer block, the frame-index MLP's last layer.
_ZEROED = re.compile(
    r"(\.temporal\.conv2|\.temporal_blocks\.\d+\.(ff_in\.proj_out|attn1\.proj|attn2\.proj|ff\.proj_out)"
    r"|\.frame_embed\.2)\.(weight|bias)$"
)
_PROJ_1X1 = re.compile(r"\.proj_(in|out)\.weight$")  # 1x1 conv projections of non-linear-projection UNets

# UNet2DConditionModel.__init__ arguments: the value SD 2.1's architecture (and so UNetSVD's spatial half) needs.
# Fields handled separately are None here; a field not in this table is unknown and refused.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,  # [cos, sin] timestep features, as vdiff.nn.embeddings.timestep_embedding
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_DIFFUSERS_DEFAULTS: dict[str, Any] = {  # diffusers' defaults of the fields read below
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,  # diffusers' historical name for the number of heads
    "num_attention_heads": None,
    "time_embedding_dim": None,
}
# Fields that change nothing a float32 forward computes: a default sample size; fp16 attention upcasting; the
# head count of an addition embedding the model does not have; 1x1-conv vs linear projections (converted).
_DIFFUSERS_IGNORED = ("sample_size", "upcast_attention", "addition_embed_type_num_heads", "use_linear_projection")
# diffusers' defaults of the fixed fields, where they differ from the value required (config.json may omit them)
_DIFFUSERS_FIXED_DEFAULTS = {"cross_attention_dim": 1280}


InflationError = WeightsError  # an image UNet (its config or its file) that cannot be inflated exactly
# The key signs of an image UNet file's layouts: ldm/sgm (under model.diffusion_model. or bare), diffusers.
SIGNS = (
    ("sgm", lambda k: k.startswith(SGM_PREFIX) or k == "input_blocks.0.0.weight"),
    ("diffusers", lambda k: k.startswith(("down_blocks.", "mid_block."))),
)


#################################################################################
#                         SD 2.1's noise level mapping                          #
#################################################################################

SD21_SCHEDULE = {"schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}


def sd21_sigmas() -> Tensor:
    """SD 2.1's (and SD 1.x's) DDPM noise levels as EDM sigmas, ``sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for
    ``t = 0..999`` (scaled-linear betas 0.00085..0.012), float64 ``(1000,)``, increasing (0.0292 .. 14.6)."""
    s = SD21_SCHEDULE
    betas = make_betas(s["schedule"], s["num_timesteps"], s["beta_start"], s["beta_end"])
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def sd21_timestep(sigma: Tensor, quantize: bool = False) -> Tensor:
    """SD 2.1's DDPM timestep of EDM noise levels ``sigma`` (any shape): ``t`` with ``sd21_sigmas()[t] = sigma``,
    interpolated linearly in ``log sigma`` between integer steps (k-diffusion's ``sigma_to_t``) and clamped to
    ``[0, 999]`` (sigmas beyond 14.6 read as step 999); ``quantize`` rounds to the nearest step (sgm's
    ``DiscreteDenoiser``). Returned in ``sigma``'s float dtype; integer steps map back exactly."""
    log_sigmas = sd21_sigmas().log().to(sigma.device)  # (N,) increasing
    x = sigma.double().log().clamp(log_sigmas[0], log_sigmas[-1])
    upper = torch.searchsorted(log_sigmas, x.reshape(-1), right=True).clamp(1, len(log_sigmas) - 1).view(x.shape)
    lo, hi = log_sigmas[upper - 1], log_sigmas[upper]
    t = (upper - 1).double() + (x - lo) / (hi - lo)
    if quantize:
        t = t.round()
    return t.to(sigma.dtype if sigma.is_floating_point() else torch.float32)


class SD21VScalingPrecond:
    """SVD's V-scaling preconditioning (``c_skip = 1/(s^2+1)``, ``c_out = -s/sqrt(s^2+1)``, ``c_in = 1/sqrt(s^2+1)``)
    with SD 2.1's noise input ``c_noise = sd21_timestep(sigma)`` instead of EDM's ``ln(sigma)/4``.

    V-scaling with ``sigma_data = 1`` is exactly SD 2.1-v's parameterisation (``x_t / sqrt(1+s^2)`` is DDPM's
    ``x_t`` at the step whose sigma is ``s``; ``c_skip x + c_out v`` is its x0 from ``v``), so an
    :class:`~vdiff.diffusion.edm.EDMDiffusion` with this preconditioning trains and samples an UNet inflated
    from SD 2.1-768-v the way its spatial layers were trained (SD 2.1-base is an epsilon model: not this one).
    Sigmas above SD 2.1's largest (14.6) are fed as step 999; sample with ``sigma_max`` at most ~14.6.
    """

    sigma_data = 1.0

    def __init__(self, quantize: bool = False) -> None:
        self.quantize = bool(quantize)

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        total = sigma**2 + 1.0
        c_skip = 1.0 / total
        c_out = -sigma / total.sqrt()
        c_in = 1.0 / total.sqrt()
        return c_skip, c_out, c_in, sd21_timestep(sigma, self.quantize)

    def __repr__(self) -> str:
        return f"SD21VScalingPrecond(quantize={self.quantize})"


#################################################################################
#                     diffusers UNet2DConditionModel config                     #
#################################################################################


def config_from_diffusers_image(
    config: Mapping[str, Any], video: UNetSVDConfig | None = None, source: str = "config"
) -> UNetSVDConfig:
    """The video UNet config that inflates a diffusers ``UNet2DConditionModel`` config (``config.json`` as a
    dict): its spatial fields from the image UNet, the video-only fields (:data:`VIDEO_ONLY_FIELDS`) from
    ``video`` (default: the ``svd`` preset's), ``in_channels = image in_channels + concat_channels``,
    ``norm_eps="sgm"``.

    Raises:
        InflationError: naming ``source`` and the field, for another ``_class_name``, an unknown field, or a value
            whose network UNetSVD's spatial half does not compute (another timestep sinusoid, norm, block type,
            per-level head widths that differ, ...).
    """

    refuse = config_refusal(config, source, "be inflated")
    if config.get("_class_name", DIFFUSERS_IMAGE_CLASS) != DIFFUSERS_IMAGE_CLASS:
        raise refuse("_class_name", f"vdiff inflates diffusers {DIFFUSERS_IMAGE_CLASS} image UNets")
    known = {*_DIFFUSERS_FIXED, *_DIFFUSERS_DEFAULTS, *_DIFFUSERS_IGNORED}
    check_known_fields(config, known, source, DIFFUSERS_IMAGE_CLASS, "inflate")
    for field, required in _DIFFUSERS_FIXED.items():
        value = config.get(field, required)
        if field == "only_cross_attention" and isinstance(value, (list, tuple)):
            value = any(value)
        if field == "mid_block_only_cross_attention" and value is False:
            value = None
        if value != required:
            raise refuse(field, f"UNetSVD's spatial half (SD 2.1's architecture) needs {required!r}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}

    heads_field = "num_attention_heads" if c["num_attention_heads"] is not None else "attention_head_dim"
    # diffusers' UNet2DConditionModel reads attention_head_dim as the head COUNT
    levels = diffusers_levels(c, refuse, (CROSS_DOWN, PLAIN_DOWN, CROSS_UP, PLAIN_UP), heads_field)
    time_dim = c["time_embedding_dim"]
    if time_dim is not None and int(time_dim) != 4 * levels["model_channels"]:
        raise refuse("time_embedding_dim", f"UNetSVD's time embedding is 4 * model_channels = {4 * levels['model_channels']}")
    base = video or UNetSVDConfig()
    try:
        result = dataclasses.replace(
            base,
            in_channels=int(c["in_channels"]) + base.concat_channels,
            out_channels=int(c["out_channels"]),
            **levels,
            norm_eps="sgm",
        )  # every other field (VIDEO_ONLY_FIELDS) from ``video``
        result.check()
    except ValueError as error:
        raise WeightsConfigError(f"{source}: {error}") from None
    return result


def read_diffusers_image_config(path: str | os.PathLike, video: UNetSVDConfig | None = None) -> UNetSVDConfig:
    """:func:`config_from_diffusers_image` of a ``config.json`` file (errors name the file)."""
    return config_from_diffusers_image(read_config_json(path, "diffusers"), video, source=str(path))


#################################################################################
#                               Reading the image UNet                          #
#################################################################################


@dataclass
class ImageUNet:
    """What :func:`read_image_unet` found: the image UNet's tensors under their own names (sgm: without the
    ``model.diffusion_model.`` prefix), and where they came from."""

    state_dict: dict[str, Tensor]
    layout: str  # "diffusers" or "sgm"
    weights_path: Path
    config_json: Path | None  # the diffusers config.json read (None for sgm files)
    prefix: str = ""  # the prefix the file's keys had (stripped from state_dict), for error messages


def read_image_unet(path: str | os.PathLike, layout: ImageLayout = "auto") -> ImageUNet:
    """Read a LOCAL SD-style image UNet: a diffusers ``UNet2DConditionModel`` (or pipeline) folder, a bare diffusers
    weights file, or an ldm/sgm single file (only its ``model.diffusion_model.*`` tensors are read).

    Raises:
        FileNotFoundError: nothing at ``path`` (nor under ``$VDIFF_WEIGHTS``), or a folder without weights.
        InflationError: a file whose keys are no image UNet vdiff knows.
    """
    resolved = resolve_source(path, layout, IMAGE_LAYOUTS, "SD image UNet weights")
    if resolved.is_dir():
        config_json, weights_path = model_folder(resolved, DIFFUSERS_SUBFOLDER, DIFFUSERS_WEIGHTS, "diffusers UNet")
        return ImageUNet(load_state_dict(weights_path), "diffusers", weights_path, config_json)
    keys = load_keys(resolved)
    found = detect_layout(keys, resolved, SIGNS, "image-UNet")
    if layout != "auto" and layout != found:
        raise WeightsError(f"{resolved}: layout={layout!r} was asked for, but its keys are {found}'s")
    if found == "sgm":
        prefix = SGM_PREFIX if any(k.startswith(SGM_PREFIX) for k in keys) else ""
        tensors = load_state_dict(resolved, select=lambda k: k.startswith(prefix))
        return ImageUNet({k[len(prefix) :]: v for k, v in tensors.items()}, "sgm", resolved, None, prefix)
    return ImageUNet(load_state_dict(resolved), "diffusers", resolved, config_beside(resolved))


#################################################################################
#                                  Inflation                                    #
#################################################################################


def _image_names(key: str, config: UNetSVDConfig, layout: str) -> list[str]:
    """The image UNet's name(s) of our SPATIAL parameter ``key``: sgm's video names are ldm's image names; diffusers'
    video ResBlocks hold the image ResBlock under ``spatial_res_block.``."""
    names = peer_names(key, config, "sgm" if layout == "sgm" else "diffusers")
    return [name.replace(".spatial_res_block.", ".") for name in names]


def _is_vista(name: str) -> bool:
    check = getattr(UNetSVD, "is_vista_parameter", None)  # Vista's layers, where this vdiff has them
    return bool(check and check(name))


def is_new_parameter(name: str) -> bool:
    """Whether parameter ``name`` of an inflated UNet is one the image UNet does not have: every temporal parameter,
    the added-time-id embedder, ``conv_in.weight`` (whose concat-channel kernels are new) and Vista's layers."""
    return (
        UNetSVD.is_temporal_parameter(name)
        or name.startswith("added_time_embed.")
        or name == "conv_in.weight"
        or _is_vista(name)
    )


def new_parameter_names(config: UNetSVDConfig | Mapping[str, Any] | str = "svd") -> list[str]:
    """The parameters of an inflated UNet that are NOT temporal yet not from the image UNet either:
    ``added_time_embed.*`` and ``conv_in.weight`` (concat kernels), and Vista's layers when the config has them.
    ``train: temporal`` freezes them at their zero-contribution init; a recipe that should learn from the concat
    latent and the added time ids trains them too (``conv_in.weight`` also holds SD's own input kernels)."""
    cfg = resolve_config(UNetSVDConfig, config)
    assert cfg is not None
    return [k for k in expected_shapes(cfg) if is_new_parameter(k) and not UNetSVD.is_temporal_parameter(k)]


def _new_tensors(config: UNetSVDConfig, seed: int) -> dict[str, Tensor]:
    """Temporal and added-time-id tensors: PyTorch's default init of each layer, drawn after
    ``torch.manual_seed(seed)`` in a forked RNG (the caller's stream is untouched), then the zeroed ones."""
    with torch.device("meta"):
        model = UNetSVD(config)
    out: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name, module in model.named_modules():
            own = [name for name, _ in module.named_parameters(recurse=False)]
            names = {name: f"{module_name}.{name}" if module_name else name for name in own}
            wanted = {
                n: full
                for n, full in names.items()
                if is_new_parameter(full) and full != "conv_in.weight" and not _is_vista(full)
            }
            if not wanted:
                continue
            if set(wanted) == {"mix_factor"}:
                out[wanted["mix_factor"]] = torch.full((1,), MERGE_FACTOR)
                continue
            if len(wanted) != len(own) or not hasattr(module, "reset_parameters"):
                raise WeightsError(f"vdiff cannot initialise {sorted(wanted.values())}: add a rule to inflate.py")
            module.to_empty(device="cpu", recurse=False)
            module.reset_parameters()
            out.update({full: getattr(module, name).detach() for name, full in wanted.items()})
    for key, value in out.items():
        if _ZEROED.search(key) or key.startswith("added_time_embed.mlp.2."):
            out[key] = torch.zeros_like(value)
    return out


def _check_norm_eps(config: UNetSVDConfig) -> None:
    if config.norm_eps != "sgm":
        raise WeightsConfigError(
            f"UNetSVDConfig.norm_eps={config.norm_eps!r}: SD 2.1's ResBlocks use GroupNorm eps 1e-5 everywhere "
            "(norm_eps='sgm'); inflated with other epsilons the video UNet would not equal the image UNet"
        )


def _conv_in_rule(names: list[str], shape: tuple[int, ...], image_in: int) -> Rule:
    """``conv_in.weight`` over ``[x, concat]`` channels: SD's kernels on the first ``image_in``, zeros after."""
    concat = shape[1] - image_in
    return Rule(tuple(names), ((shape[0], image_in, *shape[2:]),),
                lambda ts: torch.cat([ts[0], ts[0].new_zeros(shape[0], concat, *shape[2:])], dim=1))  # fmt: skip


def inflate_state_dict(
    image: ImageUNet, config: UNetSVDConfig, seed: int = 0, dtype: torch.dtype | None = torch.float32
) -> dict[str, Tensor]:
    """The video UNet state dict (our names, every key of ``UNetSVD(config)``) from an image UNet read by
    :func:`read_image_unet`; see the module docstring for the construction.

    dtype: of every tensor (None: the image UNet's dtype for its tensors, float32 for the new ones).

    Raises:
        InflationError: ``config.norm_eps`` is not ``"sgm"`` (SD 2.1's ResBlock epsilons).
        UNetSVDConversionError: image-UNet tensors missing, mis-shaped or left over, naming them and the file.
    """
    _check_norm_eps(config)
    full, config = config, config.replace(**{k: v for k, v in _VISTA_OFF.items() if hasattr(config, k)})
    prefix = image.prefix
    src = {prefix + k: v for k, v in image.state_dict.items()}  # the file's names, for the mapping and its errors
    new = _new_tensors(config, seed)
    mapper = KeyMapper(src, f"{image.layout} image UNet {image.weights_path}", TARGET, prefix=prefix)
    out: dict[str, Tensor] = {}
    for key, shape in expected_shapes(config).items():
        if key in new:
            out[key] = new[key]
            continue
        names = _image_names(key, config, image.layout)
        if key == "conv_in.weight":
            rule = _conv_in_rule(names, shape, config.in_channels - config.concat_channels)
        else:
            rule = stacked(names, shape, squeeze=bool(_PROJ_1X1.search(key)))
        if (value := mapper.take(key, shape, rule)) is not None:
            out[key] = value
    hint = f"video config {config.to_dict()}"
    if any(("time_stack" in k or "temporal" in k or "time_mixer" in k) for k in src):
        hint += "; this file holds a VIDEO UNet: load it with vdiff.weights.unet_svd.read_unet_svd"
    mapper.check([k for k in src if k[len(prefix) :] not in DROPPED], hint)
    for key, shape in expected_shapes(
        full
    ).items():  # Vista's layers (see _VISTA_OFF): a copy of the main time MLP, zeros
        if key in out:
            continue
        if key.startswith(_COND_TIME_EMBED):
            out[key] = out[_MAIN_TIME_EMBED + key[len(_COND_TIME_EMBED) :]].clone()
        elif _is_vista(key):
            out[key] = torch.zeros(shape)
        else:
            raise WeightsError(f"vdiff cannot initialise {key} of an inflated UNet: add a rule to inflate.py")
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def inflated_config(
    path: str | os.PathLike, config: UNetSVDConfig | Mapping[str, Any] | str | None = None, layout: ImageLayout = "auto"
) -> UNetSVDConfig:
    """The video config an image UNet at ``path`` inflates to (see :func:`load_inflated_state_dict`)."""
    return _inflation_plan(path, config, layout)[1]


def _inflation_plan(
    path: str | os.PathLike, config: UNetSVDConfig | Mapping[str, Any] | str | None, layout: ImageLayout
) -> tuple[ImageUNet, UNetSVDConfig]:
    explicit = set(config) if isinstance(config, Mapping) else None  # a mapping sets only the fields it names
    given = resolve_config(UNetSVDConfig, config)
    if given is not None:
        _check_norm_eps(given)
    image = read_image_unet(path, layout)
    if image.config_json is None:  # sgm files (and bare diffusers files) carry no config: the argument, or svd
        if given is None and image.layout == "diffusers":
            raise WeightsConfigError(
                f"{image.weights_path}: a bare diffusers weights file without {DIFFUSERS_CONFIG} beside it; load "
                "the folder (its config.json holds the head count), or pass config="
            )
        return image, given or UNetSVDConfig.from_name("svd")
    found = read_diffusers_image_config(image.config_json, given)
    if given is not None:
        check_same(given, found, str(image.config_json), ignore=VIDEO_ONLY_FIELDS, only=explicit, verb="gives",
                   heading="the video config passed contradicts the image UNet it inflates (pass config=None to derive it)")  # fmt: skip
    return image, found


def load_inflated_state_dict(
    path: str | os.PathLike,
    config: UNetSVDConfig | Mapping[str, Any] | str | None = None,
    layout: ImageLayout = "auto",
    seed: int = 0,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, Tensor]:
    """The state dict of a video UNet (:class:`UNetSVD`) inflated from the LOCAL SD-2.1-style image UNet at
    ``path``: ``UNetSVD(config).load_state_dict(...)`` loads it strictly, and that network computes what the image
    UNet computes, frame by frame (module docstring).

    Args:
        path: a diffusers ``UNet2DConditionModel`` folder or pipeline folder (``unet/``), or an ldm/sgm single
            file (``v2-1_768-ema-pruned.safetensors``; only ``model.diffusion_model.*`` is read).
        config: the video UNet (a :class:`UNetSVDConfig`, a preset name or a dict of its fields). With a diffusers
            folder it may only agree with the image UNet's ``config.json`` outside :data:`VIDEO_ONLY_FIELDS` (None:
            derived from it, video fields from the ``svd`` preset; a dict: the fields it names, e.g. only video
            fields, the rest derived); sgm files carry no config (None: ``svd``; a dict: over ``svd``'s fields).
        layout: ``auto``, ``diffusers`` or ``sgm``.
        seed: of the default init of the temporal layers (the result is a function of the file and the seed).
        dtype: of the returned tensors (None: as stored; new tensors float32).

    Raises:
        FileNotFoundError: no such file or folder (naming where it looked).
        InflationError, UNetSVDConfigError: a config that cannot be inflated exactly, or contradicting configs.
        UNetSVDConversionError: missing, mis-shaped or unused image-UNet tensors (naming the keys and the file).
    """
    image, cfg = _inflation_plan(path, config, layout)
    return inflate_state_dict(image, cfg, seed=seed, dtype=dtype)


def inflate_unet(
    path: str | os.PathLike,
    config: UNetSVDConfig | Mapping[str, Any] | str | None = None,
    layout: ImageLayout = "auto",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> UNetSVD:
    """A :class:`UNetSVD` inflated from the image UNet at ``path`` (arguments and errors as
    :func:`load_inflated_state_dict`): built on the meta device and filled, in ``dtype`` on ``device``."""
    image, cfg = _inflation_plan(path, config, layout)
    return build_loaded(UNetSVD, cfg, inflate_state_dict(image, cfg, seed=seed, dtype=dtype), device=device)


#################################################################################
#                     python -m vdiff.weights.inflate SRC OUT                   #
#################################################################################


def main(argv: list[str] | None = None) -> int:
    """Inflate once and write a vdiff UNet-SVD file that any ``net_weights:`` (``SVDModule``) reads."""
    import argparse

    from vdiff.weights.unet_svd import save_unet_svd

    parser = argparse.ArgumentParser(
        prog="python -m vdiff.weights.inflate",
        description="Inflate a LOCAL SD-2.1-style image UNet (diffusers folder or ldm/sgm single file) into SVD's "
        "video UNet, equal to the image UNet frame by frame, and write it as a vdiff .safetensors file.",
    )
    parser.add_argument("src", help="diffusers UNet2DConditionModel / pipeline folder, or v2-1_768-ema-pruned.*")
    parser.add_argument("out", help="the vdiff .safetensors file to write (config in its metadata)")
    parser.add_argument("--config", default=None, help="video config: a preset name or JSON fields (default: derived "
                        "from config.json, else svd)")  # fmt: skip
    parser.add_argument("--layout", default="auto", choices=IMAGE_LAYOUTS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the temporal layers' default init")
    args = parser.parse_args(argv)
    config: Any = args.config
    if config is not None and config.lstrip().startswith("{"):
        config = json.loads(config)
    model = inflate_unet(args.src, config, layout=args.layout, seed=args.seed)
    path = save_unet_svd(model, args.out, layout="vdiff")
    print(
        f"wrote {path}: UNet-SVD inflated from {args.src} ({sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
