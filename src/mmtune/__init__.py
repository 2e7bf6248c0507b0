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
from mmtune.methods.base import AdapterModel
from mmtune.methods.concat import (
    ConcatConfig,
    PeftAdapterConfig,
    TokenProjector,
    image_tokens,
    inject_peft,
)
from mmtune.methods.mit import MiTConfig, MiTLayer, MiTModel, inject_mit, paper_layers
from mmtune.methods.mrt import (
    LoReFTEdit,
    MRTConfig,
    MRTControl,
    MRTForVLM,
    MRTModel,
    VLMSpec,
    inject_mrt,
    load_mrt,
    register_vlm_architecture,
)
from mmtune.methods.registry import MethodSpec, get_method, register_method
from mmtune.models.architectures import (
    ArchitectureSpec,
    register_architecture,
    supported_model_types,
)
from mmtune.models.llm import load_llm
from mmtune.models.lmm import LlavaStyleModel, LMMBatch, LMMConfig, build_lmm, load_lmm
from mmtune.tasks import Task, get_task, register_task
from mmtune.utils.adapter_file import ParameterCount, count_parameters
from mmtune.utils.cache import FeatureCache

__all__ = [
    "AdapterModel",
    "ArchitectureSpec",
    "ConcatConfig",
    "FeatureCache",
    "ImagePreprocess",
    "LMMBatch",
    "LMMConfig",
    "LlavaStyleModel",
    "LoReFTEdit",
    "MRTConfig",
    "MRTControl",
    "MRTForVLM",
    "MRTModel",
    "MethodSpec",
    "MiTConfig",
    "MiTLayer",
    "MiTModel",
    "MultiModalSequenceEncoder",
    "ParameterCount",
    "PeftAdapterConfig",
    "SequenceEncoder",
    "SequenceEncoderConfig",
    "Task",
    "TokenProjector",
    "VLMSpec",
    "VisionEncoder",
    "VisionFeatures",
    "__version__",
    "build_lmm",
    "count_parameters",
    "encode_images",
    "get_method",
    "get_task",
    "image_tokens",
    "inject_mit",
    "inject_mrt",
    "inject_peft",
    "load_llm",
    "load_lmm",
    "load_mrt",
    "load_vision_encoder",
    "paper_layers",
    "register_architecture",
    "register_method",
    "register_task",
    "register_vision_encoder",
    "register_vlm_architecture",
    "supported_model_types",
]
