"""The baselines the shipped model is timed against, written here from their descriptions.

- ``classic_unet()``: the classic U-Net of Ronneberger et al. as in usuyama/pytorch-unet, i.e.
  ``unet.model.UNet(width=64, depth=3, upsampling="bilinear")`` (7.8 M parameters).
- ``BudaUNet``: the architecture of mateuszbuda/brain-segmentation-pytorch, the reference
  model for this dataset: four poolings, encoder features 32-64-128-256, a 512-feature
  bottleneck, transposed-conv upsampling, (conv3x3-BN-ReLU) x 2 blocks and a 1x1 conv with a
  sigmoid. Kept as its own module, independent of ``unet.model``, so it is a real baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from unet.model import UNet


def classic_unet() -> UNet:
    return UNet(width=64, depth=3, upsampling="bilinear")


def block(in_channels: int, features: int) -> nn.Sequential:
    """(conv3x3 without bias -> BatchNorm -> ReLU) x 2."""
    return nn.Sequential(
        nn.Conv2d(in_channels, features, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(features),
        nn.ReLU(inplace=True),
        nn.Conv2d(features, features, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(features),
        nn.ReLU(inplace=True),
    )


class BudaUNet(nn.Module):
    """Four-pool U-Net, ``init_features`` wide, ending in a sigmoid (probabilities, not logits)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, init_features: int = 32) -> None:
        super().__init__()
        f = init_features
        self.encoder1 = block(in_channels, f)
        self.encoder2 = block(f, f * 2)
        self.encoder3 = block(f * 2, f * 4)
        self.encoder4 = block(f * 4, f * 8)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = block(f * 8, f * 16)
        self.upconv4 = nn.ConvTranspose2d(f * 16, f * 8, kernel_size=2, stride=2)
        self.decoder4 = block(f * 16, f * 8)
        self.upconv3 = nn.ConvTranspose2d(f * 8, f * 4, kernel_size=2, stride=2)
        self.decoder3 = block(f * 8, f * 4)
        self.upconv2 = nn.ConvTranspose2d(f * 4, f * 2, kernel_size=2, stride=2)
        self.decoder2 = block(f * 4, f * 2)
        self.upconv1 = nn.ConvTranspose2d(f * 2, f, kernel_size=2, stride=2)
        self.decoder1 = block(f * 2, f)
        self.conv = nn.Conv2d(f, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self.pool(enc1))
        enc3 = self.encoder3(self.pool(enc2))
        enc4 = self.encoder4(self.pool(enc3))
        bottleneck = self.bottleneck(self.pool(enc4))
        dec4 = self.decoder4(torch.cat((self.upconv4(bottleneck), enc4), dim=1))
        dec3 = self.decoder3(torch.cat((self.upconv3(dec4), enc3), dim=1))
        dec2 = self.decoder2(torch.cat((self.upconv2(dec3), enc2), dim=1))
        dec1 = self.decoder1(torch.cat((self.upconv1(dec2), enc1), dim=1))
        return torch.sigmoid(self.conv(dec1))
