"""A light referring-segmentation decoder (paper sec. 3.2 and fig. 2).

Inputs: three frozen vision feature maps, finest first (CNN strides 8/16/32, or three ViT
layers on the patch grid), and the pooled LLM vector ``t`` of the infused prompt.

    r_i   = GroupNorm(Conv1x1(C_i -> c)(level_i))                     each level to c = 64 channels
    x     = tokens of r_3 (+ 2-D sin-cos positions), plus one text token Linear(t)
    x     = [TransformerLayer(x); FiLM_t(x)] x 3                      FiLM: x * (1 + g(t)) + b(t)
    y     = FiLM_t(ConvGN(up(x) + r_2)); y = FiLM_t(ConvGN(up(y) + r_1))     top-down fusion
    mask  = up(Conv1x1(c -> 1)(y)) to the requested size               logits

The FiLM maps start at zero (identity); the decoder is the only part of the segmentation model
besides the infusion that trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegmentationDecoder", "SegmentationDecoderConfig"]


@dataclass
class SegmentationDecoderConfig:
    """Shape of the segmentation decoder."""

    channels: int = 64
    """Width every feature level is reduced to."""
    num_layers: int = 3
    """Transformer layers over the coarsest level (the paper uses 3)."""
    num_heads: int = 4
    """Attention heads; must divide ``channels``."""
    dropout: float = 0.0
    """Dropout inside the transformer layers."""

    def __post_init__(self) -> None:
        if self.channels < 8 or self.channels % 8:
            raise ValueError("SegmentationDecoderConfig.channels must be a multiple of 8")
        if self.channels % self.num_heads or self.channels % 4:
            raise ValueError(
                f"SegmentationDecoderConfig.num_heads ({self.num_heads}) must divide channels"
            )
        if self.num_layers < 1:
            raise ValueError("SegmentationDecoderConfig.num_layers must be >= 1")


def _sincos_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """(h*w, dim) fixed 2-D sine-cosine positions; works for any grid size."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ay, ax = ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq  # (h*w, quarter)
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=-1)


class _FiLM(nn.Module):
    """x * (1 + gamma(t)) + beta(t), zero-initialised (identity at init)."""

    def __init__(self, d_text: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(d_text, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(text).chunk(2, dim=-1)  # (B, C) each
        if x.ndim == 4:  # (B, C, H, W)
            gamma, beta = gamma[..., None, None], beta[..., None, None]
        else:  # (B, N, C)
            gamma, beta = gamma[:, None], beta[:, None]
        return x * (1 + gamma) + beta


def _conv_gn(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(8, c), nn.GELU())


class SegmentationDecoder(nn.Module):
    """Feature maps + pooled text vector -> mask logits (B, 1, H, W)."""

    def __init__(
        self,
        level_channels: tuple[int, int, int],
        d_text: int,
        config: SegmentationDecoderConfig | None = None,
    ):
        super().__init__()
        cfg = config or SegmentationDecoderConfig()
        self.config, c = cfg, cfg.channels
        if len(level_channels) != 3:
            raise ValueError(f"need 3 feature levels, got {len(level_channels)}")
        self.level_channels = tuple(level_channels)
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, c, 1, bias=False), nn.GroupNorm(8, c))
            for ch in level_channels
        )
        self.text_token = nn.Linear(d_text, c)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                c, cfg.num_heads, 4 * c, cfg.dropout, batch_first=True, norm_first=True
            )
            for _ in range(cfg.num_layers)
        )
        self.film_layers = nn.ModuleList(_FiLM(d_text, c) for _ in range(cfg.num_layers))
        self.fuse = nn.ModuleList([_conv_gn(c), _conv_gn(c)])
        self.film_fuse = nn.ModuleList([_FiLM(d_text, c), _FiLM(d_text, c)])
        self.out = nn.Conv2d(c, 1, 1)

    def forward(
        self, levels: list[torch.Tensor], text: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        if len(levels) != 3:
            raise ValueError(f"SegmentationDecoder needs 3 feature maps, got {len(levels)}")
        for i, (x, ch) in enumerate(zip(levels, self.level_channels, strict=True)):
            if x.ndim != 4 or x.shape[1] != ch or x.shape[0] != text.shape[0]:
                raise ValueError(
                    f"feature level {i} must be (B={text.shape[0]}, {ch}, H, W); got "
                    f"{tuple(x.shape)}"
                )
        r = [red(x.to(self.out.weight.dtype)) for red, x in zip(self.reduce, levels, strict=True)]
        text = text.to(self.out.weight.dtype)
        b, c, h, w = r[2].shape
        tokens = r[2].flatten(2).transpose(1, 2) + _sincos_2d(h, w, c, r[2].device)  # (B, h*w, c)
        x = torch.cat([tokens, self.text_token(text)[:, None]], dim=1)  # (B, h*w + 1, c)
        for layer, film in zip(self.layers, self.film_layers, strict=True):
            x = film(layer(x), text)
        y = x[:, :-1].transpose(1, 2).reshape(b, c, h, w)  # drop the text token: (B, c, h, w)
        for skip, conv, film in zip((r[1], r[0]), self.fuse, self.film_fuse, strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = film(conv(y + skip), text)
        logits = self.out(y)  # (B, 1, h1, w1)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
