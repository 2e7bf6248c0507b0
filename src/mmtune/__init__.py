"""mmtune: parameter-efficient multimodal tuning of frozen Hugging Face language models."""

from mmtune._version import __version__
from mmtune.encoders import (
    ImagePreprocess,
    MultiModalSequenceEncoder,
    SequenceEncoder,
    SequenceEncoderConfig,
    VisionEncoder,
    VisionFeatures,
    encode_images,
    load_vision_encoder,
    register_vision_encoder,
)
from mmtune.methods.base import ParameterCount, count_parameters
from mmtune.methods.concat import (
    ConcatConfig,
    PeftAdapterConfig,
    TokenProjector,
    image_tokens,
    inject_peft,
)
from mmtune.methods.mit import MiTConfig, MiTLayer, MiTModel, inject_mit, paper_layers
from mmtune.models.architectures import (
    ArchitectureSpec,
    register_architecture,
    supported_model_types,
)
from mmtune.models.cache import FeatureCache
from mmtune.models.llm import load_llm

__all__ = [
    "ArchitectureSpec",
    "ConcatConfig",
    "FeatureCache",
    "ImagePreprocess",
    "MiTConfig",
    "MiTLayer",
    "MiTModel",
    "MultiModalSequenceEncoder",
    "ParameterCount",
    "PeftAdapterConfig",
    "SequenceEncoder",
    "SequenceEncoderConfig",
    "TokenProjector",
    "VisionEncoder",
    "VisionFeatures",
    "__version__",
    "count_parameters",
    "encode_images",
    "image_tokens",
    "inject_mit",
    "inject_peft",
    "load_llm",
    "load_vision_encoder",
    "paper_layers",
    "register_architecture",
    "register_vision_encoder",
    "supported_model_types",
]
