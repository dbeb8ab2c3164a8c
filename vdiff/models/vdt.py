"""VDT: a video diffusion transformer (Lu et al., ICLR 2024), as a plain nn.Module.

Architecture and parameter names follow RERV/VDT ``models.py`` (a fork of facebookresearch/DiT), so
its checkpoints load strictly (the reader is :func:`vdiff.weights.vdt.load_vdt_checkpoint`).
Each block runs temporal attention over the frames of every spatial token (plain LayerNorm, attention,
a linear projection, residual), then spatial attention within each frame (adaLN-Zero), then an MLP
(adaLN-Zero). One timestep per video conditions every block.

Differences from the reference, none of which changes what its weights compute:

- the clip length ``T`` and latent size ``H x W`` are free at call time: the fixed sin-cos tables are
  computed for the actual ``(T, h, w)`` (and cached). The reference stores them as frozen parameters
  ``pos_embed (1, input_size**2, D)`` and ``time_embed (1, num_frames, D)``; here they are persistent
  *buffers* of that size, kept only so checkpoints round-trip with the same keys. Loading verifies
  that they hold the sin-cos values this model computes (an error names the key otherwise), so a
  checkpoint with different (e.g. learned) tables is never silently ignored. Buffers rather than
  parameters, so optimizers, EMA and sharding never see them.
- torch SDPA with a fused qkv projection; optional RoPE (temporal and/or spatial, instead of or beside
  sin-cos) and QK-norm; activation checkpointing per block.
- the denoiser contract of ``vdiff.diffusion.common``: ``forward(x (B, T, C, H, W), noise_level (B,),
  cond, given_mask)``; VDT takes given content through ``x`` itself and ignores ``given_mask``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vdiff.models.lora_targets import LoRATargets
from vdiff.nn.attention import Attention, QKNorm
from vdiff.nn.embeddings import (
    LabelEmbedder,
    PatchEmbed2d,
    TimestepEmbedder,
    rope_angles_1d,
    rope_angles_2d,
    rope_cos_sin,
    sincos_1d,
    sincos_2d,
)
from vdiff.nn.modulation import adaln_modulation, gated_residual, modulate

PositionKind = Literal["sincos", "rope", "sincos+rope"]
POSITION_KINDS: tuple[str, ...] = ("sincos", "rope", "sincos+rope")
CLASS_LABEL_KEY = "class_label"  # cond key of the optional class label, long (B,)


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class VDTConfig:
    """Everything that decides a VDT's architecture; named sizes are in :data:`VDT_CONFIGS`.

    The defaults are VDT-S/2's. ``in_channels`` and ``learn_sigma`` may be left None when the network
    is built by a LightningModule: it fills them in from the autoencoder (latent channels) and the
    diffusion process (learned variance doubles the output channels).

    patch_size, hidden_size, depth, num_heads, mlp_ratio: as in DiT.
    in_channels: channels of the input latents (3 in pixel space).
    learn_sigma: output ``2 * in_channels`` (the prediction and the learned-range variance value).
    num_classes: build a class-label embedder (the reference always has one; its released Physion
        checkpoint uses ``num_classes=1`` and was sampled with label 0); None for none.
    class_dropout_prob: training-time label dropout to the null class (index ``num_classes``).
    input_size, num_frames: sizes of the stored ``pos_embed`` / ``time_embed`` buffers (checkpoint
        compatibility only; ``forward`` takes any ``T`` and any ``H, W`` divisible by ``patch_size``).
    temporal_pos, spatial_pos: ``"sincos"`` (reference), ``"rope"`` or ``"sincos+rope"``.
    rope_theta: RoPE base.
    qk_norm: None (reference), ``"rms"`` or ``"layer"`` per-head norm on queries and keys.
    gradient_checkpointing: recompute each block in backward instead of storing its activations.
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    in_channels: int | None = None
    learn_sigma: bool | None = None
    num_classes: int | None = None
    class_dropout_prob: float = 0.1
    input_size: int = 32
    num_frames: int = 16
    temporal_pos: PositionKind = "sincos"
    spatial_pos: PositionKind = "sincos"
    rope_theta: float = 10000.0
    qk_norm: QKNorm | None = None
    gradient_checkpointing: bool = False

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VDTConfig:
        """The named size (a key of :data:`VDT_CONFIGS`) with ``overrides`` applied to its fields."""
        if name not in VDT_CONFIGS:
            raise ValueError(f"VDTConfig: unknown size {name!r}; choose from {sorted(VDT_CONFIGS)}")
        return VDT_CONFIGS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> VDTConfig:
        """A copy with ``overrides`` applied; an unknown field is an error naming it."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"VDTConfig: unknown field(s) {unknown}; fields are {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    @property
    def out_channels(self) -> int:
        self._check_complete()
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def _check_complete(self) -> None:
        if self.in_channels is None or self.learn_sigma is None:
            raise ValueError(
                "VDTConfig: in_channels and learn_sigma must be set to build a VDT (a LightningModule fills them in "
                f"from its autoencoder and diffusion process); got in_channels={self.in_channels}, "
                f"learn_sigma={self.learn_sigma}"
            )


#################################################################################
#                                 Core VDT Model                                #
#################################################################################


class VDTBlock(nn.Module):
    """Temporal attention (per spatial token) -> spatial attention (adaLN-Zero) -> MLP (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: QKNorm | None = None) -> None:
        super().__init__()
        self.temporal_norm1 = nn.LayerNorm(hidden_size)  # affine, eps 1e-5: as the reference
        self.temporal_attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.temporal_fc = nn.Linear(hidden_size, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu_tanh = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=gelu_tanh, drop=0)
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        temporal_rope: tuple[Tensor, Tensor] | None = None,
        spatial_rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, T, N, D = x.shape
        mod = self.adaLN_modulation(c)[:, None, None]  # (B, 1, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, 1, D)

        xt = self.temporal_norm1(x).transpose(1, 2).reshape(B * N, T, D)  # (B*N, T, D)
        xt = self.temporal_fc(self.temporal_attn(xt, rope=temporal_rope))  # (B*N, T, D)
        x = x + xt.view(B, N, T, D).transpose(1, 2)  # (B, T, N, D)

        xs = modulate(self.norm1(x), shift_msa, scale_msa).view(B * T, N, D)  # (B*T, N, D)
        xs = self.attn(xs, rope=spatial_rope).view(B, T, N, D)  # (B, T, N, D)
        x = gated_residual(x, gate_msa, xs)  # (B, T, N, D)

        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))  # (B, T, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to ``p*p*C_out`` patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, None].chunk(2, dim=-1)  # 2 x (B, 1, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, N, p*p*C_out)


