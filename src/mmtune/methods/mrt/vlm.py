"""MRT on transformers' own vision-language models (``LlavaForConditionalGeneration``).

The same LoReFT edits as :mod:`mmtune.methods.mrt` (``phi(h) = h + s R^T (W h + b - R h)``,
identity at init), placed through an architecture table instead of mmtune's own LLaVA-style
model:

- ``vision.<k>``: the output of vision-tower block k, on every token of the block. Negative
  indices count back from the block whose output the model reads as image features
  (``config.vision_feature_layer``; LLaVA-1.5 reads the penultimate block, so ``-1`` is that
  block, not the tower's last one, whose output LLaVA never uses);
- ``projector``: the multimodal projector's output, the image tokens the LLM reads;
- ``llm.<j>``: the output of language-model layer j (0-based) at the first p and the last s
  prompt tokens. The prompt span of each sample is its attention mask (left or right padding),
  and the image-token mask (``input_ids == config.image_token_id``, what the processor writes)
  must hold as many positions as the images give tokens.

Generation is the model's own ``generate``: the LLM edits act during the prefill, whose length
is the prompt's; the decode steps (one new position each) are not prompt positions.

Covered families (:data:`VLM_ARCHITECTURES`, :func:`register_vlm_architecture`):

- ``llava`` (LLaVA-1.5 and the ``-hf`` checkpoints);
- ``llava_next`` (LLaVA-NeXT / 1.6): the same parts; the tower sees the base image and its
  any-resolution crops, every crop token gets the vision edits, the projector edit acts before
  the crops are packed with their newline tokens;
- ``qwen2_vl`` and ``qwen2_5_vl``: the vision blocks (``visual.blocks``) work on the packed
  patches of every image, ``(patches, width)``; the "projector" is the patch merger
  (``visual.merger``), whose output tokens the LLM reads; multimodal RoPE positions are the
  model's own (pass the processor's ``mm_token_type_ids``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.methods.base import AdapterModel
from mmtune.methods.mrt.config import MRTConfig, _llm_layer_indices
from mmtune.methods.mrt.layer import LoReFTEdit
from mmtune.utils.adapter_file import (
    load_adapter_tensors,
    read_adapter,
    write_adapter,
)

__all__ = [
    "VLM_ARCHITECTURES",
    "MRTForVLM",
    "VLMSpec",
    "inject_mrt_vlm",
    "register_vlm_architecture",
]


@dataclass(frozen=True)
class VLMSpec:
    """Where a transformers VLM keeps its parts: each field lists candidate dotted paths, the
    first that exists is used (module layouts moved between transformers releases)."""

    vision_layers: tuple[str, ...]
    """The vision tower's block list."""
    projector: tuple[str, ...]
    """The multimodal projector."""
    llm_layers: tuple[str, ...]
    """The language model's decoder-layer list."""
    image_token: str = "image_token_id"
    """Config attribute holding the image placeholder token id."""
    feature_layer: str | None = "vision_feature_layer"
    """Config attribute naming the vision hidden state used as features (None: the last)."""
    vision_width: str = "hidden_size"
    """Attribute of ``config.vision_config`` holding the width of a vision block's output."""


_LLAVA = VLMSpec(
    vision_layers=(
        "model.vision_tower.encoder.layers",
        "model.vision_tower.vision_model.encoder.layers",
        "vision_tower.vision_model.encoder.layers",
    ),
    projector=("model.multi_modal_projector", "multi_modal_projector"),
    llm_layers=("model.language_model.layers", "language_model.model.layers"),
)
_QWEN_VL = {
    "vision_layers": ("model.visual.blocks", "visual.blocks"),
    "projector": ("model.visual.merger", "visual.merger"),
    "llm_layers": ("model.language_model.layers", "model.layers"),
    "feature_layer": None,  # the merger reads the last block
}

VLM_ARCHITECTURES: dict[str, VLMSpec] = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "qwen2_vl": VLMSpec(**_QWEN_VL, vision_width="embed_dim"),  # hidden_size: the merger's
    "qwen2_5_vl": VLMSpec(**_QWEN_VL, vision_width="hidden_size"),
}


