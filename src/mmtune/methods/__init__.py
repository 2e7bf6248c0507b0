"""Tuning methods. Each method registers its injector here (one registration point)."""

from collections.abc import Callable

from torch import nn

from mmtune.methods.mit import MiTConfig, MiTModel, inject_mit

METHODS: dict[str, tuple[type, Callable[..., nn.Module]]] = {
    "mit": (MiTConfig, inject_mit),
}

__all__ = ["METHODS", "MiTConfig", "MiTModel", "inject_mit"]
