"""Trainable encoders of frame sequences (acoustic, facial), pooled to MiT's vector ``I``.

Paper sec. 3.3: "three-layer transformer blocks are employed to encode acoustic and facial
features". Per modality::

    h = TransformerEncoder_3(Linear(d_in -> d_model)(x) + pos)      key-padding mask from lengths
    v = Linear(d_model -> d_out)(masked_mean_t(h))

and with several modalities ``I = concat(v_audio, v_vision, ...)`` in a fixed order.

Input handling: frames must be finite. NaN and +-inf (CMU-MOSI/MOSEI's audio holds -inf) are
replaced with 0 and a warning is issued once per encoder. A sample of length 0 is encoded as
one all-zero frame (a transformer cannot attend over nothing).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MultiModalSequenceEncoder", "SequenceEncoder", "SequenceEncoderConfig"]


@dataclass
class SequenceEncoderConfig:
    """Shape of one modality's sequence encoder."""

    d_in: int | None = None
    """Width of one input frame (MOSI: audio 5, vision 20; MOSEI: audio 74, vision 35);
    ``None``: set from the data by the training pipeline."""
    d_model: int = 64
    """Transformer width."""
    num_layers: int = 3
    """Transformer layers (the paper uses 3)."""
    num_heads: int = 4
    """Attention heads; must divide d_model."""
    d_out: int = 64
    """Width of the pooled vector this modality contributes to I."""
    max_len: int = 1024
    """Longest sequence accepted (learned positional embeddings)."""
    dropout: float = 0.1
    """Dropout inside the transformer layers."""

    def __post_init__(self) -> None:
        if self.d_in is not None and self.d_in < 1:
            raise ValueError("SequenceEncoderConfig.d_in must be >= 1")
        for name in ("d_model", "num_layers", "num_heads", "d_out", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SequenceEncoderConfig.{name} must be >= 1")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"SequenceEncoderConfig.num_heads ({self.num_heads}) must divide d_model "
                f"({self.d_model})"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError("SequenceEncoderConfig.dropout must be in [0, 1)")


class SequenceEncoder(nn.Module):
    """Frames (B, T, d_in) with lengths (B,) -> pooled vector (B, d_out)."""

    def __init__(self, config: SequenceEncoderConfig, name: str = "frames"):
        super().__init__()
        if config.d_in is None:
            raise ValueError(f"{name}: SequenceEncoderConfig.d_in (frame width) is not set")
        self.config, self.name = config, name
        self.proj = nn.Linear(config.d_in, config.d_model)
        self.pos = nn.Parameter(torch.zeros(config.max_len, config.d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            config.d_model,
            config.num_heads,
            4 * config.d_model,
            config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.out = nn.Linear(config.d_model, config.d_out)
        self._warned = False

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if frames.ndim != 3 or frames.shape[-1] != c.d_in:
            raise ValueError(
                f"{self.name}: frames must have shape (batch, time, {c.d_in}); got "
                f"{tuple(frames.shape)}"
            )
        b, t, _ = frames.shape
        if t > c.max_len:
            raise ValueError(f"{self.name}: {t} frames exceed max_len {c.max_len}")
        if lengths is None:
            lengths = torch.full((b,), t, device=frames.device)
        lengths = lengths.to(frames.device).long()
        if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > t).any()):
            raise ValueError(
                f"{self.name}: lengths must be (batch,) = ({b},) in [0, {t}]; got "
                f"{lengths.tolist() if lengths.numel() <= 16 else tuple(lengths.shape)}"
            )
        bad = ~torch.isfinite(frames)
        if bool(bad.any()):
            if not self._warned:
                warnings.warn(
                    f"{self.name}: {int(bad.sum())} non-finite frame values (NaN/inf) replaced "
                    "with 0; warned once per encoder",
                    stacklevel=2,
                )
                self._warned = True
            frames = torch.where(bad, torch.zeros_like(frames), frames)
        lengths = lengths.clamp(min=1)  # an empty sample becomes one zero frame
        steps = torch.arange(t, device=frames.device)
        valid = steps[None, :] < lengths[:, None]  # (B, T)
        frames = frames * valid[..., None]
        h = self.proj(frames) + self.pos[:t]  # (B, T, d_model)
        h = self.norm(self.encoder(h, src_key_padding_mask=~valid))
        pooled = (h * valid[..., None]).sum(1) / lengths[:, None]  # masked mean, (B, d_model)
        return self.out(pooled)


class MultiModalSequenceEncoder(nn.Module):
    """One :class:`SequenceEncoder` per modality; their pooled vectors concatenated into I."""

    def __init__(self, modalities: dict[str, SequenceEncoderConfig]):
        super().__init__()
        if not modalities:
            raise ValueError("MultiModalSequenceEncoder needs at least one modality")
        self.order = list(modalities)
        self.encoders = nn.ModuleDict(
            {name: SequenceEncoder(cfg, name) for name, cfg in modalities.items()}
        )
        self.d_out = sum(cfg.d_out for cfg in modalities.values())

    def forward(
        self,
        frames: dict[str, torch.Tensor],
        lengths: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """{name: (B, T_name, d_in_name)} -> I (B, sum of d_out), in construction order."""
        missing = [m for m in self.order if m not in frames]
        extra = [m for m in frames if m not in self.encoders]
        if missing or extra:
            raise ValueError(
                f"modalities given {sorted(frames)} do not match the encoder's {self.order}"
            )
        lengths = lengths or {}
        return torch.cat([self.encoders[m](frames[m], lengths.get(m)) for m in self.order], dim=-1)
