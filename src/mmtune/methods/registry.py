"""The Method registry: how the modality reaches a frozen model, one entry per method.

A :class:`MethodSpec` names a method, says what it trains on (``llm``: the task models of
``mmtune train``; ``lmm``: a LLaVA-style model), how it reads the modality, and which config
dataclass holds its options. PEFT adapters (LoRA, IA3) are not methods: they are a separate
choice (``peft``: none, lora, ia3) made on top of a method that leaves the LLM frozen.

Register a method with :func:`register_method` (one registration point); recipes ask
:func:`get_method` instead of branching on names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "PEFT_KINDS",
    "MethodSpec",
    "get_method",
    "methods",
    "register_method",
    "split_legacy_method",
]

PEFT_KINDS: tuple[str, ...] = ("none", "lora", "ia3")
"""The PEFT adapters a method may add to the frozen LLM (``none``: the LLM stays as it is)."""


@dataclass(frozen=True)
class MethodSpec:
    """One registered method."""

    name: str
    """Registry key (``method:`` in a config)."""
    summary: str
    """One line: what it trains and how the modality reaches the model."""
    model: Literal["llm", "lmm"]
    """``llm``: the task models of ``mmtune train``; ``lmm``: a LLaVA-style model."""
    reads: Literal["vector", "tokens", "representations", "nothing"]
    """How the modality enters: a vector I (MiT), tokens before the text, edits of hidden
    representations (MRT), or not at all (the text-only baseline)."""
    takes_peft: bool = False
    """Whether ``peft`` (lora, ia3) may be added on top of it."""
    needs_feature_maps: bool = False
    """The modality is read as the image encoder's feature maps (tokens) too."""


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` under ``spec.name`` (replacing any method of that name); returns it."""
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is one error listing the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"method {name!r}: not one of {', '.join(sorted(_METHODS))}") from None


def methods(model: str | None = None) -> list[str]:
    """The registered method names (those for ``model`` = ``llm`` or ``lmm``, if given)."""
    return sorted(n for n, s in _METHODS.items() if model is None or s.model == model)


_LEGACY = {"concat_lora": ("concat", "lora"), "concat_ia3": ("concat", "ia3")}


def split_legacy_method(method: str, peft: str, where: str, warn: bool = True) -> tuple[str, str]:
    """``(method, peft)`` from a spelling of mmtune < 0.4 (``concat_lora``, ``concat_ia3``),
    with a DeprecationWarning naming ``where``; other names pass through unchanged."""
    if method not in _LEGACY:
        return method, peft
    new_method, new_peft = _LEGACY[method]
    if peft not in ("none", new_peft):
        raise ValueError(f"{where}: method {method!r} and peft {peft!r} disagree")
    if warn:
        warnings.warn(
            f"{where}: method {method!r} is deprecated (removed in mmtune 0.5); write "
            f"method: {new_method} and peft: {new_peft}",
            DeprecationWarning,
            stacklevel=4,
        )
    return new_method, new_peft


for _spec in (
    MethodSpec(
        "mit",
        "MiT: learned maps of the modality vector I rescale and shift keys, values and "
        "feed-forward activations of the last layers, with a per-head gate; no extra tokens.",
        model="llm",
        reads="vector",
    ),
    MethodSpec(
        "text",
        "text only: the modality does not reach the frozen LLM (a baseline).",
        model="llm",
        reads="nothing",
    ),
    MethodSpec(
        "concat",
        "token concatenation: projected modality tokens before the text (LLaVA style), with "
        "optional PEFT adapters (LoRA, IA3) in the frozen LLM.",
        model="llm",
        reads="tokens",
        takes_peft=True,
        needs_feature_maps=True,
    ),
    MethodSpec(
        "mrt",
        "MRT: low-rank (LoReFT) edits of vision, projector and LLM hidden representations of a "
        "LLaVA-style model, controllable at inference.",
        model="lmm",
        reads="representations",
    ),
):
    register_method(_spec)
del _spec
