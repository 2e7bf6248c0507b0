r"""Baselines: token concatenation (LLaVA / LLaMA-Adapter style), alone or with LoRA or IA3.

Liu et al., "Visual Instruction Tuning" (LLaVA, 2023) and "Improved Baselines with Visual
Instruction Tuning" (LLaVA-1.5): modality features become tokens through a learned projector and
are put in the frozen LLM's input before the text::

    tokens = P(F)                         F: (B, N, C) features, one row per token
    P      = Linear(C -> d)               projector "linear" (LLaVA-1)
           | Linear(C -> d) . GELU . Linear(d -> d)    projector "mlp" (LLaVA-1.5, the default)
    input  = [tokens ; embed(text)]       (B, N + T, d), the LLM's attention sees N + T tokens

Image features are a vision encoder's last feature map, one token per cell (MobileNetV2 at 224
px: 7 x 7 = 49 tokens of 1280 channels), optionally average-pooled to ``grid x grid``; frame
modalities (acoustic, facial) give one token per frame, each modality with its own projector,
padding frames masked out. The cost of attention grows with (N + T)^2 and every layer's
activations with N + T: this is what MiT avoids.

With ``adapter``, the frozen LLM also gets PEFT adapters through ``peft.inject_adapter_in_model``
(the base modules keep working in place; no PeftModel wrapper):

- ``lora`` (Hu et al., 2021): ``W x + (alpha / r) B A x`` with B = 0 at init;
- ``ia3`` (Liu et al., 2022): ``l * (W x)`` on keys/values, ``W (l * x)`` on the feed-forward
  down projection, l = 1 at init.

Target modules default to PEFT's own per-model-type defaults (LLaMA: LoRA on q_proj, v_proj;
IA3 on k_proj, v_proj, down_proj).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConcatConfig",
    "PeftAdapterConfig",
    "TokenProjector",
    "image_tokens",
    "inject_peft",
    "load_peft_format",
    "save_peft_format",
]

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
"""PEFT's own file names: ``PeftModel.from_pretrained(base, directory)`` reads these two."""
PEFT_CONFIG_NAME = "adapter_config.json"

Projector = Literal["mlp", "linear"]


@dataclass
class ConcatConfig:
    """Token concatenation: projected modality tokens placed before the text."""

    projector: Projector = "mlp"
    """``mlp``: Linear-GELU-Linear (LLaVA-1.5); ``linear``: one Linear (LLaVA-1)."""
    grid: int | None = None
    """Average-pool an image feature map to grid x grid tokens; ``None`` keeps the encoder's own
    grid (7 x 7 for MobileNetV2 at 224 px, 4 x 4 at 112 px)."""

    def __post_init__(self) -> None:
        if self.projector not in ("mlp", "linear"):
            raise ValueError(
                f"ConcatConfig.projector must be 'mlp' or 'linear', got {self.projector!r}"
            )
        if self.grid is not None and self.grid < 1:
            raise ValueError(f"ConcatConfig.grid must be >= 1 or None, got {self.grid}")


@dataclass
class PeftAdapterConfig:
    """Options of the LoRA / IA3 adapters PEFT adds to the frozen LLM (``peft: lora`` / ``ia3``
    with method ``concat``, and ``lmm tune --method lora``)."""

    lora_r: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / r) B A x."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt; ``None``: PEFT's default for the model type."""
    feedforward_modules: list[str] | None = None
    """IA3 only: which targets are feed-forward (scaled on their input); ``None``: PEFT's
    default."""

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"PeftAdapterConfig.lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"PeftAdapterConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}"
            )


def inject_peft(
    llm: nn.Module, kind: Literal["lora", "ia3"], config: PeftAdapterConfig
) -> nn.Module:
    """Freeze ``llm`` and add LoRA or IA3 adapters in place (PEFT); only they train."""
    from peft import IA3Config, LoraConfig, inject_adapter_in_model

    llm.requires_grad_(False)
    if kind == "lora":
        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            bias="none",
        )
    elif kind == "ia3":
        peft_config = IA3Config(
            target_modules=config.target_modules,
            feedforward_modules=config.feedforward_modules,
        )
    else:
        raise ValueError(f"unknown PEFT adapter {kind!r} (lora, ia3)")
    try:
        inject_adapter_in_model(peft_config, llm)
    except ValueError as e:  # e.g. no default targets for this model type
        raise ValueError(
            f"PEFT could not add {kind} to {type(llm).__name__}: {e}; set peft.target_modules"
        ) from e
    # Only the adapters' own tensors train, found structurally: every PEFT layer names the
    # attributes that hold them (lora_A, lora_B, ...; ia3_l), whatever the modules are called.
    from peft.tuners.tuners_utils import BaseTunerLayer

    llm.requires_grad_(False)
    for module in llm.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                getattr(module, attr).requires_grad_(True)
    if not any(p.requires_grad for p in llm.parameters()):
        raise ValueError(f"PEFT added no {kind} tensors: check peft.target_modules")
    # The adapters train in fp32 whatever the base holds (PEFT builds them in a quantized
    # layer's compute dtype, e.g. bf16 on a 4-bit base: get_peft_model's autocast_adapter_dtype)
    for p in llm.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return llm


