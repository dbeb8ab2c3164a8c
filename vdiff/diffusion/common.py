"""What every diffusion process in vdiff shares: the denoiser call and given-content handling.

The denoiser contract (docs/architecture.md, "Contracts"). A network is called as::

    net(x, noise_level, cond, given_mask) -> output

``x``            ``(B, T, C, H, W)`` preconditioned input; where ``given_mask`` is true it holds the
                 clean given content (``x0``), preconditioned like the rest of the clip.
``noise_level``  ``(B,)`` one noise level per clip (EDM ``c_noise``, a DDPM timestep, or ``1000 t`` for flow matching).
``cond``         ``dict[str, Tensor]`` of conditioning tensors (may be empty).
``given_mask``   bool, broadcastable to ``x`` (``(B, T, 1, H, W)`` or ``(B, T, 1, 1, 1)``), true
                 where content is given, or ``None`` when nothing is given.
``output``       ``(B, T, C_out, H, W)``; what it means (eps, v, x0, EDM F) is the process's choice.

Given content enters clean at training and is pasted back before every sampling step; the loss
counts generated elements only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

# What every training process's ``training_losses`` returns, so a recipe can switch the process:
# "loss" (scalar, optimised), "loss_per_clip" (B,), "mse" (scalar, unweighted squared error over
# generated elements), "vb" (scalar, variational-bound term; 0 where the process has none),
# "noise_level" (B,) (DDPM timestep, EDM sigma or flow time t) and "denoised" (B, T, C, H, W) (the x0 estimate).
LOSS_KEYS: tuple[str, ...] = ("loss", "loss_per_clip", "mse", "vb", "noise_level", "denoised")
EXTRA_LOSS = "loss_extra"  # the sum of the added terms (add_loss_terms)


class DenoiserNetwork(Protocol):
    """A network called through the denoiser contract (module docstring): ``net(x, noise_level, cond,
    given_mask) -> output``, x ``(B, T, C, H, W)``, noise_level ``(B,)``, output ``(B, T, C_out, H, W)``. What
    the output means is the process's choice; EDM's :class:`~vdiff.diffusion.edm.PreconditionedDenoiser` wraps
    such a network into ``D(x; sigma)``."""

    def __call__(self, x: Tensor, noise_level: Tensor, cond: dict[str, Tensor], given_mask: Tensor | None) -> Tensor: ...


def replace_given(x: Tensor, given: Tensor | None, given_mask: Tensor | None) -> Tensor:
    """Return ``x`` with the given content pasted in where ``given_mask`` is true.

    x, given: ``(B, T, C, H, W)``; given_mask: bool broadcastable to ``x``. No-op when either is None.
    """
    if given is None or given_mask is None:
        return x
    return torch.where(given_mask, given.to(x.dtype), x)


def masked_mean(values: Tensor, given_mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over generated elements only (``given_mask`` false), per clip.

    values: ``(B, T, C, H, W)``; given_mask: bool broadcastable to it, or None (mean over all).
    Returns ``(B,)``. A clip with nothing to generate contributes 0 (not NaN).
    """
    dims = tuple(range(1, values.ndim))
    if given_mask is None:
        return values.mean(dim=dims)
    generated = (~given_mask).expand_as(values).to(values.dtype)
    total = (values * generated).sum(dim=dims)
    count = generated.sum(dim=dims)
    return total / count.clamp_min(1.0)


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append singleton dims so that a per-clip ``(B,)`` tensor broadcasts over ``ndim`` dims."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def check_sampler_inputs(noise: Tensor, given: Tensor | None, given_mask: Tensor | None, where: str) -> None:
    """Raise a clear error (prefixed ``where``, e.g. the sampler's name) unless a sampler's inputs fit.

    noise: ``(B, T, C, H, W)``; given and given_mask: both None, or ``given`` of noise's shape and a
    bool ``given_mask`` broadcastable to it (true = given).
    """
    if noise.ndim != 5:
        raise ValueError(f"{where}: noise must be (B, T, C, H, W), got shape {tuple(noise.shape)}")
    if (given is None) != (given_mask is None):
        raise ValueError(f"{where}: pass given and given_mask together (got given={'set' if given is not None else None}, "
                         f"given_mask={'set' if given_mask is not None else None})")
    if given is not None and given_mask is not None:
        if given.shape != noise.shape:
            raise ValueError(f"{where}: given has shape {tuple(given.shape)}, noise {tuple(noise.shape)}; they must match")
        if given_mask.dtype != torch.bool:
            raise TypeError(f"{where}: given_mask must be bool (true = given), got {given_mask.dtype}")
        torch.broadcast_shapes(given_mask.shape, noise.shape)


def add_loss_terms(losses: Mapping[str, Tensor], terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A process's loss dict (:data:`LOSS_KEYS`) with extra terms added; returns a new dict.

    terms: ``{name: per-clip (B,) tensor}`` (a scalar counts for every clip). Each adds ``loss_<name>`` (its
    mean) and ``loss_<name>_per_clip``; their sum is ``loss_extra`` / ``loss_extra_per_clip``, added to ``loss``
    (``loss + loss_extra``) and ``loss_per_clip``. The other keys are unchanged. No terms: ``losses`` as given.
    """
    out = dict(losses)
    if not terms:
        return out
    clips = losses["loss_per_clip"].shape[0]
    total: Tensor | None = None
    for name, term in terms.items():
        key = f"loss_{name}"
        if key in losses or key == EXTRA_LOSS:
            raise ValueError(f"extra loss term {name!r}: {key!r} is already a loss key; name the term otherwise")
        if term.ndim == 0:
            term = term.expand(clips)
        if tuple(term.shape) != (clips,):
            raise ValueError(f"extra loss term {name!r} must be per clip, ({clips},) or a scalar, got {tuple(term.shape)}")
        out[key], out[f"{key}_per_clip"] = term.mean(), term
        total = term if total is None else total + term
    out[EXTRA_LOSS], out[f"{EXTRA_LOSS}_per_clip"] = total.mean(), total
    out["loss"] = losses["loss"] + out[EXTRA_LOSS]
    out["loss_per_clip"] = losses["loss_per_clip"] + total
    return out