def register_vlm_architecture(model_type: str, spec: VLMSpec) -> None:
    """Teach MRT where a VLM family (``config.model_type``) keeps its parts."""
    VLM_ARCHITECTURES[model_type] = spec


def _find(model: nn.Module, paths: tuple[str, ...], what: str) -> Any:
    for path in paths:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__}: no {what} at any of {list(paths)}")


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace(out: Any, h: torch.Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


class MRTForVLM(AdapterModel):
    """A transformers VLM with MRT edits; only the edits train, the model is untouched.

    ``model(**processor_outputs)`` and ``model.generate(**processor_outputs, ...)`` work as on
    the wrapped model; the adapter API is the shared one (:class:`AdapterModel`)."""

    adapter_prefix = "edits."

    def __init__(self, model: nn.Module, config: MRTConfig | None = None):
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in VLM_ARCHITECTURES:
            raise ValueError(
                f"MRT knows no VLM of type {model_type!r}; known: {sorted(VLM_ARCHITECTURES)} "
                "(register_vlm_architecture adds one)"
            )
        self.spec = spec = VLM_ARCHITECTURES[model_type]
        self.base_model = model
        self.mrt_config = config = config or MRTConfig()
        model.requires_grad_(False)
        blocks = _find(model, spec.vision_layers, "vision blocks")
        projector = _find(model, spec.projector, "projector")
        layers = _find(model, spec.llm_layers, "language-model layers")
        self.image_token_id = getattr(model.config, spec.image_token)
        feature = getattr(model.config, spec.feature_layer, -1) if spec.feature_layer else -1
        feature = feature[-1] if isinstance(feature, list | tuple) else feature
        n = len(blocks)
        last_read = (feature % (n + 1)) - 1  # hidden_states[0] is the embeddings
        vision_width = getattr(model.config.vision_config, spec.vision_width)
        d_model = model.config.text_config.hidden_size
        edits: dict[str, LoReFTEdit] = {}
        self._vision: dict[str, int] = {}
        for i in config.vision_layers:
            k = last_read + 1 + i if i < 0 else i
            if not 0 <= k <= last_read:
                raise ValueError(
                    f"MRTConfig.vision_layers: {i} is block {k}, outside the {last_read + 1} "
                    "blocks whose outputs reach the image features"
                )
            self._vision[f"vision.{k}"] = k
            edits[f"vision.{k}"] = LoReFTEdit(vision_width, config.vision_rank, config.init)
        if config.projector_edit:
            edits["projector"] = LoReFTEdit(d_model, config.projector_rank, config.init)
        self._llm = {f"llm.{j}": j for j in _llm_layer_indices(config, len(layers))}
        for name in self._llm:
            edits[name] = LoReFTEdit(d_model, config.llm_rank, config.init)
        p = next(model.parameters())
        self.edits = nn.ModuleDict({k.replace(".", "_"): v for k, v in edits.items()})
        self.edits.to(device=p.device, dtype=p.dtype)
        self.scale = 1.0
        self._positions: torch.Tensor | None = None  # (B, T) prompt positions while active
        # prepend: transformers records hidden states (the vision features LLaVA reads among
        # them) with forward hooks of its own; the edit must run before them, or the feature
        # layer's recorded output would be the unedited one
        self._hooks = [blocks[k].register_forward_hook(self._edit_all(n), prepend=True)
                       for n, k in self._vision.items()]  # fmt: skip
        if config.projector_edit:
            self._hooks.append(
                projector.register_forward_hook(self._edit_all("projector"), prepend=True)
            )
        for name, j in self._llm.items():
            self._hooks.append(
                layers[j].register_forward_hook(self._edit_prompt(name), prepend=True)
            )

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def edit_names(self) -> list[str]:
        """Every edit's name: ``vision.<k>``, ``projector``, ``llm.<j>``."""
        return [*self._vision, *(["projector"] if self.mrt_config.projector_edit else []),
                *self._llm]  # fmt: skip

    def edit(self, name: str) -> LoReFTEdit:
        return self.edits[name.replace(".", "_")]

    # -- hooks -----------------------------------------------------------------------------
    def _edit_all(self, name: str):
        def hook(_m, _inp, out):
            if self.scale == 0.0 or not self.adapter_enabled:
                return out
            return _replace(out, self.edit(name)(_output(out), self.scale))

        return hook

    def _edit_prompt(self, name: str):
        def hook(_m, _inp, out):
            positions = self._positions
            h = _output(out)  # (B, T, d)
            off = self.scale == 0.0 or not self.adapter_enabled
            if positions is None or off or positions.shape != h.shape[:2]:
                return out  # a decode step (T = 1 new position) is not a prompt position
            scale = (self.scale * positions.to(h.dtype))[..., None]  # (B, T, 1)
            return _replace(out, h + scale * self.edit(name).delta(h))

        return hook

    # -- positions -------------------------------------------------------------------------
    def prompt_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T) bool: the first p and last s real tokens of each prompt (the attention mask's
        span, so left and right padding give the same positions)."""
        b, t = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else (
            attention_mask.bool()
        )  # fmt: skip
        out = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
        p, s = self.mrt_config.first, self.mrt_config.last
        for i in range(b):
            real = mask[i].nonzero().flatten()  # the prompt's positions, in order
            n = len(real)
            chosen = [*range(min(p, n)), *range(max(0, n - s), n)]
            out[i, real[chosen]] = True
        return out

    def _check_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        if pixel_values is None:
            return
        placeholders = int((input_ids == self.image_token_id).sum())
        if placeholders == 0:
            raise ValueError(
                f"input_ids hold no image token (id {self.image_token_id}) but pixel_values "
                f"{tuple(pixel_values.shape)} were given: build the inputs with the processor"
            )

    @contextmanager
    def _prompt(self, kwargs: dict[str, Any]) -> Iterator[None]:
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("MRTForVLM needs input_ids (the edit positions come from them)")
        self._check_images(input_ids, kwargs.get("pixel_values"))
        self._positions = self.prompt_positions(input_ids, kwargs.get("attention_mask"))
        try:
            yield
        finally:
            self._positions = None

    def forward(self, **kwargs: Any) -> Any:
        """The wrapped model's forward with the edits at this prompt's positions."""
        with self._prompt(kwargs):
            return self.base_model(**kwargs)

    def generate(self, **kwargs: Any) -> Any:
        """The wrapped model's own ``generate``; the LLM edits act on the prompt (prefill)."""
        with self._prompt(kwargs):
            return self.base_model.generate(**kwargs)

    # -- files -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """``adapter.safetensors`` + ``adapter_config.json`` (method ``mrt-vlm``), atomically."""
        return write_adapter(
            directory,
            method="mrt-vlm",
            tensors=self.adapter_state_dict(),
            config={"mrt": asdict(self.mrt_config)},
            base_model=self.base_model,
        )

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> MRTForVLM:
        """The edits saved in ``directory`` on ``model`` (a fresh VLM of the same shape)."""
        meta, tensors = read_adapter(directory, method="mrt-vlm")
        try:
            config = MRTConfig(**meta["config"]["mrt"])
        except (KeyError, TypeError) as e:
            where = Path(directory) / "adapter_config.json"
            raise ValueError(f"{where}: field 'config.mrt' does not fit MRTConfig ({e})") from e
        wrapped = cls(model, config)
        load_adapter_tensors(wrapped, tensors, source=str(directory), prefix="edits.")
        return wrapped

    def unload(self) -> nn.Module:
        """Remove the hooks and return the unmodified model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.base_model


def inject_mrt_vlm(model: nn.Module, config: MRTConfig | None = None) -> MRTForVLM:
    """Wrap a transformers VLM (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) with MRT edits."""
    return MRTForVLM(model, config)
