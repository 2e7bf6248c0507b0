"""Architecture table: where the pieces MiT hooks into live in each Hugging Face causal LM.

One entry per ``config.model_type``. Paths are dotted attribute paths: ``layers`` from the
model root, the others from one decoder layer. Adding a model family is one call to
:func:`register_architecture`; no attention code is copied per model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "ArchitectureSpec",
    "get_architecture",
    "linear_features",
    "register_architecture",
    "resolve",
    "supported_model_types",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths and config fields of one model family."""

    layers: str
    """Dotted path from the model root to the list of decoder layers, e.g. ``model.layers``."""
    ff_down: str
    """Path (from a decoder layer) of the feed-forward output projection whose *input* is the
    activated hidden ``act(gate(x)) * up(x)`` (SwiGLU) or ``act(c_fc(x))`` (GPT-2)."""
    k_proj: str | None = None
    """Path of the key projection; ``None`` when keys come from a fused ``qkv_proj``."""
    v_proj: str | None = None
    """Path of the value projection; ``None`` when values come from a fused ``qkv_proj``."""
    qkv_proj: str | None = None
    """Path of a fused projection whose output is ``[q | k | v]`` along the last axis."""
    num_kv_heads: tuple[str, ...] = ("num_key_value_heads", "num_attention_heads")
    """Config fields tried in order for the number of key/value heads."""
    num_heads: tuple[str, ...] = ("num_attention_heads",)
    """Config fields tried in order for the number of query heads (fused layouts only)."""

    def __post_init__(self) -> None:
        separate = self.k_proj is not None and self.v_proj is not None
        if separate == (self.qkv_proj is not None):
            raise ValueError(
                "ArchitectureSpec needs either both k_proj and v_proj, or qkv_proj, not both"
            )


_LLAMA_LIKE = ArchitectureSpec(
    layers="model.layers",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    ff_down="mlp.down_proj",
)

_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    # LLaMA-1/2/3, SmolLM/SmolLM2, TinyLlama, Vicuna ... all report model_type "llama".
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    # Qwen3 and OLMo2 normalise keys (k_norm) after k_proj: the infusion acts before that norm,
    # which rescales each key back to unit RMS, so Id_k acts as a per-channel reweighting.
    "qwen3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "starcoder2": ArchitectureSpec(
        layers="model.layers",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        ff_down="mlp.c_proj",
    ),
    "phi3": ArchitectureSpec(
        layers="model.layers",
        qkv_proj="self_attn.qkv_proj",
        ff_down="mlp.down_proj",
    ),
    "gpt2": ArchitectureSpec(
        layers="transformer.h",
        qkv_proj="attn.c_attn",
        ff_down="mlp.c_proj",
        num_kv_heads=("n_head",),
        num_heads=("n_head",),
    ),
}


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Register (or replace) the module paths of a model family, keyed by ``config.model_type``."""
    _ARCHITECTURES[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(model_type: str) -> ArchitectureSpec:
    try:
        return _ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}. Register its module paths with "
            "mmtune.register_architecture(model_type, ArchitectureSpec(...))."
        ) from None


def resolve(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path; the error names the missing part."""
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"{type(root).__name__} has no module at {path!r} (missing {part!r}); the "
                "architecture table entry for this model_type does not match the model"
            )
        obj = getattr(obj, part)
    return obj


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 style ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return int(module.nx), int(module.nf)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # quantised linears
        return int(module.in_features), int(module.out_features)
    raise ValueError(f"cannot read the input/output width of {type(module).__name__}")


def config_int(config: object, fields: tuple[str, ...]) -> int:
    """First set integer field of ``config`` among ``fields``."""
    for name in fields:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} has none of the fields {', '.join(fields)}")
