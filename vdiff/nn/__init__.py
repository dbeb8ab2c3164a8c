"""Reusable building blocks: attention (SDPA, QK-norm, RoPE), embeddings, adaLN modulation, norms, resnet blocks.

Import from the submodules (``vdiff.nn.attention``, ``vdiff.nn.embeddings``, ...); this package
re-exports the transformer blocks most models use.
"""

from vdiff.nn.attention import Attention
from vdiff.nn.embeddings import (
    LabelEmbedder,
    PatchEmbed2d,
    TimestepEmbedder,
    apply_rope,
    rope_angles_1d,
    rope_angles_2d,
    rope_cos_sin,
    sincos_1d,
    sincos_2d,
    timestep_embedding,
)
from vdiff.nn.modulation import adaln_modulation, gated_residual, modulate

__all__ = [
    "Attention",
    "LabelEmbedder",
    "PatchEmbed2d",
    "TimestepEmbedder",
    "adaln_modulation",
    "apply_rope",
    "gated_residual",
    "modulate",
    "rope_angles_1d",
    "rope_angles_2d",
    "rope_cos_sin",
    "sincos_1d",
    "sincos_2d",
    "timestep_embedding",
]
