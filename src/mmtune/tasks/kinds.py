"""The three registered tasks: classification, referring segmentation, sentiment regression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from mmtune.metrics import (
    classification_metrics,
    mask_intersection_union,
    segmentation_metrics,
    sentiment_metrics,
)
from mmtune.reporting.plots import mask_picture, scatter_picture
from mmtune.tasks.base import Task, register_task
from mmtune.utils.io import atomic_write

__all__ = ["ClassificationTask", "SegmentationTask", "SentimentTask"]


class ClassificationTask(Task):
    """Image-text classification (UPMC-Food101, SNLI-VE, digits-ve): one class per sample."""

    name = "classification"
    headline = "accuracy"
    metric_names = ("accuracy", "f1_macro", "f1_weighted")
    reads_image = True
    hub_tags = ("image-text-classification", "visual-entailment")
    pipeline_tag = "zero-shot-image-classification"

    def row(self, output, batch, r, keep):
        return {"pred": int(output["prediction"][r]), "label": int(batch["label"][r])}

    def metrics(self, rows):
        return classification_metrics([r["pred"] for r in rows], [r["label"] for r in rows])

    def answer(self, output, spec, image, out):
        probs = output["logits"].softmax(-1)[0]
        k = int(probs.argmax())
        return {"class": spec["label_names"][k], "index": k, "probability": float(probs[k])}


class SegmentationTask(Task):
    """Referring segmentation (RefCOCO family, shapes-ref): the mask of the named object."""

    name = "segmentation"
    headline = "oIoU"
    metric_names = ("oIoU", "mIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")
    text_field = "expression"
    reads_image = True
    needs_feature_maps = True
    keeps_predictions = True
    hub_tags = ("referring-segmentation", "image-segmentation")
    pipeline_tag = "image-segmentation"

    def row(self, output, batch, r, keep):
        truth = batch["original_masks"][r]
        logits = F.interpolate(
            output["logits"][r : r + 1].float(),
            size=truth.shape,
            mode="bilinear",
            align_corners=False,
        )
        pred = (logits[0, 0] > 0).cpu().numpy()  # sigmoid > 0.5, at the original size
        inter, union = mask_intersection_union(pred, truth)
        row: dict[str, Any] = {"intersection": inter, "union": union}
        if keep:
            row["mask"] = pred
        return row

    def metrics(self, rows):
        return segmentation_metrics([r["intersection"] for r in rows], [r["union"] for r in rows])

    def answer(self, output, spec, image, out):
        logits = F.interpolate(
            output["logits"], size=image.shape[:2], mode="bilinear", align_corners=False
        )[0, 0]
        mask = (logits > 0).numpy()
        out = Path(out or "prediction.png")
        overlay = image.astype(np.float32)
        overlay[mask] = 0.45 * overlay[mask] + 0.55 * np.array([255.0, 40.0, 40.0])
        from PIL import Image

        with atomic_write(out) as tmp:
            Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")
        return {"mask_pixels": int(mask.sum()), "overlay": str(out)}

    def pictures(self, out, rows, test, split):
        return {"masks": mask_picture(out / "masks.png", rows, split)}


class SentimentTask(Task):
    """Sentiment regression (CMU-MOSI / MOSEI, movie-sentiment): a score in [-3, 3]."""

    name = "sentiment"
    headline = "mae"
    metric_names = (
        "mae",
        "corr",
        "acc2_has0",
        "f1_has0",
        "acc2_non0",
        "f1_non0",
        "acc7",
        "acc5",
    )
    hub_tags = ("multimodal-sentiment-analysis", "regression")
    pipeline_tag = "text-classification"

    def row(self, output, batch, r, keep):
        return {"pred": float(output["prediction"][r]), "label": float(batch["label"][r])}

    def metrics(self, rows):
        return sentiment_metrics([r["pred"] for r in rows], [r["label"] for r in rows])

    def answer(self, output, spec, image, out):
        return {"score": float(output["prediction"][0])}

    def pictures(self, out, rows, test, split):
        return {"scatter": scatter_picture(out / "scatter.png", rows, test["metrics"]["mae"])}


for _task in (ClassificationTask(), SegmentationTask(), SentimentTask()):
    register_task(_task)
del _task
