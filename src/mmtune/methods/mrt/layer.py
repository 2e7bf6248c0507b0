"""One MRT edit: a LoReFT low-rank intervention on a hidden representation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from mmtune.methods.mrt.config import MRTConfig, _llm_layer_indices


class LoReFTEdit(nn.Module):
    """``phi(h) = h + s * R^T (W h + b - R h)`` on the last axis of h (..., d)."""

    def __init__(self, d: int, rank: int, init: str = "identity"):
        super().__init__()
        if rank > d:
            raise ValueError(f"edit rank {rank} exceeds the hidden width {d}")
        # weight R: (r, d), R R^T = I. The Cayley map, not torch's default Householder map for
        # non-square matrices: AdamW's weight decay on a Householder ``original`` collapses R to 0.
        self.rotate = orthogonal(nn.Linear(d, rank, bias=False), orthogonal_map="cayley")
        self.source = nn.Linear(d, rank)  # W h + b
        if init == "identity":
            with torch.no_grad():
                self.source.weight.copy_(self.rotate.weight)
                self.source.bias.zero_()

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """R^T (W h + b - R h), same shape as h."""
        r = self.rotate.weight  # (r, d)
        # (W - R) h + b: exactly 0 while W = R and b = 0, so the identity init is exact
        low = nn.functional.linear(h, self.source.weight - r, self.source.bias)  # (..., r)
        return low @ r  # (..., d)

    def forward(self, h: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        return h + scale * self.delta(h)


def mrt_trainable(
    config: MRTConfig, *, d_model: int, num_llm_layers: int, vision_widths: list[int]
) -> dict[str, int]:
    """Edit parameter counts without building anything: per edit r x d (R) + r x d + r (W, b).

    ``vision_widths``: the width of each vision block (only those named in the config count).
    """

    def edit(d: int, r: int) -> int:
        return 2 * r * d + r

    n = len(vision_widths)
    vision = sum(edit(vision_widths[i % n], config.vision_rank) for i in config.vision_layers)
    projector = edit(d_model, config.projector_rank) if config.projector_edit else 0
    llm = len(_llm_layer_indices(config, num_llm_layers)) * edit(d_model, config.llm_rank)
    return {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm}
