"""Partial forwards of a frozen decoder stack: run layers i..j, and the lower-layer cache.

The hidden states below the first infused layer do not depend on the modality, so they can be
computed once per sample and every later pass can start at that layer
(:class:`LowerLayerCache`). :func:`layer_slice` and :func:`states_entering` are the two
primitives; the task model and the cost benchmark both use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["PASSTHROUGH_FAMILIES", "LowerLayerCache", "layer_slice", "states_entering"]

# Families whose decoder forward passes inputs_embeds to the first layer unchanged, so a
# cached hidden state can be fed back in as inputs_embeds (GPT-2 adds positions, Gemma scales).
PASSTHROUGH_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}


class LowerLayerCache:
    """Hidden states entering the first infused layer, one (T_i, d) tensor per sample id.

    It fills itself from work already done: a forward over samples it lacks runs the whole
    LLM and keeps the states passing into that layer (:meth:`TaskModel.text_vector`), so the
    first epoch and each split's first evaluation cost what they cost without a cache, and
    every later pass runs only the layers from ``first_layer`` up. (The frozen layers below
    it do not depend on I; they are the same every epoch.)"""

    def __init__(self, first_layer: int):
        self.first_layer = first_layer  # 1-based number of the first infused layer
        self.states: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def has(self, ids: list[str]) -> bool:
        return all(i in self.states for i in ids)


@contextmanager
def layer_slice(decoder: nn.Module, start: int, stop: int | None) -> Iterator[None]:
    """Run ``decoder`` (a HF decoder stack with ``.layers``) on ``layers[start:stop]`` only.

    ``start`` and ``stop`` are 0-based slice bounds. The stack's ``layers`` list is replaced by
    the slice for the duration of the ``with`` block and restored after it, even on an error;
    the layers themselves (and their hooks, e.g. MiT's) are the same objects. Not
    thread-safe: one forward at a time per decoder."""
    full = decoder.layers
    decoder.layers = nn.ModuleList(list(full)[start:stop])
    try:
        yield
    finally:
        decoder.layers = full


def states_entering(decoder: nn.Module, first_layer: int, **inputs: Any) -> torch.Tensor:
    """Hidden states (B, T, d) entering 1-based layer ``first_layer`` (it must be >= 2): the
    output of the layer below it, running only ``layers[: first_layer - 1]``."""
    captured: list[torch.Tensor] = []
    handle = decoder.layers[first_layer - 2].register_forward_hook(
        lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with layer_slice(decoder, 0, first_layer - 1):
            decoder(**inputs)
    finally:
        handle.remove()
    return captured[-1]
