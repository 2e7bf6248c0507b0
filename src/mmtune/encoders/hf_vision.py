"""Any Hugging Face vision transformer as a frozen encoder: CLIP, SigLIP, ViT, DINOv2 ...

- global vector: CLIP's ``image_embeds`` (after the projection: 768-d for ViT-L/14-336, the
  paper's ``I``), else ``pooler_output``, else the first token of the last layer;
- three feature maps: the hidden states after the chosen 1-based layers (default N/4, N/2,
  3N/4: 6/12/18 on CLIP ViT-L, the paper's choice), prefix tokens (CLS, registers) dropped
  and the patch tokens laid back on their (S/P) x (S/P) grid. All three share the stride.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from mmtune.encoders.images import ImagePreprocess
from mmtune.encoders.vision import VisionEncoder, VisionFeatures, register_vision_encoder
from mmtune.utils.cache import content_hash
from mmtune.utils.hub import NO_HUB_KERNELS

__all__ = ["HFVisionEncoder"]


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "vision_config", None) or config


def _preprocess_from_processor(processor: Any, image_size: int) -> ImagePreprocess:
    resample = getattr(processor, "resample", 2)
    interp = "bicubic" if int(getattr(resample, "value", resample)) == 3 else "bilinear"
    mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    if getattr(processor, "do_center_crop", False) and "shortest_edge" in size:
        side = crop.get("height", image_size) if isinstance(crop, dict) else image_size
        return ImagePreprocess(
            size=side, resize=size["shortest_edge"], mean=mean, std=std, interpolation=interp
        )
    return ImagePreprocess(size=image_size, resize=None, mean=mean, std=std, interpolation=interp)


class HFVisionEncoder(VisionEncoder):
    """Wrap a ``transformers`` vision model (already built) as a :class:`VisionEncoder`."""

    def __init__(
        self,
        model: nn.Module,
        layers: tuple[int, int, int] | None = None,
        preprocess: ImagePreprocess | None = None,
        name: str | None = None,
    ):
        super().__init__()
        config = _vision_config(model.config)
        for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            if getattr(config, field, None) is None:
                raise ValueError(
                    f"{type(model).__name__}: config has no {field!r}; not a ViT-style vision "
                    "model (CLIP, SigLIP, ViT, DINOv2 are supported)"
                )
        n = config.num_hidden_layers
        if layers is None:  # N/4, N/2, 3N/4: 6/12/18 on CLIP ViT-L's 24 layers (the paper's)
            layers = tuple(max(1, round(n * q)) for q in (0.25, 0.5, 0.75))
        layers = tuple(int(x) for x in layers)
        if len(layers) != 3 or any(not 1 <= x <= n for x in layers):
            raise ValueError(
                f"layers must be three 1-based layer numbers in 1..{n} for this model; got {layers}"
            )
        self.model = model
        self.layers = layers
        image_size = config.image_size
        self.grid = image_size // config.patch_size
        self.preprocess = preprocess or ImagePreprocess(
            size=image_size, resize=None, mean=(0.5,) * 3, std=(0.5,) * 3
        )
        if self.preprocess.size != image_size:
            raise ValueError(
                f"preprocess.size {self.preprocess.size} != the model's image_size {image_size}"
            )
        hidden = config.hidden_size
        self.level_channels = (hidden, hidden, hidden)
        self.d_global = (
            int(getattr(model.config, "projection_dim", 0) or hidden)
            if hasattr(model, "visual_projection")
            else hidden
        )
        commit = getattr(model.config, "_commit_hash", None)
        ident = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        weights = commit or content_hash(p for p in model.state_dict().values())[:16]
        self.cache_id = f"hf:{ident}:{weights}:layers={layers}"

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> HFVisionEncoder:
        """Load by directory or hub id; a full CLIP/SigLIP checkpoint gives its vision tower."""
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{name_or_path!r} is not a vision model directory or reachable hub id, nor a "
                f"registered encoder name ({e})"
            ) from e
        if config.model_type == "clip":
            from transformers import CLIPVisionModelWithProjection

            # A full CLIP checkpoint keeps projection_dim at the top level; without copying it
            # into the vision config the projection would be re-initialised at the default 512.
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            model = CLIPVisionModelWithProjection.from_pretrained(
                name_or_path, config=vision_config, **NO_HUB_KERNELS
            )
        elif config.model_type == "siglip":
            from transformers import SiglipVisionModel

            model = SiglipVisionModel.from_pretrained(name_or_path, **NO_HUB_KERNELS)
        else:
            model = AutoModel.from_pretrained(name_or_path, **NO_HUB_KERNELS)
        preprocess = kwargs.pop("preprocess", None)
        if preprocess is None:
            try:
                from transformers import AutoImageProcessor

                processor = AutoImageProcessor.from_pretrained(name_or_path)
                preprocess = _preprocess_from_processor(
                    processor, _vision_config(model.config).image_size
                )
            except (OSError, ValueError):
                preprocess = None
        return cls(model, preprocess=preprocess, name=name_or_path, **kwargs)

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        self.check_pixels(pixel_values)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        pooled = getattr(out, "image_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        levels = []
        for layer in self.layers:
            h = out.hidden_states[layer]  # (B, prefix + grid*grid, C); index 0 = embeddings
            b, t, c = h.shape
            prefix = t - self.grid * self.grid
            if prefix < 0:
                raise ValueError(f"layer {layer} has {t} tokens, fewer than the {self.grid}^2 grid")
            patches = h[:, prefix:].reshape(b, self.grid, self.grid, c)  # (B, g, g, C)
            levels.append(patches.permute(0, 3, 1, 2).contiguous())  # (B, C, g, g)
        return VisionFeatures(pooled=pooled, levels=levels)


def _build_hf(source: str | nn.Module, **kwargs: Any) -> HFVisionEncoder:
    """Any HF vision model: a loaded module, or a directory / hub id for ``from_pretrained``."""
    if isinstance(source, nn.Module):
        return HFVisionEncoder(source, **kwargs)
    return HFVisionEncoder.from_pretrained(source, **kwargs)


register_vision_encoder("hf", _build_hf)
