"""MRT: Multimodal Representation Tuning of a LLaVA-style model.

Reference: "Multimodal Representation Tuning" (MRT, 2025), with the LoReFT edit of Wu et al.,
"ReFT: Representation Finetuning for Language Models" (2024). Instead of new weights inside the
layers, MRT learns low-rank edits of hidden representations at chosen positions:

    phi(h) = h + s * R^T (W h + b - R h)

with R (r x d) having orthonormal rows (``torch.nn.utils.parametrizations.orthogonal``), W (r x d),
b (r), and s the edit's scale (1 = as trained, 0 = off; any other value is allowed at inference).
The edit replaces the component of h in R's row space by W h + b and leaves the orthogonal
complement untouched. Edits sit at

- ``vision.<i>``: the output of vision-encoder block i, on every visual token (rank about 6);
- ``projector``: the projector's output, the cross-modal tokens the LLM reads;
- ``llm.<j>``: the output of decoder layer j at the first p and the last s prompt tokens
  (rank about 4). Positions come from each sample's real prompt span (after left padding, with
  prompts of any length and any number of images), never from fixed offsets.

Initialisation: ``init="identity"`` (default) sets W = R and b = 0, so every edit is exactly the
identity at step 0 and the model starts as the base model; ``init="loreft"`` keeps PyTorch's
default Linear initialisation of W and b as the ReFT reference code does.

Control at inference (:class:`MRTControl`): choose the edited prompt positions and scale each
edit by name. Only edit parameters train; the base model is untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmtune.methods.mrt.config import MRTConfig, MRTControl, _llm_layer_indices
from mmtune.methods.mrt.layer import LoReFTEdit, mrt_trainable
from mmtune.methods.mrt.model import MRTModel, load_mrt, projector_digest
from mmtune.methods.mrt.vlm import (
    VLM_ARCHITECTURES,
    MRTForVLM,
    VLMSpec,
    inject_mrt_vlm,
    register_vlm_architecture,
)
from mmtune.models.lmm import LlavaStyleModel


def inject_mrt(base: nn.Module, config: MRTConfig | None = None) -> Any:
    """Wrap ``base`` with MRT edits (the base stays frozen; only the edits train).

    ``base`` is mmtune's :class:`LlavaStyleModel` (an :class:`MRTModel` comes back) or a
    transformers VLM such as ``LlavaForConditionalGeneration`` (a
    :class:`mmtune.methods.mrt.vlm.MRTForVLM`, placed through its architecture table)."""
    if isinstance(base, LlavaStyleModel):
        return MRTModel(base, config)
    return MRTForVLM(base, config)


__all__ = [
    "VLM_ARCHITECTURES",
    "LoReFTEdit",
    "MRTConfig",
    "MRTControl",
    "MRTForVLM",
    "MRTModel",
    "VLMSpec",
    "_llm_layer_indices",
    "inject_mrt",
    "inject_mrt_vlm",
    "load_mrt",
    "mrt_trainable",
    "projector_digest",
    "register_vlm_architecture",
]
