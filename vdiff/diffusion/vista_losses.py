"""Vista's two extra training losses (Gao et al., 2024; OpenDriveLab/Vista ``vwm/modules/diffusionmodules/loss.py``),
model-agnostic, vectorised and on any device: they read only the x0 estimate, the clean target, the given mask and
the per-clip loss weight, which every vdiff process's ``training_losses`` provides (:data:`LOSS_KEYS`: ``denoised``,
``noise_level``; the weight is e.g. ``EDMDiffusion.weight(sigma)``).

Notation: ``D`` the x0 estimate (``denoised``, the given content pasted in), ``X`` the target ``x0``, both
``(B, T, C, H, W)``; ``w`` the per-clip weight ``(B,)`` (EDM's ``lambda(sigma)``; 1 when None); ``mean_gen`` the mean
over generated elements of a clip (:func:`vdiff.diffusion.common.masked_mean`: given elements are left out, as in
the rest of vdiff); ``e = (D - X)^2``. The diffusion loss vdiff's EDM optimises is ``w * mean_gen(e)``.

**Dynamics enhancement** (``loss_dynamics``). Vista reweights the diffusion loss by ``1 + a`` with, for frames
``t >= 1``, ``q_t = ((X_t - X_{t-1}) - (D_t - D_{t-1}))^2`` (elementwise) and ``a_t = q_t / max(||q||, 1e-12)``, the
norm taken per clip and channel over every frame difference and position (Vista's ``F.normalize(p=2)`` over its
``b (t h w) c`` layout), ``a_0 = 0``; ``a`` is DETACHED (a weight, not a loss of its own). The extra loss is the
reweighting's increment::

    loss_dynamics_per_clip = lambda_d * w * mean_gen(e * a)

so that ``w * mean_gen(e) + loss_dynamics = w * mean_gen(e * (1 + lambda_d * a))``, Vista's loss for
``lambda_d = 1``. ``a`` is at most 1 and ``sum(a^2) = 1`` per clip and channel.

**Structure preservation** (``loss_structure``). A high-pass filter per frame and channel,
``HP(x) = Re(ifft2(fft2(x) * M))``, with Vista's ``fourier_filter(x, scale=0, d_s=0.25)`` mask: on the fftshifted
frequency grid, ``M[h, w] = 0`` where ``(2h/H - 1)^2 + (2w/W - 1)^2 <= 2 * d_s`` (a disc of radius ``sqrt(0.5)``
in coordinates running over [-1, 1): frequencies up to about 0.354 cycles per sample), 1 elsewhere; precomputed
once per size (:func:`highpass_mask`, ifftshifted so it multiplies ``fft2``'s output directly; Vista builds it
with a per-pixel Python loop, on the GPU, every call). Then::

    loss_structure_per_clip = lambda_s * w * mean_gen((HP(D) - HP(X))^2)

(Vista: ``lambda_s = 0.1``, with the same weight ``w``).

Both are on by default with Vista's weights; :func:`vista_losses` returns them, their sum (``loss_extra``) and their
per-clip values; :func:`add_losses` adds them to a process's loss dict. Differences from Vista, none in the formulas:
the means run over generated elements (Vista pastes the given frames into the prediction, so their error is 0, but
divides by every element), the loss is computed in at least fp32 (the FFT in fp32 or fp64), and only Vista's l2 form
is implemented (not its l1 variant).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from vdiff.diffusion.common import EXTRA_LOSS, add_loss_terms, masked_mean, replace_given

LOSS_DYNAMICS = "loss_dynamics"
LOSS_STRUCTURE = "loss_structure"
LOSS_EXTRA = EXTRA_LOSS
VISTA_LOSS_KEYS: tuple[str, ...] = (
    LOSS_DYNAMICS,
    f"{LOSS_DYNAMICS}_per_clip",
    LOSS_STRUCTURE,
    f"{LOSS_STRUCTURE}_per_clip",
    LOSS_EXTRA,
    f"{LOSS_EXTRA}_per_clip",
)
VISTA_DYNAMICS_WEIGHT = 1.0
VISTA_STRUCTURE_WEIGHT = 0.1  # Vista's additional_loss_weight
VISTA_HIGHPASS_DS = 0.25  # Vista's fourier_filter d_s: low frequencies inside (2h/H-1)^2 + (2w/W-1)^2 <= 2 d_s removed
NORM_EPS = 1e-12  # F.normalize's eps


@functools.lru_cache(maxsize=32)
def _highpass_mask_cached(height: int, width: int, d_s: float, device: torch.device) -> Tensor:
    # A normal tensor even when first asked for under torch.inference_mode (Lightning's validation): a cached inference
    # tensor would make every later training step fail in backward.
    with torch.inference_mode(False):
        # float64 on the CPU: the same arithmetic as Vista's Python floats, so the disc's edge falls on the same bins
        h = 2.0 * torch.arange(height, dtype=torch.float64) / height - 1.0  # (H,)
        w = 2.0 * torch.arange(width, dtype=torch.float64) / width - 1.0  # (W,)
        shifted = (h[:, None] ** 2 + w[None, :] ** 2 > 2.0 * d_s).to(torch.float32)  # (H, W), fftshifted layout
        return torch.fft.ifftshift(shifted).to(device)  # (H, W), fft2's layout


def highpass_mask(
    height: int, width: int, d_s: float = VISTA_HIGHPASS_DS, device: torch.device | str | None = None
) -> Tensor:
    """The high-pass mask ``(H, W)`` float32 in ``torch.fft.fft2``'s (unshifted) layout: 0 on Vista's low-frequency
    disc, 1 elsewhere (module docstring). Cached per size, ``d_s`` and device; do not modify it in place."""
    if height < 1 or width < 1:
        raise ValueError(f"highpass_mask: size must be positive, got ({height}, {width})")
    return _highpass_mask_cached(int(height), int(width), float(d_s), torch.device(device or "cpu"))


def highpass(x: Tensor, d_s: float = VISTA_HIGHPASS_DS) -> Tensor:
    """``Re(ifft2(fft2(x) * M))`` over the last two dims of ``x`` (``(..., H, W)``), computed in fp32 (fp64 for
    fp64 input); returns that dtype. Equal to Vista's ``fourier_filter(x, scale=0, d_s)``."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = highpass_mask(x.shape[-2], x.shape[-1], d_s, x.device).to(dtype)
    return torch.fft.ifft2(torch.fft.fft2(x.to(dtype)) * mask).real


