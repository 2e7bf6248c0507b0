"""mmtune: parameter-efficient multimodal tuning of frozen Hugging Face language models."""

from mmtune._version import __version__
from mmtune.methods.base import ParameterCount, count_parameters
from mmtune.methods.mit import MiTConfig, MiTLayer, MiTModel, inject_mit, paper_layers
from mmtune.models.architectures import (
    ArchitectureSpec,
    register_architecture,
    supported_model_types,
)

__all__ = [
    "ArchitectureSpec",
    "MiTConfig",
    "MiTLayer",
    "MiTModel",
    "ParameterCount",
    "__version__",
    "count_parameters",
    "inject_mit",
    "paper_layers",
    "register_architecture",
    "supported_model_types",
]
