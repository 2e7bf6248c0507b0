"""Encoders of the non-text modalities: frozen vision encoders and trainable sequence encoders."""

from mmtune.encoders.hf_vision import HFVisionEncoder
from mmtune.encoders.images import ImagePreprocess, to_rgb_array
from mmtune.encoders.mobilenet import MobileNetV2Encoder
from mmtune.encoders.sequence import (
    MultiModalSequenceEncoder,
    SequenceEncoder,
    SequenceEncoderConfig,
)
from mmtune.encoders.vision import (
    VisionEncoder,
    VisionFeatures,
    encode_images,
    load_vision_encoder,
    register_vision_encoder,
    vision_encoders,
)

__all__ = [
    "HFVisionEncoder",
    "ImagePreprocess",
    "MobileNetV2Encoder",
    "MultiModalSequenceEncoder",
    "SequenceEncoder",
    "SequenceEncoderConfig",
    "VisionEncoder",
    "VisionFeatures",
    "encode_images",
    "load_vision_encoder",
    "register_vision_encoder",
    "to_rgb_array",
    "vision_encoders",
]
