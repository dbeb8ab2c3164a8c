"""Multi-head self-attention on torch SDPA, with optional QK-norm and rotary position embeddings.

Parameter names follow timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``), so DiT-family
checkpoints (DiT, VDT) load without renaming. One fused ``qkv`` projection instead of three: one GEMM
and one read of the input instead of three.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.nn.embeddings import apply_rope

QKNorm = Literal["rms", "layer"]


def _qk_norm_layer(kind: QKNorm | None, head_dim: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    raise ValueError(f"qk_norm must be None, 'rms' or 'layer', got {kind!r}")


class Attention(nn.Module):
    """Self-attention over ``(B, L, D)`` sequences; optional per-head QK-norm and RoPE (given per call)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: QKNorm | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm_layer(qk_norm, self.head_dim)
        self.k_norm = _qk_norm_layer(qk_norm, self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: ``(B, L, D)``; rope: ``(cos, sin)`` each ``(L, head_dim/2)`` or None. Returns ``(B, L, D)``."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, L, Dh)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
