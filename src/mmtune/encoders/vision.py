"""Frozen vision encoders behind one interface, and their feature cache.

Every encoder maps preprocessed pixels (B, 3, S, S) to :class:`VisionFeatures`: a global
vector (B, d_global) -- MiT's ``I`` -- and three feature maps of increasing stride for the
segmentation decoder (CNN: strides 8/16/32; ViT: the patch grid of three chosen layers).

Registry: :func:`register_vision_encoder` adds a named builder; :func:`load_vision_encoder`
takes a registered name (``mobilenet-v2``, the embedded default), a Hugging Face model
directory or hub id, or an already built ``transformers`` vision model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmtune.encoders.images import ImageLike, ImagePreprocess
from mmtune.utils.cache import FeatureCache, content_hash
from mmtune.utils.progress import Progress, tracked

__all__ = [
    "VisionEncoder",
    "VisionFeatures",
    "encode_images",
    "load_vision_encoder",
    "register_vision_encoder",
    "vision_encoders",
]


@dataclass
class VisionFeatures:
    """What a vision encoder returns."""

    pooled: torch.Tensor
    """(B, d_global): the global vector I."""
    levels: list[torch.Tensor]
    """Three maps (B, C_i, H_i, W_i), finest first."""


class VisionEncoder(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward``."""

    d_global: int
    level_channels: tuple[int, int, int]
    preprocess: ImagePreprocess
    cache_id: str  # identity of the weights, part of every feature-cache key

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:  # pragma: no cover
        raise NotImplementedError

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        s = self.preprocess.size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__}: pixel_values must be (B, 3, H, W); got "
                f"{tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-2:] != (s, s):
            raise ValueError(
                f"{type(self).__name__}: pixel_values must be {s}x{s} (its preprocess.size); "
                f"got {tuple(pixel_values.shape[-2:])}"
            )

    @torch.no_grad()
    def encode(self, images: Sequence[ImageLike]) -> VisionFeatures:
        """Decode, preprocess and encode images (no gradients; the encoder is frozen)."""
        p = next(self.parameters())
        pixels = self.preprocess(images).to(device=p.device, dtype=p.dtype)
        return self(pixels)


_BUILDERS: dict[str, Callable[..., VisionEncoder]] = {}


def register_vision_encoder(name: str, builder: Callable[..., VisionEncoder]) -> None:
    """Register a named vision-encoder builder (the one registration point).

    ``builder(**kwargs)`` returns the encoder. The name ``"hf"`` is special: its builder takes
    the source first (``builder(source, **kwargs)``, a path, a hub id or a loaded HF model) and
    serves every source that is not a registered name (:mod:`mmtune.encoders.hf_vision`
    registers it)."""
    _BUILDERS[name] = builder


def vision_encoders() -> list[str]:
    return sorted(_BUILDERS)


def load_vision_encoder(source: str | os.PathLike | nn.Module = "mobilenet-v2", **kwargs: Any):
    """A frozen, eval-mode vision encoder from a registered name, an HF path/id or HF model."""
    if not isinstance(source, nn.Module) and str(source) in _BUILDERS and str(source) != "hf":
        encoder = _BUILDERS[str(source)](**kwargs)
    elif "hf" in _BUILDERS:
        hf_source = source if isinstance(source, nn.Module) else str(source)
        encoder = _BUILDERS["hf"](hf_source, **kwargs)
    else:  # pragma: no cover - mmtune.encoders registers "hf" on import
        raise KeyError(f"vision encoder {source!r}: not one of {vision_encoders()}")
    encoder.requires_grad_(False)
    return encoder.eval()


def _input_fingerprint(images: Sequence[ImageLike]) -> str:
    """Hash of the inputs' contents: file bytes for paths, pixel bytes for arrays."""
    parts: list[Any] = []
    for im in images:
        if isinstance(im, str | os.PathLike):
            parts.append(Path(im).read_bytes())
        else:
            parts.append(np.asarray(im))
    return content_hash(parts)


def _distinct(images: Sequence[ImageLike]) -> tuple[list[ImageLike], list[int]]:
    """(the distinct images in first-seen order, each input's index among them).

    A path is known by its resolved name, pixels (arrays, PIL images) by their bytes: the
    several hypotheses or expressions of one image share one encoder pass."""
    seen: dict[tuple[str, str], int] = {}
    distinct: list[ImageLike] = []
    index: list[int] = []
    for im in images:
        if isinstance(im, str | os.PathLike):
            key = ("path", os.path.realpath(os.fspath(im)))
        else:
            key = ("pixels", content_hash([np.asarray(im)]))
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(im)
        index.append(seen[key])
    return distinct, index


def encode_images(
    encoder: VisionEncoder,
    images: Sequence[ImageLike],
    *,
    batch_size: int = 32,
    levels: bool = True,
    cache: FeatureCache | None = None,
    name: str = "images",
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Features of a whole image set: ``pooled`` (N, d) and, with ``levels``, ``level{0,1,2}``.

    Each distinct image is encoded once (the same path, or the same pixels, repeated across
    items: several hypotheses per SNLI-VE image, several expressions per RefCOCO scene) and
    its rows are repeated for every item that shows it. With a cache, the features are computed
    once and reused while the encoder weights, the preprocessing and the image contents stay
    the same. ``progress`` hears ``encode {name}`` per batch of distinct images actually
    encoded (a cache hit reports nothing).
    """

    def compute() -> dict[str, torch.Tensor]:
        distinct, index = _distinct(images)
        chunks: list[VisionFeatures] = []
        starts = range(0, len(distinct), batch_size)
        for start in tracked(starts, progress, f"encode {name}", len(starts)):
            chunks.append(encoder.encode(distinct[start : start + batch_size]))
        out = {"pooled": torch.cat([c.pooled for c in chunks]).float().cpu()}
        if levels:
            for i in range(3):
                out[f"level{i}"] = torch.cat([c.levels[i] for c in chunks]).float().cpu()
        if len(distinct) < len(images):
            rows = torch.tensor(index)  # (N,): each item's row among the distinct images
            out = {k: v[rows] for k, v in out.items()}
        return out

    if len(images) == 0:
        raise ValueError(f"{name}: no images to encode")
    if cache is None:
        return compute()
    key = {
        "encoder": encoder.cache_id,
        "preprocess": encoder.preprocess.to_dict(),
        "inputs": _input_fingerprint(images),
        "count": len(images),
        "levels": levels,
    }
    return cache.get_or_compute(name, key, compute)
