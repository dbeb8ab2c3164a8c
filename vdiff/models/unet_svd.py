"""UNet-SVD: Stable Video Diffusion's spatio-temporal UNet (Blattmann et al., 2023), as a plain nn.Module.

The architecture of sgm's ``VideoUNet`` (Stability-AI/generative-models, ``configs/inference/svd.yaml``) and of
diffusers' ``UNetSpatioTemporalConditionModel``; weights of both load strictly through
:mod:`vdiff.weights.unet_svd`. An image UNet (SD-style: ResBlocks with a time embedding, transformers with
self-attention, cross-attention and a GEGLU MLP) where

- every spatial ResBlock is followed by a temporal ResBlock ((3,1,1) convolutions over frames), and every spatial
  transformer block by a temporal transformer block (a frame-index sinusoid through a small MLP added to its
  input, a residual GEGLU MLP, self-attention over frames, cross-attention to the first frame's context, GEGLU
  MLP);
- each pair is blended ``alpha*spatial + (1-alpha)*temporal``, ``alpha = sigmoid(mix_factor)`` (learned, one per
  block), and ``alpha = 1`` for frames that ``image_only_indicator`` marks as images, so image and video
  samples can train in one batch;
- the time embedding (a sinusoid of the noise level through ``Linear-SiLU-Linear``, width ``4*model_channels``)
  gets the "added time ids" ``(fps_id, motion_bucket_id, cond_aug)`` added, each a 256-d sinusoid, concatenated
  (768) through ``Linear-SiLU-Linear``.

Conditioning arrives in the ``cond`` dict of the denoiser contract (``vdiff.diffusion.common``):

``context``               ``(B, N, context_dim)``: cross-attention tokens of the clip (SVD: the CLIP image
                          embedding of the conditioning frame, ``N = 1``, ``context_dim = 1024``), shared by every
                          frame; the temporal cross-attention uses the same tokens (sgm's "first frame" context).
``concat``                ``(B, T, concat_channels, H, W)`` or ``(B, 1, concat_channels, H, W)`` (broadcast over
                          frames): concatenated to ``x`` on channels INSIDE the network, after the diffusion
                          process has preconditioned ``x`` (sgm concatenates after ``c_in`` scaling too). SVD: the
                          conditioning frame's VAE latent (posterior mode, not multiplied by the scale factor).
                          Required when ``concat_channels > 0``; the unconditional branch of CFG passes zeros.
``added_time_ids``        ``(B, num_added_time_ids)`` float: SVD's ``(fps_id, motion_bucket_id, cond_aug)`` as the
                          network sees them (diffusers' pipeline passes ``fps - 1`` as ``fps_id``).
``image_only_indicator``  optional ``(B, T)`` bool (or 0/1): true frames are images, their temporal paths are off.
``actions``               ``(B, action_dim)`` float, required when ``action_dim > 0`` (refused otherwise): per-clip
                          action features (e.g. :class:`vdiff.models.actions.ActionEncoder`'s); all zeros is
                          unconditional (the CFG branch and clips without actions pass zeros).

``noise_level`` is the process's ``c_noise`` (EDM: ``0.25 * ln(sigma)``), used as given: the network takes no log.
``given_mask`` is ignored (given content arrives clean in ``x``) unless ``cond_frame_time_embed`` is on.

Vista's additions (Gao et al., 2024, OpenDriveLab/Vista), both off in the presets, so a converted SVD is unchanged:

- ``cond_frame_time_embed`` (Vista's "dynamic prior"): a second time-embedding MLP, ``cond_time_embed``, initialised
  as a copy of ``time_embed`` (:meth:`UNetSVD.init_cond_time_embed_from_main`). A frame is *given* when
  ``given_mask`` is true over the whole frame; given frames take their time embedding from the copy, the others
  from the main MLP, both of the same ``noise_level`` (the clip's: Vista preconditions the whole clip with its sigma
  and the copy learns to read it for clean frames). The embedding is then per frame, ``(B, T, E)``, which the spatial
  ResBlocks add per frame and the temporal ResBlocks per frame of their ``(B, C, T, H, W)`` input. Without a given
  frame it stays ``(B, 1, E)``, exactly SVD's. In the copy's sgm counterpart, Vista's ``cond_time_stack_embed``.
- ``action_dim > 0`` (Vista's action control): every cross-attention, spatial and temporal, adds a zero-initialised
  projection of ``cond["actions"]`` to the keys and values of every context token (:mod:`vdiff.nn.unet_blocks`).
  At initialisation, and for zero actions, the network computes exactly what it computes without them.

Differences from the references, none of which changes what their weights compute:

- torch SDPA everywhere; self-attention q/k/v in one ``qkv`` projection and cross-attention k/v in one ``kv``
  projection (converted on load); cross-attention keys/values computed once per clip instead of once per frame
  (spatial) or per position (temporal); temporal convolutions run as Conv2d (``vdiff.nn.resnet.TemporalConv``).
- any clip length ``T`` and any ``H, W`` (odd sizes upsample to their skip connection's size, as diffusers does).
- GroupNorm eps of the ResBlocks: sgm uses 1e-5 everywhere; diffusers uses 1e-6 in the cross-attention down
  blocks and in every up block. ``UNetSVDConfig.norm_eps`` picks either (``"sgm"`` for the presets, the original;
  a diffusers folder loads as ``"diffusers"``), so each loads exactly.
- activation checkpointing per block (``gradient_checkpointing``), ``block_classes()`` for FSDP wrapping, and
  ``temporal_parameter_names()`` / ``spatial_parameter_names()`` for per-group learning rates or freezing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vdiff.models.lora_targets import LoRATargets
from vdiff.nn.embeddings import TimestepEmbedder
from vdiff.nn.resnet import Downsample, Upsample
from vdiff.nn.unet_blocks import (
    GROUPS,
    AddedTimeEmbedder,
    ContextCrossAttention,
    SpatioTemporalResBlock,
    SpatioTemporalTransformer,
)

NormEps = Literal["sgm", "diffusers"]
NORM_EPS_CHOICES: tuple[str, ...] = ("sgm", "diffusers")  # the NormEps values
# The cond keys (module docstring), declared here only: the conditioners and modules that fill them import them.
CONTEXT_KEY = "context"
CONCAT_KEY = "concat"
ADDED_TIME_IDS_KEY = "added_time_ids"
IMAGE_ONLY_KEY = "image_only_indicator"
ACTIONS_KEY = "actions"
# Name components of the layers SVD adds to an image UNet (temporal ResBlocks, temporal transformer blocks, the
# frame-index MLPs and the blend factors); every other parameter is "spatial".
TEMPORAL_PARTS: tuple[str, ...] = ("temporal", "temporal_blocks", "frame_embed", "mix_factor")
# Name components of the layers Vista adds to SVD (the given frames' time-embedding MLP and the action projections
# of the cross-attentions); present only when ``cond_frame_time_embed`` / ``action_dim`` turn them on. They are
# neither temporal nor pretrained: ``vista_parameter_names()`` lists them for their own optimizer group.
VISTA_PARTS: tuple[str, ...] = ("cond_time_embed", "action_kv")
# The attention projections (module names, re.fullmatch) for the LoRA presets: self-attention q/k/v (fused) and out,
# cross-attention q, k/v (fused) and out.
_PROJECTIONS = r"(attn1\.(qkv|proj)|attn2\.(q|kv|proj))"
_ATTENTION = r".*\.attn1\.(qkv|proj)|.*\.attn2\.(q|kv|proj)"  # every block's (the string Vista's recipes wrote)


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class UNetSVDConfig:
    """Everything that decides a UNet-SVD's architecture; named sizes are in :data:`UNET_SVD_CONFIGS`.
    The defaults are SVD's (``svd``).

    in_channels: channels of the first conv: ``x``'s channels plus ``concat_channels`` (SVD: 4 + 4).
    out_channels: output channels (SVD: 4).
    concat_channels: channels of ``cond["concat"]`` (0: no concat input; then ``x`` has ``in_channels``).
    model_channels, channel_mult: level widths ``model_channels * channel_mult[i]`` (multiples of 32: GroupNorm).
    num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up).
    attention_levels: levels with a transformer after every ResBlock (SVD: all but the last); the middle block
        always has one.
    head_dim: attention head width (SVD: 64); heads = width / head_dim.
    transformer_depth: spatial + temporal block pairs per transformer.
    context_dim: width of the cross-attention context tokens (SVD: 1024, OpenCLIP ViT-H/14).
    num_added_time_ids, added_time_embed_dim: the added time ids and the sinusoid width of each (3 x 256).
    num_frames: the clip length the weights were trained at (svd 14, svd-xt 25); informational, any ``T`` runs.
    norm_eps: ResBlock GroupNorm epsilons, ``"sgm"`` (1e-5 everywhere) or ``"diffusers"`` (1e-6 in cross-attention
        down blocks and all up blocks, 1e-5 elsewhere); see the module docstring.
    gradient_checkpointing: recompute each ResBlock / transformer in backward instead of storing its activations.
    cond_frame_time_embed: Vista's separate time-embedding MLP for given frames (module docstring); off in SVD.
    action_dim: width of ``cond["actions"]`` read by every cross-attention through zero-initialised key/value
        projections (Vista: 2432 = 19 scalars x 128); 0 = no actions (SVD).
    """

    in_channels: int = 8
    out_channels: int = 4
    concat_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    head_dim: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    num_added_time_ids: int = 3
    added_time_embed_dim: int = 256
    num_frames: int = 14
    norm_eps: NormEps = "sgm"
    gradient_checkpointing: bool = False
    cond_frame_time_embed: bool = False
    action_dim: int = 0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(level) for level in self.attention_levels)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> UNetSVDConfig:
        """The named size (a key of :data:`UNET_SVD_CONFIGS`) with ``overrides`` applied to its fields."""
        if name not in UNET_SVD_CONFIGS:
            raise ValueError(f"UNetSVDConfig: unknown size {name!r}; choose from {sorted(UNET_SVD_CONFIGS)}")
        return UNET_SVD_CONFIGS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> UNetSVDConfig:
        """A copy with ``overrides`` applied; an unknown field is an error naming it."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"UNetSVDConfig: unknown field(s) {unknown}; fields are {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetSVDConfig:
        """Inverse of :meth:`to_dict`; an unknown field is an error naming it."""
        return cls().replace(**d)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def resnet_eps(self, part: Literal["down", "mid", "up"], level: int) -> float:
        """GroupNorm eps of the ResBlocks of ``part`` (``level``: the down level, unused otherwise)."""
        if self.norm_eps == "sgm":
            return 1e-5
        if part == "down":
            return 1e-6 if level in self.attention_levels else 1e-5
        return 1e-5 if part == "mid" else 1e-6

    def check(self) -> None:
        """Raise ValueError naming the field when this config cannot build a UNet."""

        def refuse(field: str, why: str) -> ValueError:
            return ValueError(f"UNetSVDConfig.{field}={getattr(self, field)!r}: {why}")

        levels = len(self.channel_mult)
        if levels < 1 or any(m < 1 for m in self.channel_mult):
            raise refuse("channel_mult", "needs at least one level, every multiplier >= 1")
        if any(w % GROUPS for w in self.widths):
            raise refuse(
                "model_channels", f"level widths {self.widths} must be multiples of {GROUPS} (GroupNorm groups)"
            )
        attention = self.attention_levels
        if any(not 0 <= level < levels for level in attention) or len(set(attention)) != len(attention):
            raise refuse("attention_levels", f"distinct level indices in [0, {levels}) expected")
        with_heads = (*attention, levels - 1)  # the mid block's transformer works at the last level's width
        if self.head_dim < 1 or any(self.widths[level] % self.head_dim for level in with_heads):
            raise refuse("head_dim", f"must divide the width {self.widths} of every level with attention and the last")
        if not 0 <= self.concat_channels < self.in_channels:
            raise refuse("concat_channels", f"must be in [0, in_channels={self.in_channels})")
        positive = (
            "out_channels",
            "num_res_blocks",
            "transformer_depth",
            "context_dim",
            "num_added_time_ids",
            "num_frames",
        )
        for field in positive:
            if getattr(self, field) < 1:
                raise refuse(field, "must be >= 1")
        if self.added_time_embed_dim < 2 or self.added_time_embed_dim % 2:
            raise refuse("added_time_embed_dim", "must be even and >= 2")
        if self.norm_eps not in NORM_EPS_CHOICES:
            raise refuse("norm_eps", f"choose one of {NORM_EPS_CHOICES}")
        if not isinstance(self.action_dim, int) or self.action_dim < 0:
            raise refuse("action_dim", "must be an integer >= 0 (0: no actions)")
        if not isinstance(self.cond_frame_time_embed, bool):
            raise refuse("cond_frame_time_embed", "must be a bool")


#################################################################################
#                                 Core UNet-SVD                                 #
#################################################################################


class UNetLevel(nn.Module):
    """One resolution level of the encoder or decoder: ResBlocks, a transformer after each ResBlock (or none),
    and a resampler (or None). A container: :class:`UNetSVD` runs it."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample

    def pairs(self) -> Iterator[tuple[nn.Module, nn.Module | None]]:
        for i, res in enumerate(self.res):
            yield res, (self.attn[i] if len(self.attn) else None)


class MidBlock(nn.Module):
    """ResBlock, transformer, ResBlock at the lowest resolution."""

    def __init__(self, res: list[nn.Module], attn: nn.Module) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = attn


class UNetSVD(nn.Module):
    """Stable Video Diffusion's spatio-temporal UNet (module docstring). Built from a :class:`UNetSVDConfig`
    (``UNetSVD(UNetSVDConfig.from_name("svd"))``); the config is kept as ``self.config``."""

    # Where LoRA goes (vdiff.callbacks.LoRA; vdiff.models.lora_targets). Self-attention (`attn1`) fuses q/k/v into
    # `qkv`, cross-attention (`attn2`) k/v into `kv`; `proj` is the output. Spatial transformer blocks are
    # `*.blocks.N`, temporal ones `*.temporal_blocks.N`; the GEGLU MLPs are `ff` (and the temporal `ff_in`).
    LORA_PRESETS: ClassVar[dict[str, LoRATargets]] = {
        "attention": LoRATargets(_ATTENTION),  # q/k/v/out of every attention: self and cross, spatial and temporal
        "temporal-attention": LoRATargets(rf".*\.temporal_blocks\.\d+\.{_PROJECTIONS}"),
        "spatial-attention": LoRATargets(rf".*\.blocks\.\d+\.{_PROJECTIONS}"),
        "attention+mlp": LoRATargets(rf"{_ATTENTION}|.*\.(ff|ff_in)\.(proj_in|proj_out)"),
        # Vista's phase 2: adapters on every attention, the (zero-initialised) action projections trained fully.
        "vista": LoRATargets(_ATTENTION, trainable=(r".*\.action_kv\.weight",)),
    }

    def __init__(self, config: UNetSVDConfig | None = None) -> None:
        super().__init__()
        config = config or UNetSVDConfig()
        config.check()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        widths, E = config.widths, config.time_embed_dim
        levels = len(widths)

        def resblock(c_in: int, c_out: int, eps: float) -> SpatioTemporalResBlock:
            return SpatioTemporalResBlock(c_in, c_out, E, eps)

        def transformer(width: int) -> SpatioTemporalTransformer:
            return SpatioTemporalTransformer(
                width,
                width // config.head_dim,
                config.context_dim,
                config.transformer_depth,
                action_dim=config.action_dim,
            )

        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.time_embed = TimestepEmbedder(E, frequency_embedding_size=config.model_channels)
        self.cond_time_embed: TimestepEmbedder | None = None  # given frames' time embedding (Vista), a copy
        if config.cond_frame_time_embed:
            self.cond_time_embed = TimestepEmbedder(E, frequency_embedding_size=config.model_channels)
        self.added_time_embed = AddedTimeEmbedder(config.num_added_time_ids, config.added_time_embed_dim, E)

        self.down = nn.ModuleList()
        skip_widths = [widths[0]]  # widths of the activations the decoder takes back, in order of creation
        ch = widths[0]
        for level, width in enumerate(widths):
            eps = config.resnet_eps("down", level)
            res, attn = [], []
            for _ in range(config.num_res_blocks):
                res.append(resblock(ch, width, eps))
                ch = width
                if level in config.attention_levels:
                    attn.append(transformer(width))
                skip_widths.append(ch)
            last = level == levels - 1
            self.down.append(UNetLevel(res, attn, None if last else Downsample(ch, "symmetric")))
            if not last:
                skip_widths.append(ch)

        mid_eps = config.resnet_eps("mid", levels - 1)
        self.mid = MidBlock([resblock(ch, ch, mid_eps), resblock(ch, ch, mid_eps)], transformer(ch))

        self.up = nn.ModuleList()  # lowest resolution first, the order they run
        for level in reversed(range(levels)):
            width, eps = widths[level], config.resnet_eps("up", level)
            res, attn = [], []
            for _ in range(config.num_res_blocks + 1):
                res.append(resblock(ch + skip_widths.pop(), width, eps))
                ch = width
                if level in config.attention_levels:
                    attn.append(transformer(width))
            self.up.append(UNetLevel(res, attn, Upsample(ch) if level > 0 else None))

        self.norm_out = nn.GroupNorm(GROUPS, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, config.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """sgm's init: PyTorch defaults, with the last conv of every ResBlock (spatial and temporal), every
        transformer's ``proj_out`` and the output conv zeroed (each block starts as the identity), and
        ``mix_factor`` 0.5 (set by the blocks)."""
        for module in self.modules():
            if isinstance(module, SpatioTemporalResBlock):
                for conv in (module.spatial.conv2, module.temporal.conv2):
                    nn.init.zeros_(conv.weight)
                    nn.init.zeros_(conv.bias)
            elif isinstance(module, SpatioTemporalTransformer):
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        for module in self.modules():  # Vista's action projections start at zero: the model computes SVD's
            if isinstance(module, ContextCrossAttention) and module.action_dim:
                nn.init.zeros_(module.action_kv.weight)
        self.init_cond_time_embed_from_main()

    @torch.no_grad()
    def init_cond_time_embed_from_main(self) -> None:
        """Copy the main time-embedding MLP (``time_embed``) into the given frames' one (``cond_time_embed``), as
        Vista initialises it. Called at construction; call it again after loading weights that lack the copy (an SVD
        checkpoint: :func:`vdiff.weights.unet_svd.read_unet_svd` fills it the same way). A no-op without the copy."""
        if self.cond_time_embed is not None:
            for ours, main in zip(self.cond_time_embed.parameters(), self.time_embed.parameters()):
                ours.copy_(main)

    @staticmethod
    def block_classes() -> tuple[type[nn.Module], ...]:
        """The block classes to wrap one by one for FSDP (and the units of activation checkpointing)."""
        return (SpatioTemporalResBlock, SpatioTemporalTransformer)

    @staticmethod
    def is_temporal_parameter(name: str) -> bool:
        """Whether parameter ``name`` belongs to a layer SVD adds to the image UNet (see :data:`TEMPORAL_PARTS`);
        Vista's added layers are not temporal, even inside a temporal block (:meth:`is_vista_parameter`)."""
        return not UNetSVD.is_vista_parameter(name) and any(part in TEMPORAL_PARTS for part in name.split("."))

    def temporal_parameter_names(self) -> list[str]:
        """Names of the temporal parameters: temporal ResBlocks, temporal transformer blocks, frame-index MLPs and
        blend factors (e.g. to train them alone, as "temporal layers only")."""
        return [name for name, _ in self.named_parameters() if self.is_temporal_parameter(name)]

    def spatial_parameter_names(self) -> list[str]:
        """Names of the image UNet's parameters (embeddings included), e.g. for a lower learning rate: neither
        temporal nor Vista's. The three lists partition the parameters."""
        return [
            name
            for name, _ in self.named_parameters()
            if not self.is_temporal_parameter(name) and not self.is_vista_parameter(name)
        ]

    @staticmethod
    def is_vista_parameter(name: str) -> bool:
        """Whether parameter ``name`` belongs to a layer Vista adds to SVD (see :data:`VISTA_PARTS`)."""
        return any(part in VISTA_PARTS for part in name.split("."))

    def vista_parameter_names(self) -> list[str]:
        """Names of the parameters of Vista's added layers (``cond_time_embed``, every ``action_kv``): new layers that
        pretrained SVD weights do not hold (e.g. to train them at the full learning rate, or with adapters)."""
        return [name for name, _ in self.named_parameters() if self.is_vista_parameter(name)]

    def forward(
        self,
        x: Tensor,
        noise_level: Tensor,
        cond: dict[str, Tensor] | None = None,
        given_mask: Tensor | None = None,
    ) -> Tensor:
        """x: ``(B, T, C, H, W)`` with ``C = in_channels - concat_channels``; noise_level: ``(B,)``; cond: the
        module docstring's keys; given_mask: bool broadcastable to ``x`` or None, read only with
        ``cond_frame_time_embed`` (whole given frames take the copied time embedding). Returns
        ``(B, T, out_channels, H, W)``."""
        B, T, C, H, W = x.shape
        context, concat, added_time_ids, image_only, actions = self._conditioning(x, noise_level, cond or {})
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype).expand(B, T, -1, H, W)], dim=2)  # (B, T, C_in, H, W)
        if actions is not None:
            actions = actions.to(x.dtype)  # (B, action_dim)
        h = self.conv_in(x.reshape(B * T, self.config.in_channels, H, W))  # (B*T, C0, H, W)
        emb = self.time_embedding(noise_level, added_time_ids, given_mask, T)  # (B, 1|T, E)

        skips = [h]  # (B*T, C_i, H_i, W_i) each
        for level in self.down:
            for res, attn in level.pairs():
                h = self._run(res, h, emb, T, image_only)  # (B*T, C_l, H_l, W_l)
                if attn is not None:
                    h = self._run(attn, h, context, T, image_only, actions)  # (B*T, C_l, H_l, W_l)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B*T, C_l, ceil(H_l/2), ceil(W_l/2))
                skips.append(h)

        h = self._run(self.mid.res[0], h, emb, T, image_only)  # (B*T, C_L, H_L, W_L)
        h = self._run(self.mid.attn, h, context, T, image_only, actions)
        h = self._run(self.mid.res[1], h, emb, T, image_only)

        for level in self.up:
            for res, attn in level.pairs():
                h = torch.cat([h, skips.pop()], dim=1)  # (B*T, C + C_skip, H_l, W_l)
                h = self._run(res, h, emb, T, image_only)  # (B*T, C_l, H_l, W_l)
                if attn is not None:
                    h = self._run(attn, h, context, T, image_only, actions)
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])  # (B*T, C_l, H_{l-1}, W_{l-1})

        h = self.conv_out(F.silu(self.norm_out(h)))  # (B*T, C_out, H, W)
        return h.view(B, T, -1, H, W)  # (B, T, C_out, H, W)

    def _run(
        self, block: nn.Module, h: Tensor, emb_or_context: Tensor, T: int, image_only: Tensor | None, *extra: Any
    ) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb_or_context, T, image_only, *extra, use_reentrant=False)
        return block(h, emb_or_context, T, image_only, *extra)

    def time_embedding(
        self, noise_level: Tensor, added_time_ids: Tensor, given_mask: Tensor | None = None, num_frames: int = 1
    ) -> Tensor:
        """The embedding the ResBlocks add: ``time_embed(noise_level) + added_time_embed(added_time_ids)``,
        ``(B, 1, E)`` (one per clip); with ``cond_frame_time_embed`` and at least one given frame, ``(B, T, E)`` with
        ``cond_time_embed(noise_level)`` in place of ``time_embed(noise_level)`` for the given frames
        (:meth:`given_frames`). noise_level: ``(B,)``; added_time_ids: ``(B, k)``; given_mask: bool broadcastable to
        ``(B, T, C, H, W)`` or None; num_frames: ``T``."""
        main = self.time_embed(noise_level)  # (B, E)
        added = self.added_time_embed(added_time_ids)  # (B, E)
        if self.cond_time_embed is None or given_mask is None:
            return (main + added)[:, None]  # (B, 1, E): one per clip, broadcast over frames
        given = self.given_frames(given_mask, noise_level.shape[0], num_frames)  # (B, T) bool
        if not bool(given.any()):
            return (main + added)[:, None]  # (B, 1, E)
        cond = self.cond_time_embed(noise_level)  # (B, E)
        time = torch.where(given[..., None], cond[:, None], main[:, None])  # (B, T, E)
        return time + added[:, None]  # (B, T, E)

    @staticmethod
    def given_frames(given_mask: Tensor, batch: int, num_frames: int) -> Tensor:
        """``(B, T)`` bool: frames where ``given_mask`` (bool, broadcastable to ``(B, T, C, H, W)``) is true
        everywhere (a frame given only in part, e.g. spatial completion, is not a given frame)."""
        if given_mask.ndim > 5:
            raise ValueError(f"UNetSVD: given_mask must broadcast to (B, T, C, H, W), got {tuple(given_mask.shape)}")
        mask = given_mask.bool().reshape((1,) * (5 - given_mask.ndim) + tuple(given_mask.shape))
        per_frame = mask.flatten(2).all(dim=2)  # (B|1, T|1): broadcast dims reduce trivially
        return torch.broadcast_to(per_frame, (batch, num_frames))

    def _conditioning(
        self, x: Tensor, noise_level: Tensor, cond: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """Check and return ``(context (B, N, D_ctx), concat (B, T|1, c, H, W) or None, added_time_ids (B, k),
        image_only_indicator (B, T) bool or None, actions (B, action_dim) or None)``; errors name the key and the
        expected shape."""
        cfg = self.config
        B, T, C, H, W = x.shape
        if cfg.in_channels - cfg.concat_channels != C:
            raise ValueError(
                f"UNetSVD: x has {C} channels; the model takes in_channels - concat_channels = "
                f"{cfg.in_channels} - {cfg.concat_channels} = {cfg.in_channels - cfg.concat_channels}"
            )
        if noise_level.shape != (B,):
            raise ValueError(
                f"UNetSVD: noise_level must have shape ({B},) (one level per clip), got {tuple(noise_level.shape)}"
            )

        def required(key: str, shape: str) -> Tensor:
            if key not in cond:
                raise ValueError(f"UNetSVD: cond[{key!r}] {shape} is required (cond has {sorted(cond)})")
            return cond[key]

        context = required(CONTEXT_KEY, f"(B, N, {cfg.context_dim})")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"UNetSVD: cond[{CONTEXT_KEY!r}] must be ({B}, N, {cfg.context_dim}), got {tuple(context.shape)}"
            )
        concat = None
        if cfg.concat_channels:
            concat = required(CONCAT_KEY, f"(B, T, {cfg.concat_channels}, H, W)")
            if (
                concat.ndim != 5
                or concat.shape[:1] + concat.shape[2:] != (B, cfg.concat_channels, H, W)
                or concat.shape[1] not in (1, T)
            ):
                raise ValueError(
                    f"UNetSVD: cond[{CONCAT_KEY!r}] must be ({B}, {T} or 1, {cfg.concat_channels}, {H}, {W}), "
                    f"got {tuple(concat.shape)}"
                )
        elif CONCAT_KEY in cond:
            raise ValueError(f"UNetSVD: cond[{CONCAT_KEY!r}] given, but the model was built with concat_channels=0")
        added = required(ADDED_TIME_IDS_KEY, f"(B, {cfg.num_added_time_ids})")
        if added.shape != (B, cfg.num_added_time_ids):
            raise ValueError(
                f"UNetSVD: cond[{ADDED_TIME_IDS_KEY!r}] must be ({B}, {cfg.num_added_time_ids}), got {tuple(added.shape)}"
            )
        image_only = cond.get(IMAGE_ONLY_KEY)
        if image_only is not None:
            if image_only.shape != (B, T):
                raise ValueError(f"UNetSVD: cond[{IMAGE_ONLY_KEY!r}] must be ({B}, {T}), got {tuple(image_only.shape)}")
            image_only = image_only.bool()
        actions = None
        if cfg.action_dim:
            actions = required(ACTIONS_KEY, f"(B, {cfg.action_dim}) (zeros: unconditional)")
            if actions.shape != (B, cfg.action_dim):
                raise ValueError(
                    f"UNetSVD: cond[{ACTIONS_KEY!r}] must be ({B}, {cfg.action_dim}), got {tuple(actions.shape)}"
                )
        elif ACTIONS_KEY in cond:
            raise ValueError(f"UNetSVD: cond[{ACTIONS_KEY!r}] given, but the model was built with action_dim=0")
        return context, concat, added, image_only, actions


#################################################################################
#                               UNet-SVD Configs                                #
#################################################################################

# Named sizes as data. "svd" and "svd-xt" are the two released UNets (stable-video-diffusion-img2vid and -xt):
# the same architecture, trained at 14 and 25 frames. "tiny" is vdiff's CPU size for tests and smoke runs
# (every kind of block, a forward in a few tens of milliseconds at (1, 4, 4, 16, 16)).
UNET_SVD_CONFIGS: dict[str, UNetSVDConfig] = {
    "svd": UNetSVDConfig(),
    "svd-xt": UNetSVDConfig(num_frames=25),
    "tiny": UNetSVDConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        head_dim=16,
        context_dim=64,
        added_time_embed_dim=32,
        num_frames=4,
    ),
}
