"""Losses on logits: the sigmoid lives here and in inference, never in the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, fn_weight: float = 0.5) -> torch.Tensor:
    """1 - soft Dice over the whole batch as one volume; with ``fn_weight`` other than 0.5, 1 - the Tversky index.

    Pooling the batch keeps the loss defined on healthy slices (empty target) without
    rewarding an all-zero prediction as much as per-slice smoothing would. ``fn_weight`` weighs
    missed tumor pixels against false-positive ones (Salehi et al., 2017): above 0.5 a miss costs
    more, which pushes recall; at 0.5 this is exactly Dice.
    """
    prob = torch.sigmoid(logits.float()).flatten()
    target = target.float().flatten()
    intersection = (prob * target).sum()
    false_pos = (prob * (1 - target)).sum()
    false_neg = ((1 - prob) * target).sum()
    overlap = 2 * intersection + smooth
    return 1 - overlap / (overlap + 2 * (1 - fn_weight) * false_pos + 2 * fn_weight * false_neg)


class BCEDiceLoss(nn.Module):
    """BCE + Dice (Tversky with ``fn_weight`` != 0.5), from logits in fp32.

    BCE gives every pixel a gradient from the first step; Dice keeps a tumor of a few hundred pixels
    from drowning in 65,000 of background.
    """

    def __init__(self, fn_weight: float = 0.5) -> None:
        super().__init__()
        self.fn_weight = fn_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return bce + dice_loss(logits, target, fn_weight=self.fn_weight)
