"""Vista's extra losses: dynamics enhancement (detached 1 + normalised frame-difference mismatch reweighting) and
structure preservation (FFT high-pass MSE): hand-computed values on small tensors, given elements left out, the
detached weight's gradient, Vista's per-pixel mask and filter reproduced, and Vista's whole l2 loss
(``StandardDiffusionLoss.get_loss`` with ``use_additional_loss``) recovered as EDM's loss plus these."""

from __future__ import annotations

import math

import pytest
import torch

from vdiff.diffusion.edm import EDMDiffusion, LogNormalSigma, VScalingPrecond
from vdiff.diffusion.vista_losses import (
    VISTA_LOSS_KEYS,
    add_losses,
    dynamics_reweighting,
    highpass,
    highpass_mask,
    vista_losses,
)

DOUBLE = torch.float64


def vista_mask_loop(H: int, W: int, d_s: float = 0.25) -> torch.Tensor:
    """Vista's fourier_filter mask, built its way (per pixel, Python floats, fftshifted layout, scale 0)."""
    mask = torch.ones(H, W)
    for h in range(H):
        for w in range(W):
            if (2 * h / H - 1) ** 2 + (2 * w / W - 1) ** 2 <= 2 * d_s:
                mask[h, w] = 0.0
    return mask


def vista_fourier_filter(x: torch.Tensor, d_s: float = 0.25) -> torch.Tensor:
    """Vista's fourier_filter(x, scale=0) on (N, C, H, W): fftn, fftshift, mask, ifftshift, ifftn, real."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    freq = freq * vista_mask_loop(x.shape[-2], x.shape[-1], d_s)
    return torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


def vista_get_loss(predict: torch.Tensor, target: torch.Tensor, w: torch.Tensor, num_frames: int, hf_weight: float):
    """Vista's StandardDiffusionLoss.get_loss (l2, use_additional_loss) on its (b t) c h w layout, c = 4."""
    bs = target.shape[0] // num_frames
    p = predict.view(bs, num_frames, *predict.shape[1:])
    t = target.view(bs, num_frames, *target.shape[1:])
    aux = ((t[:, 1:] - t[:, :-1]) - (p[:, 1:] - p[:, :-1])) ** 2  # b t c h w
    b_, t_, c_, h_, w_ = aux.shape
    aux = aux.permute(0, 1, 3, 4, 2).reshape(b_, t_ * h_ * w_, c_)  # b (t h w) c
    aux_w = torch.nn.functional.normalize(aux, p=2)  # over dim 1: (t h w)
    aux_w = aux_w.view(b_, t_, h_, w_, c_).permute(0, 1, 4, 2, 3)  # b t c h w
    aux_w = 1 + torch.cat((torch.zeros(bs, 1, *aux_w.shape[2:]).to(aux_w), aux_w), dim=1)
    aux_w = aux_w.reshape(target.shape[0], -1)
    hf = torch.mean(
        (w * (vista_fourier_filter(predict) - vista_fourier_filter(target)) ** 2).reshape(target.shape[0], -1), 1
    )
    main = torch.mean((w * (predict - target) ** 2).reshape(target.shape[0], -1) * aux_w.detach(), 1)
    return main.mean() + hf_weight * hf.mean()


# ----------------------------------------------------------------------------- the high-pass filter


@pytest.mark.parametrize("size", [(4, 4), (5, 7), (8, 6), (9, 16), (40, 72)])
def test_the_mask_is_vistas_per_pixel_mask_and_the_filter_is_vistas(size):
    H, W = size
    torch.testing.assert_close(torch.fft.fftshift(highpass_mask(H, W)), vista_mask_loop(H, W), atol=0, rtol=0)
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(H * W))
    torch.testing.assert_close(highpass(x), vista_fourier_filter(x), atol=1e-6, rtol=0)
    assert highpass_mask(H, W) is highpass_mask(H, W)  # precomputed once per size


def test_the_filter_in_closed_form_on_4x4_frames():
    """4x4: the low-frequency disc holds every bin with both normalised frequencies in {-0.5, 0, 0.5}; only the
    Nyquist row and column (normalised -1) pass. (-1)^h passes whole; cos(pi h / 2) and constants vanish."""
    h = torch.arange(4, dtype=DOUBLE)[:, None].expand(4, 4)
    w = torch.arange(4, dtype=DOUBLE)[None, :].expand(4, 4)
    nyquist = (-1.0) ** h
    assert int(highpass_mask(4, 4).sum()) == 7  # 16 bins - 9 in the disc
    torch.testing.assert_close(highpass(nyquist), nyquist, atol=1e-12, rtol=0)
    checker = (-1.0) ** (h + w)
    torch.testing.assert_close(highpass(checker), checker, atol=1e-12, rtol=0)
    for low in (torch.cos(math.pi * h / 2), torch.ones(4, 4, dtype=DOUBLE), torch.sin(math.pi * w / 2) + 3.0):
        torch.testing.assert_close(highpass(low), torch.zeros(4, 4, dtype=DOUBLE), atol=1e-12, rtol=0)
    assert highpass(nyquist).dtype == DOUBLE and highpass(nyquist.float()).dtype == torch.float32


