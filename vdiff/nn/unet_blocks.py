"""Blocks of spatio-temporal UNets (Stable Video Diffusion's ``VideoUNet``): residual blocks with a timestep
embedding, their (3,1,1) temporal twins, spatial + temporal transformers, cross-attention to a per-clip context,
and the learned spatial/temporal blend (the 2x resampling layers are :mod:`vdiff.nn.resnet`'s).

Layouts (``B`` clips, ``T`` frames, ``S = H*W`` positions, ``E`` the time-embedding width):

- a UNet activation is ``(B*T, C, H, W)``: frames of a clip are consecutive (clip-major), as 2D layers want;
- a time embedding is ``(B, 1, E)`` (one per clip) or ``(B, T, E)`` (one per frame): blocks broadcast over frames;
- transformer tokens are ``(B*T, S, D)``, viewed as ``(B, T, S, D)`` by the temporal blocks, which attend over
  ``T`` by permuting only inside the attention (their norms and feed-forwards are per-token);
- a context (cross-attention keys/values) is ``(B, N, D_ctx)`` per clip. Every frame and every position of a
  clip attends to the same tokens, so keys and values are computed once per clip and all ``T*S`` queries of the
  clip share them: the same values as repeating the context per frame (or per position) first.

Actions (Vista's action control, optional: ``action_dim > 0``): every cross-attention owns a zero-initialised,
bias-free projection ``action_kv`` of a per-clip action vector ``(B, action_dim)`` that is ADDED to the keys and
values of every context token (Vista's ``k_adapter_action_control`` / ``v_adapter_action_control``, which add to
``to_k(context)`` / ``to_v(context)``; the action vector is not a token of its own). At initialisation, and for an
all-zero action vector (unconditional), the keys and values are exactly the context's, so the block computes what it
computes without the projection.

The blend of a spatial output ``s`` and a temporal output ``t`` is :mod:`vdiff.nn.blend`'s ``alpha*s +
(1-alpha)*t`` with ``alpha = sigmoid(mix_factor)``, forced to 1 for frames an ``image_only_indicator`` marks as
images (their output is then exactly the spatial one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.nn.attention import Attention
from vdiff.nn.blend import blend, mix_alpha
from vdiff.nn.embeddings import timestep_embedding
from vdiff.nn.resnet import TemporalConv

GROUPS = 32  # GroupNorm groups of SVD's UNet (hard-coded in sgm and diffusers)


#################################################################################
#                                 Residual blocks                               #
#################################################################################


class TimestepResBlock(nn.Module):
    """2D residual block with an added time embedding (openai / SD UNet ``ResBlock``), per frame:
    GroupNorm-SiLU-conv3x3, ``+ Linear(SiLU(emb))``, GroupNorm-SiLU-conv3x3, 1x1 skip when channels change."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.norm1 = nn.GroupNorm(GROUPS, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: ``(B*T, C_in, H, W)``; emb: ``(B, 1|T, E)``. Returns ``(B*T, C_out, H, W)``."""
        BT, _, H, W = x.shape
        B, C = emb.shape[0], self.out_channels
        h = self.conv1(F.silu(self.norm1(x)))  # (B*T, C, H, W)
        e = self.emb_proj(F.silu(emb))  # (B, 1|T, C)
        h = (h.view(B, BT // B, C, H, W) + e[..., None, None]).view(BT, C, H, W)  # (B*T, C, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B*T, C, H, W)
        return self.skip(x) + h


class TemporalResBlock(nn.Module):
    """The same block over time only: (3,1,1) convolutions on ``(B, C, T, H, W)``. Its GroupNorm statistics
    span the frames of a clip (as sgm's and diffusers' do). Channels in = out, identity skip."""

    def __init__(self, channels: int, emb_channels: int, eps: float = 1e-5, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, channels, eps=eps)
        self.conv1 = TemporalConv(channels, channels, kernel_size)
        self.emb_proj = nn.Linear(emb_channels, channels)
        self.norm2 = nn.GroupNorm(GROUPS, channels, eps=eps)
        self.conv2 = TemporalConv(channels, channels, kernel_size)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: ``(B, C, T, H, W)``; emb: ``(B, 1|T, E)``. Returns ``(B, C, T, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, T, H, W)
        e = self.emb_proj(F.silu(emb)).transpose(1, 2)  # (B, C, 1|T)
        h = h + e[..., None, None]  # (B, C, T, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C, T, H, W)
        return x + h


class SpatioTemporalResBlock(nn.Module):
    """SVD's ``VideoResBlock``: a spatial :class:`TimestepResBlock` per frame, then a :class:`TemporalResBlock`
    on its output; returns ``alpha*spatial + (1-alpha)*temporal``, ``alpha = sigmoid(mix_factor)`` (1 for
    image-only frames)."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, eps: float = 1e-5, merge_factor: float = 0.5
    ) -> None:
        super().__init__()
        self.spatial = TimestepResBlock(in_channels, out_channels, emb_channels, eps)
        self.temporal = TemporalResBlock(out_channels, emb_channels, eps)
        self.mix_factor = nn.Parameter(torch.tensor([merge_factor]))

    def forward(self, x: Tensor, emb: Tensor, num_frames: int, image_only_indicator: Tensor | None = None) -> Tensor:
        """x: ``(B*T, C_in, H, W)``; emb: ``(B, 1|T, E)``; image_only_indicator: ``(B, T)`` or None.
        Returns ``(B*T, C_out, H, W)``."""
        T = num_frames
        s = self.spatial(x, emb)  # (B*T, C, H, W)
        BT, C, H, W = s.shape
        B = BT // T
        s = s.view(B, T, C, H, W)  # (B, T, C, H, W)
        t = self.temporal(s.transpose(1, 2).contiguous(), emb)  # (B, C, T, H, W)
        alpha = mix_alpha(self.mix_factor, image_only_indicator, B, T)  # () or (B, T)
        if alpha.ndim:
            alpha = alpha[:, :, None, None, None]  # (B, T, 1, 1, 1)
        return blend(s, t.transpose(1, 2), alpha).view(BT, C, H, W)  # (B*T, C, H, W)


#################################################################################
#                                   Attention                                   #
#################################################################################


class ContextCrossAttention(nn.Module):
    """Cross-attention of ``(B, L, D)`` queries to a per-clip context ``(B, N, D_ctx)`` on torch SDPA.

    Parameters: ``q`` (no bias), ``kv`` (keys and values in one projection, no bias: rows ``[k; v]``), ``proj``
    (with bias), and with ``action_dim > 0`` ``action_kv`` (``Linear(action_dim, 2*dim)``, no bias, rows ``[k; v]``,
    ZERO-initialised): ``action_kv(actions)`` is added to the keys and values of every context token (module
    docstring). ``L`` may hold every token of a clip (``T*S``): the context is the same for all of them.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, action_dim: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ContextCrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.action_dim = action_dim
        if action_dim:
            self.action_kv = nn.Linear(action_dim, 2 * dim, bias=False)
            nn.init.zeros_(self.action_kv.weight)

    def forward(self, x: Tensor, context: Tensor, actions: Tensor | None = None) -> Tensor:
        """x: ``(B, L, D)``; context: ``(B, N, D_ctx)``; actions: ``(B, action_dim)`` or None (only with
        ``action_dim > 0``; None and zeros are the same: unconditional). Returns ``(B, L, D)``."""
        B, L, D = x.shape
        N = context.shape[1]
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        kv = self.kv(context)  # (B, N, 2D)
        if actions is not None:
            if not self.action_dim:
                raise ValueError("ContextCrossAttention: actions given, but the layer was built with action_dim=0")
            kv = kv + self.action_kv(actions)[:, None]  # (B, N, 2D): the same addition for every context token
        kv = kv.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class FrameAttention(nn.Module):
    """Self-attention over the frames of every position: ``(B, T, S, D)`` tokens, each of the ``B*S`` sequences
    of length ``T`` attends within itself. ``qkv`` (no bias; rows ``[q; k; v]``) and ``proj`` (with bias).
    Tokens stay in ``(B, T, S, D)`` order outside this module."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"FrameAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, T, S, D)``. Returns ``(B, T, S, D)``."""
        B, T, S, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, S, 3, H, Dh).permute(3, 0, 2, 4, 1, 5)  # (3, B, S, H, T, Dh)
        q, k, v = qkv.reshape(3, B * S, H, T, Dh).unbind(0)  # 3 x (B*S, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*S, H, T, Dh)
        out = out.view(B, S, H, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, S, D)  # (B, T, S, D)
        return self.proj(out)  # (B, T, S, D)


class GEGLUFeedForward(nn.Module):
    """``Linear(dim, 2*inner)`` -> ``value * GELU(gate)`` (value = first half, gate = second) -> ``Linear(inner, dim_out)``."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.proj_out = nn.Linear(inner, dim_out or dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (..., inner)
        return self.proj_out(value * F.gelu(gate))  # (..., dim_out)


#################################################################################
#                                  Transformers                                 #
#################################################################################


class SpatialTransformerBlock(nn.Module):
    """Pre-norm block per frame: self-attention over positions, cross-attention to the context (and the actions,
    with ``action_dim > 0``), GEGLU MLP."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, action_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = ContextCrossAttention(dim, context_dim, num_heads, action_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, actions: Tensor | None = None) -> Tensor:
        """x: ``(B*T, S, D)``; context: ``(B, N, D_ctx)``; actions: ``(B, action_dim)`` or None.
        Returns ``(B*T, S, D)``."""
        BT, S, D = x.shape
        B = context.shape[0]
        x = x + self.attn1(self.norm1(x))  # (B*T, S, D)
        x = x + self.attn2(self.norm2(x).view(B, (BT // B) * S, D), context, actions).view(BT, S, D)  # (B*T, S, D)
        return x + self.ff(self.norm3(x))  # (B*T, S, D)


class TemporalTransformerBlock(nn.Module):
    """SVD's ``VideoTransformerBlock`` over ``(B, T, S, D)`` tokens: a residual GEGLU MLP in (``ff_in``),
    self-attention over frames, cross-attention to the context (and the actions, with ``action_dim > 0``), GEGLU
    MLP; all pre-norm."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, action_dim: int = 0) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = GEGLUFeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = FrameAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = ContextCrossAttention(dim, context_dim, num_heads, action_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, actions: Tensor | None = None) -> Tensor:
        """x: ``(B, T, S, D)``; context: ``(B, N, D_ctx)``; actions: ``(B, action_dim)`` or None.
        Returns ``(B, T, S, D)``."""
        B, T, S, D = x.shape
        x = x + self.ff_in(self.norm_in(x))  # (B, T, S, D)
        x = x + self.attn1(self.norm1(x))  # (B, T, S, D)
        x = x + self.attn2(self.norm2(x).view(B, T * S, D), context, actions).view(B, T, S, D)  # (B, T, S, D)
        return x + self.ff(self.norm3(x))  # (B, T, S, D)


class SpatioTemporalTransformer(nn.Module):
    """SVD's ``SpatialVideoTransformer`` on ``(B*T, C, H, W)`` maps: GroupNorm, linear in, then per depth a
    spatial block and a temporal block (whose input also gets a frame-index embedding: ``C``-d sinusoid of
    ``0..T-1`` through ``Linear-SiLU-Linear``), blended ``alpha*spatial + (1-alpha)*temporal``; linear out and
    a residual. ``channels`` must equal ``num_heads * head_dim`` (SVD's layout). With ``action_dim > 0`` every
    cross-attention (spatial and temporal) also reads the per-clip actions (module docstring)."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        depth: int = 1,
        merge_factor: float = 0.5,
        action_dim: int = 0,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            [SpatialTransformerBlock(channels, num_heads, context_dim, action_dim) for _ in range(depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, num_heads, context_dim, action_dim) for _ in range(depth)]
        )
        self.frame_embed = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, channels)
        )
        self.mix_factor = nn.Parameter(torch.tensor([merge_factor]))
        self.proj_out = nn.Linear(channels, channels)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        num_frames: int,
        image_only_indicator: Tensor | None = None,
        actions: Tensor | None = None,
    ) -> Tensor:
        """x: ``(B*T, C, H, W)``; context: ``(B, N, D_ctx)``; image_only_indicator: ``(B, T)`` or None; actions:
        ``(B, action_dim)`` or None (zeros and None: unconditional). Returns ``(B*T, C, H, W)``."""
        T = num_frames
        BT, C, H, W = x.shape
        B, S = BT // T, H * W
        h = self.norm(x).permute(0, 2, 3, 1).reshape(BT, S, C)  # (B*T, S, C)
        h = self.proj_in(h)  # (B*T, S, C)
        frames = torch.arange(T, device=x.device)
        frame_emb = self.frame_embed(timestep_embedding(frames, C).to(h.dtype))  # (T, C)
        frame_emb = frame_emb[:, None, :]  # (T, 1, C)
        alpha = mix_alpha(self.mix_factor, image_only_indicator, B, T)  # () or (B, T)
        if alpha.ndim:
            alpha = alpha[:, :, None, None]  # (B, T, 1, 1)
        for block, temporal_block in zip(self.blocks, self.temporal_blocks):
            h = block(h, context, actions).view(B, T, S, C)  # (B, T, S, C)
            t = temporal_block(h + frame_emb, context, actions)  # (B, T, S, C)
            h = blend(h, t, alpha).view(BT, S, C)  # (B*T, S, C)
        h = self.proj_out(h)  # (B*T, S, C)
        return x + h.view(BT, H, W, C).permute(0, 3, 1, 2)  # (B*T, C, H, W)


#################################################################################
#                               Conditioning embeds                             #
#################################################################################


class AddedTimeEmbedder(nn.Module):
    """SVD's "added time ids" (``fps_id``, ``motion_bucket_id``, ``cond_aug``, ...): each scalar gets a
    ``frequency_dim``-d ``[cos, sin]`` sinusoid; the concatenation goes through ``Linear-SiLU-Linear``."""

    def __init__(self, num_ids: int, frequency_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.num_ids = num_ids
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(num_ids * frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, ids: Tensor) -> Tensor:
        """ids: ``(B, num_ids)``. Returns ``(B, hidden_size)``."""
        B = ids.shape[0]
        freq = timestep_embedding(ids.reshape(-1), self.frequency_dim).view(B, self.num_ids * self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, hidden_size)
