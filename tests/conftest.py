"""Tiny random Hugging Face models built in-process (no network, no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from mmtune import MiTModel

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
D_I = 12


def tiny_config(arch: str, num_layers: int = 4):
    """A tiny config of ``arch``: 4 query heads, 2 kv heads (grouped-query), head dim 8."""
    common = {"vocab_size": 97, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32, n_layer=num_layers, n_head=4, n_positions=128, n_inner=48, **common
        )
    return AutoConfig.for_model(
        arch,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **common,
    )


def tiny_model(arch: str, attn: str = "eager", seed: int = 0, num_layers: int = 4):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, num_layers), attn_implementation=attn, dtype=torch.float32
    )
    return model.eval()


def perturb(mit: MiTModel, seed: int = 1, std: float = 0.3) -> MiTModel:
    """Move every infusion parameter away from its init, so the infusion does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mit.infusion.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return mit


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