def dynamics_reweighting(denoised: Tensor, target: Tensor) -> Tensor:
    """Vista's detached dynamics weight ``a`` ``(B, T, C, H, W)`` (module docstring): 0 for frame 0, for ``t >= 1`` the
    squared mismatch of the frame differences normalised per clip and channel by its L2 norm over ``(t, h, w)``.
    The reweighting factor is ``1 + a``. Computed without gradient."""
    with torch.no_grad():
        B, T, C, H, W = target.shape
        out = torch.zeros(target.shape, dtype=torch.promote_types(denoised.dtype, torch.float32), device=target.device)
        if T < 2:
            return out
        d, x = denoised.to(out.dtype), target.to(out.dtype)
        q = ((x[:, 1:] - x[:, :-1]) - (d[:, 1:] - d[:, :-1])) ** 2  # (B, T-1, C, H, W)
        norm = q.transpose(1, 2).reshape(B, C, -1).norm(dim=2).clamp_min(NORM_EPS)  # (B, C)
        out[:, 1:] = q / norm[:, None, :, None, None]
        return out


def vista_losses(
    denoised: Tensor,
    target: Tensor,
    given_mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    dynamics: bool = True,
    dynamics_weight: float = VISTA_DYNAMICS_WEIGHT,
    structure: bool = True,
    structure_weight: float = VISTA_STRUCTURE_WEIGHT,
    highpass_ds: float = VISTA_HIGHPASS_DS,
) -> dict[str, Tensor]:
    """Vista's extra losses (module docstring), to add to a process's loss.

    denoised: the x0 estimate ``(B, T, C, H, W)`` with gradient (``training_losses(...)["denoised"]``); target: the
    clean ``x0``; given_mask: bool broadcastable to them (true = given: pasted into ``denoised`` here too, and left
    out of every mean) or None; weight: the process's per-clip loss weight ``(B,)`` (None = 1); dynamics /
    structure: switch each loss (off: zeros, nothing computed); dynamics_weight, structure_weight: ``lambda_d``,
    ``lambda_s`` (Vista: 1, 0.1); highpass_ds: the mask's ``d_s`` (Vista: 0.25).

    Returns :data:`VISTA_LOSS_KEYS`: ``loss_dynamics``, ``loss_structure`` and their sum ``loss_extra`` (scalars,
    means over clips, weights applied), and each one's ``*_per_clip`` ``(B,)``.
    """
    if denoised.ndim != 5 or denoised.shape != target.shape:
        raise ValueError(
            f"vista_losses: denoised and target must both be (B, T, C, H, W), got {tuple(denoised.shape)} and "
            f"{tuple(target.shape)}"
        )
    B = target.shape[0]
    dtype = torch.promote_types(denoised.dtype, torch.float32)
    if weight is None:
        weight = torch.ones(B, dtype=dtype, device=target.device)
    elif weight.shape != (B,):
        raise ValueError(f"vista_losses: weight must be per clip, ({B},), got {tuple(weight.shape)}")
    weight = weight.to(dtype)
    prediction = replace_given(denoised, target, given_mask).to(dtype)  # given content: exactly the target
    target = target.to(dtype)
    zeros = torch.zeros(B, dtype=dtype, device=target.device)

    dynamics_per_clip = zeros
    if dynamics and dynamics_weight:
        squared_error = (prediction - target) ** 2  # (B, T, C, H, W)
        a = dynamics_reweighting(prediction, target)  # (B, T, C, H, W), no gradient
        dynamics_per_clip = dynamics_weight * weight * masked_mean(squared_error * a, given_mask)  # (B,)
    structure_per_clip = zeros
    if structure and structure_weight:
        high = highpass(prediction - target, highpass_ds)  # HP is linear: HP(D) - HP(X)
        structure_per_clip = structure_weight * weight * masked_mean(high.to(dtype) ** 2, given_mask)  # (B,)
    extra_per_clip = dynamics_per_clip + structure_per_clip
    return {
        LOSS_DYNAMICS: dynamics_per_clip.mean(),
        f"{LOSS_DYNAMICS}_per_clip": dynamics_per_clip,
        LOSS_STRUCTURE: structure_per_clip.mean(),
        f"{LOSS_STRUCTURE}_per_clip": structure_per_clip,
        LOSS_EXTRA: extra_per_clip.mean(),
        f"{LOSS_EXTRA}_per_clip": extra_per_clip,
    }


def add_losses(losses: dict[str, Tensor], extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """A process's loss dict (:data:`~vdiff.diffusion.common.LOSS_KEYS`) with :func:`vista_losses`' ``extra`` added:
    ``loss`` and ``loss_per_clip`` include ``loss_extra``; ``extra``'s entries are merged in (for logging). The
    other keys (``mse``, ``vb``, ``noise_level``, ``denoised``) are unchanged. Returns a new dict
    (:func:`~vdiff.diffusion.common.add_loss_terms` of the two per-clip terms)."""
    return add_loss_terms(losses, vista_loss_terms(extra))


def vista_loss_terms(extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`vista_losses`' output as per-clip loss terms ``{"dynamics": (B,), "structure": (B,)}`` (what
    :func:`~vdiff.diffusion.common.add_loss_terms` and ``extra_loss_terms`` take)."""
    return {"dynamics": extra[f"{LOSS_DYNAMICS}_per_clip"], "structure": extra[f"{LOSS_STRUCTURE}_per_clip"]}
