"""Task losses (paper sec. 3.2, eqs. 8-10).

- DICE (eq. 8), soft, per sample then averaged::

      L_dice = 1 - (2 * sum(p * y) + eps) / (sum(p) + sum(y) + eps),   p = sigmoid(logits)

  optionally plus ``bce_weight * BCE(logits, y)``;
- cross-entropy (eq. 9): ``torch.nn.functional.cross_entropy``;
- RMSE (eq. 10): ``sqrt(mean((y_hat - y)^2) + eps)``; L1 as an option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "regression_loss", "segmentation_loss"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft DICE of mask logits (B, 1, H, W) or (B, H, W) against {0, 1} targets."""
    if logits.shape != target.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
    p = torch.sigmoid(logits).flatten(1)  # (B, H*W)
    y = target.to(p.dtype).flatten(1)
    inter = (p * y).sum(-1)
    return (1.0 - (2.0 * inter + eps) / (p.sum(-1) + y.sum(-1) + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.0
) -> torch.Tensor:
    """DICE, plus ``bce_weight`` x binary cross-entropy when it is > 0."""
    loss = dice_loss(logits, target)
    if bce_weight > 0:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype)
        )
    return loss


def regression_loss(
    prediction: torch.Tensor, target: torch.Tensor, kind: str = "rmse", eps: float = 1e-8
) -> torch.Tensor:
    """``rmse`` (the paper's eq. 10) or ``l1`` between (B,) predictions and targets."""
    prediction, target = prediction.reshape(-1), target.reshape(-1).to(prediction.dtype)
    if prediction.shape != target.shape:
        raise ValueError(f"{prediction.numel()} predictions but {target.numel()} targets")
    if kind == "rmse":
        return torch.sqrt(F.mse_loss(prediction, target) + eps)
    if kind == "l1":
        return F.l1_loss(prediction, target)
    raise ValueError(f"regression loss must be 'rmse' or 'l1', got {kind!r}")
