"""Tiny random models saved as directories, for end-to-end runs of the real code paths."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTModel,
)

WORDS = [
    "the",
    "digit",
    "is",
    "even",
    "odd",
    "number",
    "shown",
    "greater",
    "less",
    "than",
    "image",
    "shows",
    "a",
    "an",
    "of",
    "to",
    "it",
    "was",
    "with",
    "on",
    "by",
    "in",
    "and",
    "for",
    "at",
    "written",
    "pen",
    "person",
    "who",
    "wrote",
    "left",
    "handed",
    "monday",
    "writer",
    "hurry",
    "copied",
    "from",
    "phone",
    "paper",
    "lying",
    "wooden",
    "desk",
    "blue",
    "red",
    "green",
    "yellow",
    "square",
    "circle",
    "triangle",
    "leftmost",
    "rightmost",
    "larger",
    "smaller",
    "shape",
    "segment",
    "according",
    "text",
    "segmentation",
    "statement",
    "supported",
    "?",
    ".",
    ":",
    "#",
    "relation",
    "rate",
    "sentiment",
    "sentence",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
]


def tiny_llm_dir(path: Path, num_layers: int = 4, hidden_size: int = 32) -> Path:
    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    ).save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def tiny_vit_dir(path: Path) -> Path:
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(path)
    return path