def save_peft_format(
    llm: nn.Module, directory: str | os.PathLike[str], base_model: str | None = None
) -> Path:
    """Write the LoRA / IA3 tensors that :func:`inject_peft` added to ``llm`` in PEFT's own
    format, so that ``peft.PeftModel.from_pretrained(fresh_llm, directory)`` loads them.

    ``adapter_config.json`` is the PEFT config (``base_model_name_or_path`` set to
    ``base_model``); ``adapter_model.safetensors`` holds ``get_peft_model_state_dict`` with the
    ``base_model.model.`` prefix a ``PeftModel`` gives its keys. Both are written atomically."""
    from peft import get_peft_model_state_dict

    from mmtune.utils.io import atomic_write, save_tensors

    configs = getattr(llm, "peft_config", None)
    if not configs or "default" not in configs:
        raise ValueError(f"{type(llm).__name__} holds no PEFT adapter (inject_peft adds one)")
    config = copy.deepcopy(configs["default"])
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = get_peft_model_state_dict(llm, adapter_name="default")
    save_tensors(
        directory / PEFT_WEIGHTS_NAME,
        {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"format": "pt"},
    )
    with atomic_write(directory / PEFT_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list))
    return directory


def load_peft_format(llm: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Copy a PEFT-format adapter (``save_peft_format``) into ``llm``, which already holds an
    adapter of the same shape (:func:`inject_peft`); missing or unexpected keys are one error."""
    from peft import set_peft_model_state_dict

    from mmtune.utils.io import load_tensors

    path = Path(directory) / PEFT_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(2, "no such file (a PEFT adapter directory holds it)", str(path))
    tensors = load_tensors(path, "PEFT adapter weights")
    prefix = "base_model.model."
    bad = sorted(k for k in tensors if not k.startswith(prefix))
    if bad:
        raise ValueError(f"{path}: keys not in PEFT's layout ({prefix}...): {bad[:3]}")
    own = set(get_peft_state_keys(llm))
    given = {k.removeprefix(prefix) for k in tensors}
    if own != given:
        raise ValueError(
            f"{path} does not fit this model: missing {sorted(own - given)[:3]}, "
            f"unexpected {sorted(given - own)[:3]} (saved with other target modules?)"
        )
    result = set_peft_model_state_dict(
        llm, {k.removeprefix(prefix): v for k, v in tensors.items()}, adapter_name="default"
    )
    del result  # missing keys here are the frozen base weights, which stay as they are


def get_peft_state_keys(llm: nn.Module) -> list[str]:
    """The keys ``get_peft_model_state_dict`` gives ``llm``'s adapter (without the prefix)."""
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(llm, adapter_name="default"))


def image_tokens(feature_map: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h * w, C) tokens (row-major), optionally pooled first."""
    if feature_map.ndim != 4:
        raise ValueError(
            f"an image feature map must be (B, C, h, w); got {tuple(feature_map.shape)}"
        )
    if grid is not None:
        feature_map = F.adaptive_avg_pool2d(feature_map, grid)
    return feature_map.flatten(2).transpose(1, 2)  # (B, C, h*w) -> (B, h*w, C)


class TokenProjector(nn.Module):
    """One projector per modality source; sources are concatenated in a fixed order."""

    def __init__(self, widths: dict[str, int], d_model: int, kind: Projector = "mlp"):
        super().__init__()
        if not widths:
            raise ValueError("TokenProjector needs at least one modality source")
        self.d_model = d_model
        self.widths = dict(widths)

        def make(c: int) -> nn.Module:
            if kind == "linear":
                return nn.Linear(c, d_model)
            return nn.Sequential(nn.Linear(c, d_model), nn.GELU(), nn.Linear(d_model, d_model))

        self.proj = nn.ModuleDict({name: make(c) for name, c in widths.items()})

    def forward(
        self, sources: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """{name: (features (B, N, C), mask (B, N))} -> tokens (B, sum N, d), mask (B, sum N)."""
        missing = set(self.proj) - set(sources)
        if missing:
            raise ValueError(f"TokenProjector: no features for {sorted(missing)}")
        tokens, masks = [], []
        for name, proj in self.proj.items():
            feats, mask = sources[name]
            if feats.ndim != 3 or feats.shape[-1] != self.widths[name]:
                raise ValueError(
                    f"{name} features must be (B, N, {self.widths[name]}); got {tuple(feats.shape)}"
                )
            dtype = proj[0].weight.dtype if isinstance(proj, nn.Sequential) else proj.weight.dtype
            tokens.append(proj(feats.to(dtype)))
            masks.append(mask.to(torch.long))
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)
