"""Attention (SDPA, QK-norm, RoPE) and embedding blocks of vdiff.nn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vdiff.nn.attention import Attention
from vdiff.nn.embeddings import (
    PatchEmbed2d,
    apply_rope,
    rope_angles_1d,
    rope_angles_2d,
    rope_cos_sin,
    sincos_1d,
    sincos_2d,
    timestep_embedding,
)


def naive_attention(attn: Attention, x: torch.Tensor, rope=None) -> torch.Tensor:
    """Multi-head attention written out with explicit loops over heads and a softmax, from attn's weights."""
    B, L, D = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, L, 3D)
    q_all, k_all, v_all = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    heads = []
    for h in range(H):
        q = attn.q_norm(q_all[..., h * Dh : (h + 1) * Dh])
        k = attn.k_norm(k_all[..., h * Dh : (h + 1) * Dh])
        v = v_all[..., h * Dh : (h + 1) * Dh]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)  # (B, L, L)
        heads.append(weights @ v)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("qk_norm", [None, "rms", "layer"])
@pytest.mark.parametrize("use_rope", [False, True])
def test_sdpa_attention_matches_naive_reference(qk_norm, use_rope):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qk_norm=qk_norm)
    if qk_norm is not None:  # non-trivial norm weights so the test sees them
        torch.nn.init.normal_(attn.q_norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(attn.k_norm.weight, 1.0, 0.3)
    x = torch.randn(3, 7, 32)
    rope = rope_cos_sin(rope_angles_1d(torch.arange(7), attn.head_dim)) if use_rope else None
    torch.testing.assert_close(attn(x, rope=rope), naive_attention(attn, x, rope), rtol=1e-5, atol=1e-5)


def test_qk_norm_normalises_queries_and_trains():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qk_norm="rms")
    x = torch.randn(2, 5, 32) * 50.0  # large activations: RMS-normed q, k keep logits bounded
    attn(x).square().mean().backward()
    assert attn.q_norm.weight.grad is not None and attn.q_norm.weight.grad.abs().sum() > 0
    plain = Attention(32, num_heads=4)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if "norm" not in k})
    assert not torch.allclose(plain(x), attn(x))
    with pytest.raises(ValueError, match="qk_norm"):
        Attention(32, num_heads=4, qk_norm="batch")


def test_rope_1d_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16)
    positions = torch.arange(6)
    scores = {}
    for shift in (0, 5, 37):
        cos, sin = rope_cos_sin(rope_angles_1d(positions + shift, 16), dtype=torch.float64)
        scores[shift] = apply_rope(q.double(), cos, sin) @ apply_rope(k.double(), cos, sin).transpose(-1, -2)
    torch.testing.assert_close(scores[5], scores[0])
    torch.testing.assert_close(scores[37], scores[0])
    # and it does encode position: rotation changes the scores relative to no rotation
    assert not torch.allclose(scores[0], q.double() @ k.double().transpose(-1, -2))


def test_rope_2d_is_relative_in_both_axes():
    torch.manual_seed(0)
    dim = 16
    q, k = torch.randn(1, 2, 12, dim).double(), torch.randn(1, 2, 12, dim).double()
    base = rope_angles_2d(3, 4, dim)  # (12, dim/2): rows 0..2, cols 0..3
    # shifting every row index by 2 and every column by 5 adds a constant angle per channel pair
    quarter = dim // 4
    shifted = base.clone()
    shifted[:, :quarter] += rope_angles_1d(torch.tensor([2.0]), dim // 2)
    shifted[:, quarter:] += rope_angles_1d(torch.tensor([5.0]), dim // 2)

    def scores(angles):
        cos, sin = rope_cos_sin(angles, dtype=torch.float64)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    torch.testing.assert_close(scores(shifted), scores(base))
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_angles_2d(2, 2, 6)


def test_apply_rope_preserves_norm():
    x = torch.randn(4, 9, 8).double()
    cos, sin = rope_cos_sin(rope_angles_1d(torch.arange(9), 8), dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def _mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos table of MAE's pos_embed.py, written out element by element."""
    out = np.zeros((len(pos), dim))
    for m, p in enumerate(pos):
        for i in range(dim // 2):
            out[m, i] = np.sin(p / 10000 ** (i / (dim / 2)))
            out[m, dim // 2 + i] = np.cos(p / 10000 ** (i / (dim / 2)))
    return out


def test_sincos_tables_match_mae_layout():
    torch.testing.assert_close(sincos_1d(8, torch.arange(5)), torch.from_numpy(_mae_1d(8, np.arange(5))))
    h, w, dim = 3, 4, 16
    table = sincos_2d(dim, h, w)  # (h*w, dim), row-major
    for r in range(h):
        for c in range(w):
            expected = np.concatenate([_mae_1d(dim // 2, [c])[0], _mae_1d(dim // 2, [r])[0]])
            torch.testing.assert_close(table[r * w + c], torch.from_numpy(expected))


def test_timestep_embedding_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))


def test_patch_embed_any_size_and_clear_error():
    embed = PatchEmbed2d(3, 16, patch_size=2)
    tokens = embed(torch.randn(2, 3, 6, 10))
    assert tokens.shape == (2, 15, 16) and tokens.is_contiguous()
    with pytest.raises(ValueError, match="multiples of patch_size"):
        embed(torch.randn(1, 3, 5, 4))
