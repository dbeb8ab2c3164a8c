"""Blob indicator (planted spike vs clean latents), LPIPS with a local backbone (missing file, weight-0 path),
PatchGAN shapes, hinge losses and the adaptive GAN weight against its formula."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from vdiff.metrics.blob import DEFAULT_BLOB_THRESHOLD, FeatureNormProbe, blob_ratio, flag_blobs
from vdiff.metrics.lpips import LPIPS, check_lpips_weights, lpips_backbone_path
from vdiff.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME holding a random-weight SqueezeNet 1.1 backbone file (as torchvision would cache it)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = lpips_backbone_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    return tmp_path / "torch"


# ---------------------------------------------------------------- blob indicator


def test_blob_ratio_flags_a_planted_spike_and_not_a_clean_latent():
    torch.manual_seed(0)
    latents = torch.randn(3, 8, 4, 16, 16)  # (B, T, c, h, w), clean
    clean = blob_ratio(latents)
    assert clean.shape == (3,) and (clean < 4).all() and not flag_blobs(clean).any()
    spiked = latents.clone()
    spiked[1, 5, :, 7, 9] = 40.0  # one position of sample 1: norm 80 vs a median near 1.8
    ratio = blob_ratio(spiked)
    assert flag_blobs(ratio).tolist() == [False, True, False]
    expected = 80.0 / torch.linalg.vector_norm(spiked[1], dim=1).flatten().median()
    torch.testing.assert_close(ratio[1], expected)
    assert ratio[1] > 10 * DEFAULT_BLOB_THRESHOLD / 4


def test_feature_norm_probe_unfolds_frames_per_sample():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(1.0)  # flat feature maps: ratio exactly 1
    x = torch.randn(2 * 4, 3, 8, 8)  # (B*T, 3, h, w)
    with FeatureNormProbe({"conv": conv}, batch_size=2) as probe:
        conv(x)
    torch.testing.assert_close(probe.max_ratio(), torch.ones(2))
    with torch.no_grad():
        conv.bias.zero_()
        conv.weight[:, :, 1, 1] = 1.0  # features = sum of input channels at each pixel
    x = torch.ones(8, 3, 8, 8)
    x[6, :, 2, 3] = 50.0  # sample 1 (rows 4..7), frame 2
    with FeatureNormProbe({"conv": conv}, batch_size=2) as probe:
        conv(x)
    torch.testing.assert_close(probe.max_ratio(), torch.tensor([1.0, 50.0]))
    conv(x)  # hooks are gone after the block
    assert len(conv._forward_hooks) == 0


# ---------------------------------------------------------------- LPIPS


def test_lpips_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    expected = tmp_path / "empty" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as err:
        check_lpips_weights("alex")
    assert str(expected) in str(err.value) and "TORCH_HOME" in str(err.value)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS("vgg")


def test_lpips_with_local_backbone_is_a_differentiable_per_frame_distance(torch_home):
    lpips = LPIPS("squeeze", chunk=3)
    torch.manual_seed(1)
    a = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1).requires_grad_(True)
    same = lpips(a, a)
    assert same.shape == (2, 4) and torch.allclose(same, torch.zeros(2, 4), atol=1e-6)
    dist = lpips(b, a)
    assert (dist > 0).all()
    dist.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lpips.parameters())
    # Frame t of clip i is scored alone: the same as the image call.
    torch.testing.assert_close(lpips(b[1, 2:3].detach(), a[1, 2:3]), dist[1, 2:3].detach())


def test_autoencoder_module_lpips_weight_zero_needs_no_file_and_positive_weight_does(tmp_path, monkeypatch):
    from vdiff.lit.autoencoder import AutoencoderModule

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    module = AutoencoderModule(net="tiny", lpips_weight=0.0)
    module.configure_model()
    assert module.lpips is None
    video = torch.rand(1, 2, 3, 16, 16) * 2 - 1
    recon, posterior = module.reconstruct(video, sample=False)
    assert set(module.reconstruction_losses(recon, video, posterior)) == {"rec", "nll", "kl"}
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        AutoencoderModule(net="tiny", lpips_weight=1.0)
    with pytest.raises(FileNotFoundError, match="squeezenet1_1-b8a52dc0.pth"):
        AutoencoderModule(net="tiny", lpips_weight=0.0, lpips_net="squeeze", val_lpips=True)


# ---------------------------------------------------------------- GAN


def test_patch_discriminator_shapes_and_hinge_losses():
    disc = PatchDiscriminator(channels=8, num_layers=3)
    assert disc(torch.randn(2, 3, 3, 64, 64)).shape == (6, 1, 6, 6)  # video folded to frames
    assert PatchDiscriminator(channels=8, num_layers=2, norm="none")(torch.randn(1, 3, 32, 32)).shape == (1, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_g_loss(fake).item() == pytest.approx(1.5)


def test_adaptive_gan_weight_matches_its_formula():
    torch.manual_seed(0)
    body, last = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
    disc = PatchDiscriminator(channels=8, num_layers=2, norm="none")
    x = torch.randn(2, 3, 16, 16)

    def losses():
        out = last(torch.relu(body(x)))
        return (out - x).abs().sum() / 2, hinge_g_loss(disc(out))

    rec, gan = losses()
    weight = adaptive_gan_weight(rec, gan, last.weight, max_weight=1e12)  # unclamped here
    assert not weight.requires_grad
    # Independently: each loss's own backward pass, then the norms of the last layer's gradients.
    norms = []
    for pick in (0, 1):
        last.zero_grad(set_to_none=True)
        losses()[pick].backward()
        norms.append(last.weight.grad.norm())
    torch.testing.assert_close(weight, norms[0] / (norms[1] + 1e-4))
    assert 1.0 < weight.item() < 1e12
    rec, gan = losses()
    assert adaptive_gan_weight(rec, gan, last.weight, max_weight=0.01).item() == pytest.approx(0.01)
    # Both graphs survive for the backward pass that follows.
    (rec + weight * gan).backward()
