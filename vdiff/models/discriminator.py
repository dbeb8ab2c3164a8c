"""PatchGAN discriminator (pix2pix, Isola et al. 2017) as taming-transformers and the SD VAE use it, and
the GAN losses that go with it.

    conv 4x4/2 -> LeakyReLU(0.2)
    [conv 4x4/2 -> norm -> LeakyReLU(0.2)] x (num_layers - 1)      channels double up to 8x
    conv 4x4/1 -> norm -> LeakyReLU(0.2)
    conv 4x4/1 -> 1 logit per patch

It judges frames independently: video ``(B, T, 3, H, W)`` is folded to ``(B*T, 3, H, W)``. Each output logit
sees a receptive field of 70x70 pixels for ``num_layers=3``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DiscNorm = Literal["batch", "group", "none"]


def _norm(kind: DiscNorm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"PatchDiscriminator norm must be 'batch', 'group' or 'none', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """Frame-wise PatchGAN: ``(N, 3, H, W)`` or ``(B, T, 3, H, W)`` -> logits ``(N, 1, h, w)`` per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: DiscNorm = "batch") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PatchDiscriminator num_layers must be >= 1, got {num_layers}")
        bias = norm == "none"  # a norm right after the conv makes its bias redundant (as pix2pix)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, num_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=bias),
                _norm(norm, channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DCGAN init as pix2pix/taming: conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 5:
            x = x.flatten(0, 1)  # (B*T, 3, H, W)
        return self.main(x)  # (N, 1, h, w)


#################################################################################
#                                   GAN losses                                  #
#################################################################################


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss against a hinge discriminator: ``-mean(fake)``."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """Taming's balance between reconstruction and adversarial gradients at the decoder's last layer:

        w = clamp(||d rec_loss / d last|| / (||d gan_loss / d last|| + eps), 0, max_weight)

    returned detached (a scalar). Both graphs are kept for the backward pass that follows.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(gan_grad) + eps)
    return weight.clamp(0.0, max_weight).detach()
