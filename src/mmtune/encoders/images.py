"""Image decoding and preprocessing, without torchvision (it does not import beside CPU torch 2.13).

Accepted images: a file path, a ``PIL.Image``, or a numpy array ``(H, W)``, ``(H, W, 1)``,
``(H, W, 3)`` or ``(H, W, 4)`` of ``uint8`` (0..255) or floats in [0, 1].
Documented handling: grayscale is replicated to 3 channels; an alpha channel is dropped
(no compositing: transparent pixels keep their colour); palette images are converted to RGB.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageLike", "ImagePreprocess", "to_rgb_array"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]  # noqa: UP007 (runtime alias)


def to_rgb_array(image: ImageLike, *, where: str = "image") -> np.ndarray:
    """Decode ``image`` to a ``uint8`` array (H, W, 3); errors name the file or the shape."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb_array(im, where=str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{path}: cannot decode as an image ({e})") from e
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")  # L/I/F/1 -> replicated; RGBA/LA -> alpha dropped
        return np.array(image, dtype=np.uint8)  # a writable copy
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        elif arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        elif not (arr.ndim == 3 and arr.shape[-1] == 3):
            raise ValueError(
                f"{where}: array of shape {arr.shape} is not an image; expected (H, W), "
                "(H, W, 1), (H, W, 3) or (H, W, 4)"
            )
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
            arr = arr.astype(np.float64)
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ValueError(
                    f"{where}: float image values must be finite and in [0, 1]; got range "
                    f"[{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]"
                )
            return np.ascontiguousarray(np.round(arr * 255).astype(np.uint8))
        raise ValueError(f"{where}: unsupported image dtype {arr.dtype}; use uint8 or float")
    raise TypeError(f"{where}: cannot read an image from {type(image).__name__}")


@dataclass
class ImagePreprocess:
    """Resize, crop and normalise images into a (B, 3, size, size) float tensor."""

    size: int = 224
    """Side of the square network input."""
    resize: int | None = 256
    """Shorter side before a centre crop to ``size``; ``None`` squashes the whole image to
    size x size (no crop: every pixel stays visible, as segmentation needs)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after the mean."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Resampling filter (antialiased); CLIP's processor uses bicubic."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ImagePreprocess.size must be >= 1, got {self.size}")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(
                f"ImagePreprocess.resize ({self.resize}) must be >= size ({self.size}) or None"
            )
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(
                f"ImagePreprocess.interpolation must be 'bilinear' or 'bicubic', got "
                f"{self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("ImagePreprocess.mean/std need 3 values each, std > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def one(self, image: ImageLike, where: str = "image") -> torch.Tensor:
        """One image -> (3, size, size)."""
        arr = to_rgb_array(image, where=where)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        h, w = x.shape[-2:]
        if self.resize is None:
            nh = nw = self.size
        else:
            scale = self.resize / min(h, w)
            nh, nw = max(self.size, int(h * scale)), max(self.size, int(w * scale))  # as HF
        x = F.interpolate(
            x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False
        ).clamp(0.0, 1.0)  # bicubic overshoots
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]  # centre crop
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std)[0]

    def __call__(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> (B, 3, size, size)."""
        if isinstance(images, np.ndarray | Image.Image | str | os.PathLike):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        return torch.stack([self.one(im, where=f"image {i}") for i, im in enumerate(images)])
