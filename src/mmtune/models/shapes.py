"""Named model shapes, for counting and benchmarking without weights (meta device).

A shape is the config of a public model; nothing is downloaded. Any other name is read with
``AutoConfig.from_pretrained`` (a local directory, or a hub id where a hub can be reached).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

__all__ = ["MOBILENET_V2_BLOCK_WIDTHS", "SHAPES", "VISION_SHAPES", "meta_model", "shape_config"]

SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "llama-2-13b": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


def shape_config(name_or_path: str, **overrides: Any) -> PretrainedConfig:
    """The config of a named shape (see ``SHAPES``) or of a model directory / hub id."""
    if name_or_path in SHAPES:
        fields = {**SHAPES[name_or_path], **overrides}
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{name_or_path!r} is neither a named shape ({', '.join(SHAPES)}) nor a model "
            f"directory or reachable hub id with a config.json ({e})"
        ) from e
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """Build the model of ``config`` on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


VISION_SHAPES: dict[str, dict[str, Any]] = {
    # CLIP ViT-L/14-336: LLaVA-1.5's tower (24 layers, width 1024, 577 tokens)
    "clip-vit-l-14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
}

# Output channels of the embedded MobileNetV2's 19 feature blocks (what MRT's vision edits see).
MOBILENET_V2_BLOCK_WIDTHS = [
    32,
    16,
    24,
    24,
    32,
    32,
    32,
    64,
    64,
    64,
    64,
    96,
    96,
    96,
    160,
    160,
    160,
    320,
    1280,
]
