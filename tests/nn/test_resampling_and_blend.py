"""One Downsample (its padding named), one Upsample, and one spatial/temporal blend convention for every model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vdiff.models.autoencoder import VideoResBlock
from vdiff.nn.blend import blend, mix_alpha
from vdiff.nn.resnet import Downsample, Upsample
from vdiff.nn.unet_blocks import SpatioTemporalResBlock


def test_downsample_padding_is_explicit_and_places_the_zeros():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    unet, vae = Downsample(3, "symmetric"), Downsample(3, "right_bottom")
    vae.load_state_dict(unet.state_dict())  # the same parameters, named alike
    assert list(unet.state_dict()) == list(vae.state_dict()) == ["conv.weight", "conv.bias"]
    w, b = unet.conv.weight, unet.conv.bias
    torch.testing.assert_close(unet(x), F.conv2d(x, w, b, stride=2, padding=1), rtol=0, atol=0)
    torch.testing.assert_close(vae(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2), rtol=0, atol=0)
    assert unet(x).shape == (2, 3, 4, 3) and vae(x).shape == (2, 3, 3, 3)  # ceil vs floor of an odd size
    with pytest.raises(ValueError, match=r"Downsample: padding must be one of .*got 'same'"):
        Downsample(3, "same")  # type: ignore[arg-type]


def test_upsample_doubles_or_meets_the_skip_size():
    up = Upsample(2)
    x = torch.randn(1, 2, 3, 5)
    torch.testing.assert_close(up(x), up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), rtol=0, atol=0)
    assert up(x, (5, 9)).shape == (1, 2, 5, 9)


def test_blend_alpha_is_the_spatial_weight_and_each_order_is_exact_where_promised():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    alpha = torch.tensor(0.3)
    for order in ("lerp", "weighted_sum"):
        torch.testing.assert_close(blend(s, t, alpha, order), 0.3 * s + 0.7 * t)
        assert torch.equal(blend(s, t, torch.tensor(1.0), order), s)  # alpha 1: the spatial output, exactly
    assert torch.equal(blend(s, s.clone(), alpha), s)  # lerp: the paths agree -> exactly that, whatever alpha
    assert torch.equal(blend(s, t, alpha, "weighted_sum"), alpha * s + (1 - alpha) * t)  # sgm/diffusers' order
    with pytest.raises(ValueError, match="blend: order must be 'lerp' or 'weighted_sum', got 'sum'"):
        blend(s, t, alpha, "sum")  # type: ignore[arg-type]
    image_only = torch.tensor([[True, False]])
    assert mix_alpha(torch.tensor([0.0]), image_only, 1, 2).tolist() == [[1.0, 0.5]]


def test_the_unet_and_the_vae_blend_with_one_convention():
    """A mix factor of +40 (sigmoid 1) selects the spatial path in SVD's UNet and the temporal one in its VAE
    (whose factor weights the temporal path): both go through blend with alpha the spatial weight."""
    torch.manual_seed(0)
    unet_block = SpatioTemporalResBlock(32, 32, 8).eval()
    vae_block = VideoResBlock(32, 32).eval()
    x, emb = torch.randn(2 * 3, 32, 4, 4), torch.randn(2, 1, 8)
    with torch.no_grad():
        unet_block.mix_factor.fill_(40.0)
        vae_block.mix_factor.fill_(40.0)
        spatial = unet_block.spatial(x, emb)
        assert torch.equal(unet_block(x, emb, num_frames=3), spatial)
        vae_spatial = vae_block.spatial(x).view(2, 3, 32, 4, 4).transpose(1, 2)  # (B, C, T, H, W)
        vae_temporal = vae_block.temporal(vae_spatial).transpose(1, 2).reshape(6, 32, 4, 4)
        torch.testing.assert_close(vae_block(x, num_frames=3), vae_temporal, rtol=0, atol=0)
        vae_block.mix_factor.fill_(0.3)
        alpha = 1.0 - torch.sigmoid(torch.tensor([0.3]))  # VAE: the spatial weight is 1 - sigmoid(mix_factor)
        temporal = vae_block.temporal(vae_spatial)
        expected = blend(vae_spatial, temporal, alpha, "weighted_sum").transpose(1, 2).reshape(6, 32, 4, 4)
        torch.testing.assert_close(vae_block(x, num_frames=3), expected, rtol=0, atol=0)
