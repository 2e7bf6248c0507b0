"""Task heads, losses and pooling."""

from mmtune.heads.losses import dice_loss, regression_loss, segmentation_loss
from mmtune.heads.pooling import (
    TaskToken,
    last_token_index,
    pool_last_token,
    position_ids_from_mask,
)
from mmtune.heads.prediction import ClassificationHead, RegressionHead
from mmtune.heads.segmentation import SegmentationDecoder, SegmentationDecoderConfig

__all__ = [
    "ClassificationHead",
    "RegressionHead",
    "SegmentationDecoder",
    "SegmentationDecoderConfig",
    "TaskToken",
    "dice_loss",
    "last_token_index",
    "pool_last_token",
    "position_ids_from_mask",
    "regression_loss",
    "segmentation_loss",
]
