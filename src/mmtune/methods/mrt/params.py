"""MRT's tunable share on a LLaVA-style model shape, counted on the meta device (no weights)."""

from __future__ import annotations

from typing import Any

import torch

from mmtune.methods.mrt.config import MRTConfig
from mmtune.methods.mrt.layer import mrt_trainable
from mmtune.models.shapes import MOBILENET_V2_BLOCK_WIDTHS, VISION_SHAPES, meta_model, shape_config
from mmtune.utils.adapter_file import count_parameters

__all__ = ["mrt_share"]


def mrt_share(
    llm: str,
    vision: str,
    mrt: MRTConfig,
    vision_shapes: dict[str, dict[str, Any]] | None = None,
    projector: str = "mlp",
) -> dict[str, Any]:
    """MRT's tunable parameters and share on a LLaVA-style shape, built on the meta device."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmtune.encoders.mobilenet import MobileNetV2

    vision_shapes = VISION_SHAPES if vision_shapes is None else vision_shapes
    lm = meta_model(shape_config(llm))
    d_model, depth = lm.config.hidden_size, lm.config.num_hidden_layers
    if vision == "mobilenet-v2":
        with torch.device("meta"):
            tower = MobileNetV2()
        widths, c_tokens = MOBILENET_V2_BLOCK_WIDTHS, 1280
    elif vision in vision_shapes:
        with torch.device("meta"):
            tower = CLIPVisionModel(CLIPVisionConfig(**vision_shapes[vision]))
        c_tokens = vision_shapes[vision]["hidden_size"]
        widths = [c_tokens] * vision_shapes[vision]["num_hidden_layers"]
    else:
        raise ValueError(
            f"vision shape {vision!r}: use mobilenet-v2 or one of {sorted(vision_shapes)}"
        )
    n_proj = c_tokens * d_model + d_model
    if projector == "mlp":
        n_proj += d_model * d_model + d_model
    edits = mrt_trainable(mrt, d_model=d_model, num_llm_layers=depth, vision_widths=widths)
    n_llm, n_vision = count_parameters(lm).total, count_parameters(tower).total
    total = n_llm + n_vision + n_proj + edits["total"]
    return {
        "llm": llm,
        "vision": vision,
        "params": {"llm": n_llm, "vision": n_vision, "projector": n_proj, "all": total},
        "mrt_edits": edits,
        "share_of_all": edits["total"] / total,
        "share_of_llm": edits["total"] / n_llm,
    }
