"""MRT's configuration and its control at inference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MRTConfig:
    """Where MRT edits sit and how big they are."""

    vision_layers: list[int] = field(default_factory=lambda: [-1])
    """Vision blocks whose outputs are edited on the visual tokens (negative: from the end).
    MobileNetV2's blocks 14-18 work on the 7 x 7 token grid; a ViT's encoder layers all do."""
    vision_rank: int = 6
    """Rank r of each vision edit."""
    projector_edit: bool = True
    """Edit the projector output (the cross-modal edit)."""
    projector_rank: int = 6
    """Rank of the projector edit."""
    llm_layers: list[int] | None = None
    """0-based decoder layers whose outputs are edited; ``None``: every ``llm_layer_stride``-th
    layer from 0."""
    llm_layer_stride: int = 2
    """With ``llm_layers`` unset: edit layers 0, stride, 2 stride, ..."""
    llm_rank: int = 4
    """Rank of each LLM edit."""
    first: int = 5
    """p: edit the first p prompt tokens."""
    last: int = 5
    """s: edit the last s prompt tokens."""
    init: Literal["identity", "loreft"] = "identity"
    """``identity``: W = R, b = 0 (each edit starts as the identity); ``loreft``: random W, b."""

    def __post_init__(self) -> None:
        for name in ("vision_rank", "projector_rank", "llm_rank", "llm_layer_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"MRTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("first", "last"):
            if getattr(self, name) < 0:
                raise ValueError(f"MRTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.init not in ("identity", "loreft"):
            raise ValueError(f"MRTConfig.init must be 'identity' or 'loreft', got {self.init!r}")
        self.vision_layers = [int(i) for i in self.vision_layers]
        if self.llm_layers is not None:
            self.llm_layers = [int(i) for i in self.llm_layers]


@dataclass
class MRTControl:
    """Inference-time control: which positions are edited and how strongly each edit acts."""

    scale: float = 1.0
    """Multiplies every edit (0 = base model, 1 = as trained)."""
    edit_scales: dict[str, float] = field(default_factory=dict)
    """Per-edit scale by name (``vision.18``, ``projector``, ``llm.12``; see
    ``MRTModel.edit_names``), multiplied with ``scale``. An unknown name is an error."""
    first: int | None = None
    """Override p (first prompt tokens edited in the LLM)."""
    last: int | None = None
    """Override s (last prompt tokens edited in the LLM)."""
    positions: list[int] | None = None
    """Explicit prompt-relative positions edited in the LLM (0 = first prompt token, -1 = the
    last); replaces first/last."""
    visual_tokens: list[int] | None = None
    """Visual tokens (0..N-1, row-major grid) edited by the vision and projector edits (None:
    all)."""


def _llm_layer_indices(config: MRTConfig, depth: int) -> list[int]:
    layers = (
        list(range(0, depth, config.llm_layer_stride))
        if config.llm_layers is None
        else config.llm_layers
    )
    bad = [j for j in layers if not 0 <= j < depth]
    if bad:
        raise ValueError(f"MRTConfig.llm_layers {bad} outside 0..{depth - 1} for this LLM")
    return sorted(set(layers))
