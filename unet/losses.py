"""The training loss, on logits: the sigmoid lives here and in the segmenter, never in the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch as one volume.

    Pooling the batch keeps the loss defined on healthy slices (empty target) without rewarding an all-zero
    prediction as much as per-slice smoothing would.
    """
    prob = torch.sigmoid(logits.float()).flatten()
    target = target.float().flatten()
    overlap = 2 * (prob * target).sum() + smooth
    return 1 - overlap / (prob.sum() + target.sum() + smooth)


class BCEDiceLoss(nn.Module):
    """BCE + Dice, from logits in fp32.

    BCE gives every pixel a gradient from the first step; Dice keeps a tumor of a few hundred pixels from drowning
    in 65,000 of background.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return bce + dice_loss(logits, target)
