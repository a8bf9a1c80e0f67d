"""Losses on logits: the sigmoid lives here and in inference, never in the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch as one volume.

    Pooling the batch keeps the loss defined on healthy slices (empty target) without
    rewarding an all-zero prediction as much as per-slice smoothing would.
    """
    prob = torch.sigmoid(logits.float()).flatten()
    target = target.float().flatten()
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * Dice``, both computed from logits in fp32."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return self.bce_weight * bce + self.dice_weight * dice_loss(logits, target, self.smooth)