# ----------------------------------------------------------------------------- structure preservation


def test_structure_loss_by_hand_leaves_given_elements_out():
    """Frame 1 is off by c (-1)^h (all of it passes the filter), frame 2 by a constant (none passes), frame 0 given:
    per clip lambda_s * w * c^2 * (elements of frame 1) / (generated elements)."""
    B, T, C, H, W = 2, 3, 2, 4, 4
    target = torch.randn(B, T, C, H, W, dtype=DOUBLE, generator=torch.Generator().manual_seed(0))
    nyquist = (-1.0) ** torch.arange(H, dtype=DOUBLE)[:, None].expand(H, W)
    c = torch.tensor([0.5, 2.0], dtype=DOUBLE)
    denoised = target.clone()
    denoised[:, 1] += c[:, None, None, None] * nyquist
    denoised[:, 2] += 7.0
    denoised[:, 0] += 100.0  # a given frame: pasted over and left out of the mean
    mask = torch.zeros(B, T, 1, 1, 1, dtype=torch.bool)
    mask[:, 0] = True
    weight = torch.tensor([1.0, 3.0], dtype=DOUBLE)
    out = vista_losses(denoised, target, mask, weight, dynamics=False, structure_weight=0.1)
    expected = 0.1 * weight * c**2 * (1 / 2)  # frame 1 of the 2 generated frames
    torch.testing.assert_close(out["loss_structure_per_clip"], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out["loss_structure"], expected.mean(), atol=1e-12, rtol=0)
    assert out["loss_dynamics"] == 0 and out["loss_extra"] == out["loss_structure"]
    # without a mask every frame counts (frame 0's +100 is low-frequency: filtered out, but counted in the mean)
    unmasked = vista_losses(denoised, target, None, weight, dynamics=False)
    torch.testing.assert_close(unmasked["loss_structure_per_clip"], 0.1 * weight * c**2 / 3, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- dynamics enhancement


def dynamics_case():
    """X = 0; D: channel 0 = [1, 0] at frame 1, channel 1 the same times 3; frames 0 and 2 exact."""
    target = torch.zeros(1, 3, 2, 1, 2, dtype=DOUBLE)
    denoised = torch.zeros_like(target)
    denoised[0, 1, 0] = torch.tensor([[1.0, 0.0]], dtype=DOUBLE)
    denoised[0, 1, 1] = torch.tensor([[3.0, 0.0]], dtype=DOUBLE)
    return denoised, target


def test_the_dynamics_weight_by_hand():
    """Frame differences' mismatch q_1 = q_2 = [1, 0] (channel 1: [9, 0]); per clip and channel ||q|| = sqrt(2) (9
    sqrt(2)): a_1 = a_2 = [1/sqrt(2), 0] in both channels, a_0 = 0."""
    denoised, target = dynamics_case()
    a = dynamics_reweighting(denoised, target)
    expected = torch.zeros_like(target)
    expected[0, 1:, :, 0, 0] = 1 / math.sqrt(2)
    torch.testing.assert_close(a, expected, atol=1e-12, rtol=0)
    assert not a.requires_grad
    assert dynamics_reweighting(denoised[:, :1], target[:, :1]).abs().max() == 0  # one frame: no differences


def test_the_dynamics_loss_by_hand_and_with_a_given_frame():
    """e * a is nonzero at frame 1 only: 1/sqrt(2) (channel 0) and 9/sqrt(2) (channel 1), over 12 elements;
    with frame 0 given, over the 8 generated ones."""
    denoised, target = dynamics_case()
    weight = torch.tensor([2.0], dtype=DOUBLE)
    out = vista_losses(denoised, target, None, weight, structure=False, dynamics_weight=1.0)
    assert abs(out["loss_dynamics"].item() - 2.0 * 10 / math.sqrt(2) / 12) < 1e-12
    mask = torch.zeros(1, 3, 1, 1, 1, dtype=torch.bool)
    mask[:, 0] = True
    given = vista_losses(denoised, target, mask, weight, structure=False, dynamics_weight=0.5)
    assert abs(given["loss_dynamics"].item() - 0.5 * 2.0 * 10 / math.sqrt(2) / 8) < 1e-12
    assert out["loss_structure"] == 0 and set(out) == set(VISTA_LOSS_KEYS)


def test_the_reweighting_factor_is_detached():
    """The gradient is that of lambda_d * w * mean(e * a) with a constant: 2 (D - X) a lambda_d w / N."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 4, 3, 5, 6, dtype=DOUBLE, generator=g)
    denoised = (target + 0.3 * torch.randn(target.shape, dtype=DOUBLE, generator=g)).requires_grad_(True)
    weight = torch.tensor([1.5, 0.5], dtype=DOUBLE)
    out = vista_losses(denoised, target, None, weight, structure=False, dynamics_weight=0.7)
    out["loss_dynamics"].backward()
    a = dynamics_reweighting(denoised.detach(), target)
    n = target[0].numel()
    expected = 2 * (denoised.detach() - target) * a * 0.7 * weight.view(2, 1, 1, 1, 1) / n / 2  # mean over clips
    torch.testing.assert_close(denoised.grad, expected, atol=1e-12, rtol=0)


def test_given_elements_receive_no_gradient_and_switches_and_weights_scale():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2, 3, 2, 4, 4, generator=g)
    denoised = (target + torch.randn(target.shape, generator=g)).requires_grad_(True)
    mask = torch.zeros(2, 3, 1, 4, 4, dtype=torch.bool)
    mask[:, 0] = True
    mask[1, 1, :, :2] = True  # part of a frame (spatial completion)
    out = vista_losses(denoised, target, mask)
    out["loss_extra"].backward()
    assert denoised.grad[mask.expand_as(denoised)].abs().max() == 0
    assert denoised.grad[~mask.expand_as(denoised)].abs().max() > 0
    base = vista_losses(denoised, target, mask, dynamics_weight=1.0, structure_weight=0.1)
    double = vista_losses(denoised, target, mask, dynamics_weight=2.0, structure_weight=0.2)
    for key in ("loss_dynamics", "loss_structure", "loss_extra"):
        torch.testing.assert_close(double[key], 2 * base[key])
    off = vista_losses(denoised, target, mask, dynamics=False, structure=False)
    assert all(off[key].abs().max() == 0 for key in VISTA_LOSS_KEYS)
    with pytest.raises(ValueError, match="weight must be per clip"):
        vista_losses(denoised, target, mask, torch.ones(3))


# ----------------------------------------------------------------------------- Vista's whole loss


def test_edm_loss_plus_these_is_vistas_l2_loss_with_its_additional_losses():
    """No given frame (Vista's means then agree with vdiff's): w * mean(e) + loss_extra == Vista's get_loss."""
    B, T, C, H, W = 2, 5, 4, 6, 8  # Vista hard-codes c = 4
    g = torch.Generator().manual_seed(3)
    target = torch.randn(B, T, C, H, W, dtype=DOUBLE, generator=g)
    denoised = target + 0.5 * torch.randn(target.shape, dtype=DOUBLE, generator=g)
    weight = torch.tensor([0.7, 2.5], dtype=DOUBLE)
    extra = vista_losses(denoised, target, None, weight)
    edm = (weight * ((denoised - target) ** 2).mean(dim=(1, 2, 3, 4))).mean()
    w_frames = weight.repeat_interleave(T).view(B * T, 1, 1, 1)
    vista = vista_get_loss(denoised.reshape(B * T, C, H, W), target.reshape(B * T, C, H, W), w_frames, T, 0.1)
    torch.testing.assert_close(edm + extra["loss_extra"], vista, atol=1e-6, rtol=1e-6)  # Vista's FFT runs in fp32


def test_add_losses_on_edm_training_losses():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x, noise_level, cond, given_mask):
            return self.scale * x

    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 3, 6, 6, generator=g)
    mask = torch.zeros(2, 4, 1, 1, 1, dtype=torch.bool)
    mask[:, :2] = True
    process = EDMDiffusion(VScalingPrecond(), LogNormalSigma(1.0, 1.6), loss_weighting="v")
    losses = process.training_losses(Net(), x0, {}, mask, generator=g)
    weight = process.weight(losses["noise_level"])
    extra = vista_losses(losses["denoised"], x0, mask, weight)
    total = add_losses(losses, extra)
    torch.testing.assert_close(total["loss"], losses["loss"] + extra["loss_extra"])
    torch.testing.assert_close(total["loss_per_clip"], losses["loss_per_clip"] + extra["loss_extra_per_clip"])
    assert total["denoised"] is losses["denoised"] and set(VISTA_LOSS_KEYS) <= set(total)
    # the Vista form: w * mean_gen(e * (1 + a)) + lambda_s * w * mean_gen(HP(D - X)^2)
    d = losses["denoised"].detach()
    a = dynamics_reweighting(d, x0)
    gen = (~mask).expand_as(x0).float()
    e = (d - x0) ** 2
    by_hand = weight * ((e * (1 + a) + 0.1 * highpass(d - x0) ** 2) * gen).sum((1, 2, 3, 4)) / gen.sum((1, 2, 3, 4))
    torch.testing.assert_close(total["loss"].detach(), by_hand.mean(), atol=1e-6, rtol=1e-5)
    total["loss"].backward()  # the gradient reaches the network through denoised


def test_a_mask_first_built_under_inference_mode_still_trains():
    """Lightning validates (and sanity-checks) under torch.inference_mode before training: the cached mask must not
    be an inference tensor, or every later training step fails in backward."""
    from vdiff.diffusion.vista_losses import _highpass_mask_cached, highpass

    _highpass_mask_cached.cache_clear()
    with torch.inference_mode():
        highpass(torch.randn(1, 2, 7, 5))  # a size no other test uses: the first call caches it here
    assert not highpass_mask(7, 5).is_inference()
    x = torch.randn(1, 2, 7, 5, requires_grad=True)
    highpass(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
