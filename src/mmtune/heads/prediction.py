"""Classification and regression heads (paper sec. 3.2).

- classification: ``MLP([LN(image vector); LN(pooled text)])`` -> class logits; the image
  vector is the frozen encoder's global vector (``d_image = 0`` for text-only baselines);
- sentiment regression: ``Linear(pooled text)`` -> one score (the paper: text only, "as text is
  dominant in this task").
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassificationHead", "RegressionHead"]


class ClassificationHead(nn.Module):
    """Concatenated image and text vectors -> class logits (B, num_classes)."""

    def __init__(
        self, d_image: int, d_text: int, num_classes: int, hidden: int = 512, dropout: float = 0.1
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if d_image < 0 or d_text < 1:
            raise ValueError(f"need d_image >= 0 and d_text >= 1; got {d_image}, {d_text}")
        self.d_image, self.d_text = d_image, d_text
        self.norm_image = nn.LayerNorm(d_image) if d_image else None
        self.norm_text = nn.LayerNorm(d_text)
        self.mlp = nn.Sequential(
            nn.Linear(d_image + d_text, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, image: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        if text.ndim != 2 or text.shape[-1] != self.d_text:
            raise ValueError(f"text vector must be (B, {self.d_text}); got {tuple(text.shape)}")
        parts = [self.norm_text(text.to(self.norm_text.weight.dtype))]
        if self.norm_image is not None:
            if image is None or image.shape != (text.shape[0], self.d_image):
                got = None if image is None else tuple(image.shape)
                raise ValueError(
                    f"image vector must be ({text.shape[0]}, {self.d_image}); got {got}"
                )
            parts.insert(0, self.norm_image(image.to(self.norm_image.weight.dtype)))
        return self.mlp(torch.cat(parts, dim=-1))


class RegressionHead(nn.Module):
    """Pooled text vector -> one score (B,)."""

    def __init__(self, d_text: int, dropout: float = 0.0):
        super().__init__()
        self.d_text = d_text
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(d_text, 1)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if text.ndim != 2 or text.shape[-1] != self.d_text:
            raise ValueError(f"text vector must be (B, {self.d_text}); got {tuple(text.shape)}")
        return self.linear(self.drop(text.to(self.linear.weight.dtype))).squeeze(-1)
