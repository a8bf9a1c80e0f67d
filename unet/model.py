"""The U-Net: an encoder-decoder from image tensors to one logit map. Nothing here knows about files or pixels.

``UNet()`` is the shipped architecture: width 16, depth 4, transposed-convolution upsampling, 1.94 M parameters,
a fraction of the classic net's FLOPs per 256x256 slice (benchmarks/), which is what makes CPU training and serving
practical. The classic configuration (Ronneberger et al., as in usuyama/pytorch-unet) is
``UNet(width=64, depth=3, upsampling="bilinear")``: 7.79 M parameters.

How an image becomes the tensor this network takes, and its logits a mask, is `unet.processing`, saved beside the
weights; `unet.segmenter.Segmenter` holds the three together.
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

# config.json: the architecture, nothing else.
ARCHITECTURE_KEYS = ("in_channels", "width", "depth", "upsampling")


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(conv3x3 -> BatchNorm -> ReLU) twice, the U-Net's basic block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="brain-mri-unet",
    pipeline_tag="image-segmentation",
    license="mit",
    tags=["medical-imaging", "brain-mri", "segmentation", "unet", "lgg"],
):
    """U-Net returning one logit map per image: ``(N, C, H, W) -> (N, 1, H, W)``; H and W multiples of ``2**depth``."""

    def __init__(self, in_channels: int = 3, width: int = 16, depth: int = 4, upsampling: str = "transpose") -> None:
        super().__init__()
        if upsampling not in ("bilinear", "transpose"):
            raise ValueError(f"upsampling must be 'bilinear' or 'transpose', got {upsampling!r}")
        if min(in_channels, width, depth) < 1:
            raise ValueError(f"in_channels, width and depth must be at least 1, got {in_channels}, {width}, {depth}")
        self.in_channels, self.width, self.depth, self.upsampling = in_channels, width, depth, upsampling

        channels = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.encoders.append(double_conv(previous, c))
            previous = c
        self.pool = nn.MaxPool2d(2)

        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, skip in zip(channels[:0:-1], channels[-2::-1]):
            if upsampling == "bilinear":
                self.upsamplers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                self.decoders.append(double_conv(deep + skip, skip))
            else:
                self.upsamplers.append(nn.ConvTranspose2d(deep, skip, kernel_size=2, stride=2))
                self.decoders.append(double_conv(2 * skip, skip))
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)

    @property
    def architecture(self) -> dict:
        """What config.json holds: the constructor's arguments."""
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