class VDT(nn.Module):
    """Video diffusion transformer with temporal + spatial attention blocks and adaLN-Zero conditioning.

    Built from a complete :class:`VDTConfig` (``VDT(VDTConfig.from_name("VDT-L/2", in_channels=4,
    learn_sigma=True))``); the config is kept as ``self.config``.
    """

    # Where LoRA goes (vdiff.callbacks.LoRA; vdiff.models.lora_targets). Attention fuses q, k and v into one `qkv`
    # projection, so one rank-r update on it covers the three; `proj` is the output projection.
    LORA_PRESETS: ClassVar[dict[str, LoRATargets]] = {
        "attention": LoRATargets(r".*attn\.(qkv|proj)"),  # temporal and spatial attention of every block
        "temporal-attention": LoRATargets(r".*temporal_attn\.(qkv|proj)"),
        "spatial-attention": LoRATargets(r"blocks\.\d+\.attn\.(qkv|proj)"),
        "attention+mlp": LoRATargets(r".*attn\.(qkv|proj)|.*mlp\.(fc1|fc2)"),
    }

    def __init__(self, config: VDTConfig) -> None:
        super().__init__()
        config._check_complete()
        for name, kind in (("temporal_pos", config.temporal_pos), ("spatial_pos", config.spatial_pos)):
            if kind not in POSITION_KINDS:
                raise ValueError(f"VDT: {name} must be one of {POSITION_KINDS}, got {kind!r}")
        hidden_size, num_heads, patch_size = config.hidden_size, config.num_heads, config.patch_size
        if hidden_size % num_heads:
            raise ValueError(f"VDT: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        if "rope" in config.temporal_pos and head_dim % 2:
            raise ValueError(f"VDT: temporal RoPE needs an even head dim, got {head_dim}")
        if "rope" in config.spatial_pos and head_dim % 4:
            raise ValueError(f"VDT: spatial (2D) RoPE needs a head dim divisible by 4, got {head_dim}")
        if hidden_size % 4:
            raise ValueError(f"VDT: hidden_size must be a multiple of 4 for the 2D sin-cos table, got {hidden_size}")
        if config.input_size % patch_size:
            raise ValueError(f"VDT: input_size {config.input_size} must be a multiple of patch_size {patch_size}")
        self.config = config
        self.in_channels = int(config.in_channels)
        self.out_channels = config.out_channels
        self.learn_sigma = bool(config.learn_sigma)
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.temporal_pos = config.temporal_pos
        self.spatial_pos = config.spatial_pos
        self.rope_theta = config.rope_theta
        self.gradient_checkpointing = config.gradient_checkpointing
        in_channels, num_classes, mlp_ratio = self.in_channels, config.num_classes, config.mlp_ratio

        self.x_embedder = PatchEmbed2d(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size, config.class_dropout_prob) if num_classes is not None else None
        )
        # Reference-sized fixed tables, stored for checkpoint compatibility only (see the module docstring).
        self.register_buffer("pos_embed", torch.zeros(1, (config.input_size // patch_size) ** 2, hidden_size))
        self.register_buffer("time_embed", torch.zeros(1, config.num_frames, hidden_size))
        self.blocks = nn.ModuleList(
            [VDTBlock(hidden_size, num_heads, mlp_ratio, config.qk_norm) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._position_cache: dict[tuple, tuple] = {}
        self._register_load_state_dict_pre_hook(self._check_fixed_tables)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linears, zero biases, N(0, 0.02) embedders, zero adaLN and output layers."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        self.pos_embed.copy_(self._reference_pos_embed())
        self.time_embed.copy_(self._reference_time_embed())
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @staticmethod
    def block_classes() -> tuple[type[nn.Module], ...]:
        """The block classes to wrap one by one for FSDP (and the units of activation checkpointing and
        ``torch.compile``): :class:`VDTBlock`."""
        return (VDTBlock,)

    @property
    def null_class(self) -> int | None:
        """Label index meaning "no class" (for classifier-free guidance), or None."""
        return None if self.y_embedder is None else self.y_embedder.null_class

    def forward(
        self,
        x: Tensor,
        noise_level: Tensor,
        cond: dict[str, Tensor] | None = None,
        given_mask: Tensor | None = None,
    ) -> Tensor:
        """x: ``(B, T, C, H, W)``; noise_level: ``(B,)``; cond: optional ``{"class_label": long (B,)}``;
        given_mask: ignored (given content arrives in ``x``). Returns ``(B, T, C_out, H, W)``."""
        B, T, C, H, W = x.shape
        if self.in_channels != C:
            raise ValueError(f"VDT: input has {C} channels, the model was built for in_channels={self.in_channels}")
        if noise_level.shape != (B,):
            raise ValueError(f"VDT: noise_level must have shape ({B},) (one level per clip), got {tuple(noise_level.shape)}")
        p = self.patch_size
        h, w = H // p, W // p
        spatial, temporal, spatial_rope, temporal_rope = self._position_tables(T, h, w, x.device, x.dtype)

        x = self.x_embedder(x.reshape(B * T, C, H, W)).view(B, T, h * w, self.hidden_size)  # (B, T, N, D)
        if spatial is not None:
            x = x + spatial  # (B, T, N, D)
        if temporal is not None:
            x = x + temporal  # (B, T, N, D)
        c = self.t_embedder(noise_level)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(self._class_labels(cond, B, x.device))  # (B, D)

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, temporal_rope, spatial_rope, use_reentrant=False)  # (B, T, N, D)
            else:
                x = block(x, c, temporal_rope, spatial_rope)  # (B, T, N, D)
        x = self.final_layer(x, c)  # (B, T, N, p*p*C_out)
        return self.unpatchify(x, h, w)  # (B, T, C_out, H, W)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """``(B, T, h*w, p*p*C_out)`` patch values (channel fastest, as the reference) -> ``(B, T, C_out, H, W)``."""
        B, T = x.shape[:2]
        p, c = self.patch_size, self.out_channels
        x = x.view(B, T, h, w, p, p, c)  # (B, T, h, w, p, p, C_out)
        return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, T, c, h * p, w * p)  # (B, T, C_out, H, W)

    def _class_labels(self, cond: dict[str, Tensor] | None, batch: int, device: torch.device) -> Tensor:
        labels = None if cond is None else cond.get(CLASS_LABEL_KEY)
        if labels is None:
            if self.null_class is None:
                raise ValueError(
                    f"VDT: built with num_classes={self.y_embedder.num_classes} and no null class "
                    f"(class_dropout_prob=0), so cond[{CLASS_LABEL_KEY!r}] is required"
                )
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if labels.shape != (batch,):
            raise ValueError(f"VDT: cond[{CLASS_LABEL_KEY!r}] must have shape ({batch},), got {tuple(labels.shape)}")
        return labels

    #################################################################################
    #                           Position embeddings                                 #
    #################################################################################

    def _position_tables(self, T: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """Sin-cos tables (``(N, D)`` spatial, ``(T, 1, D)`` temporal) and RoPE ``(cos, sin)`` pairs for this
        ``(T, h, w)``, each None where unused; cached per size, device and dtype."""
        key = (T, h, w, device, dtype)
        cached = self._position_cache.get(key)
        if cached is not None:
            return cached
        D, head_dim = self.hidden_size, self.hidden_size // self.num_heads
        frames = torch.arange(T)
        spatial = sincos_2d(D, h, w).to(device, dtype) if "sincos" in self.spatial_pos else None
        temporal = sincos_1d(D, frames)[:, None].to(device, dtype) if "sincos" in self.temporal_pos else None
        spatial_rope = rope_cos_sin(rope_angles_2d(h, w, head_dim, self.rope_theta), device, dtype) if "rope" in self.spatial_pos else None
        temporal_rope = rope_cos_sin(rope_angles_1d(frames, head_dim, self.rope_theta), device, dtype) if "rope" in self.temporal_pos else None
        if len(self._position_cache) >= 16:
            self._position_cache.clear()
        self._position_cache[key] = (spatial, temporal, spatial_rope, temporal_rope)
        return self._position_cache[key]

    def _reference_pos_embed(self) -> Tensor:
        side = round(self.pos_embed.shape[1] ** 0.5)
        return sincos_2d(self.hidden_size, side, side).float()[None]  # (1, side*side, D)

    def _reference_time_embed(self) -> Tensor:
        return sincos_1d(self.hidden_size, torch.arange(self.time_embed.shape[1])).float()[None]  # (1, num_frames, D)

    def _check_fixed_tables(self, state_dict: dict, prefix: str, *args) -> None:
        """Load pre-hook: the stored ``pos_embed``/``time_embed`` must be the sin-cos tables this model
        computes, because ``forward`` computes them instead of reading the buffers."""
        for name, reference in (("pos_embed", self._reference_pos_embed), ("time_embed", self._reference_time_embed)):
            value = state_dict.get(prefix + name)
            if value is None or value.is_meta or value.shape != getattr(self, name).shape:
                continue  # missing keys and shape mismatches are reported by load_state_dict itself
            diff = (value.detach().float().cpu() - reference()).abs().max().item()
            tolerance = max(1e-3, torch.finfo(value.dtype).eps) if value.dtype.is_floating_point else 1e-3  # bf16 tables round by ~4e-3
            if diff > tolerance:
                raise ValueError(
                    f"VDT: checkpoint {prefix + name} is not the fixed sin-cos table (max abs difference {diff:.3g}); "
                    f"this model computes sin-cos position embeddings and cannot use a learned or different table"
                )


#################################################################################
#                                 VDT Configs                                   #
#################################################################################

# Named sizes as data. S/2 and L/2 are the paper's; B/2 is vdiff's size between them (not in the VDT
# paper or code). VDT's released Physion checkpoint: VDTConfig.from_name("VDT-L/2", input_size=16,
# num_classes=1, in_channels=4, learn_sigma=True).
VDT_CONFIGS: dict[str, VDTConfig] = {
    "VDT-S/2": VDTConfig(patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "VDT-B/2": VDTConfig(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    "VDT-L/2": VDTConfig(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}
