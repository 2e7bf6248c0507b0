"""The three registered tasks: classification, referring segmentation, sentiment regression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmtune.heads import (
    ClassificationHead,
    RegressionHead,
    SegmentationDecoder,
    regression_loss,
    segmentation_loss,
)
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
    summary_metrics = ("accuracy", "f1_macro")
    reads_image = True
    prompt_name = "entailment"
    head_reads_pooled = True
    hub_tags = ("image-text-classification", "visual-entailment")
    pipeline_tag = "zero-shot-image-classification"

    def build_head(self, d_text, *, d_image, level_channels, num_classes, decoder):
        return ClassificationHead(d_image, d_text, num_classes)

    def outputs(self, head, batch, text, config):
        logits = head(batch["pooled"] if head.d_image else None, text)
        out = {"logits": logits, "prediction": logits.argmax(-1)}
        if "label" in batch:
            out["loss"] = F.cross_entropy(logits, batch["label"])
        return out

    def collate(self, items, batch, pixel_size):
        if "label" in items[0]:
            batch["label"] = torch.tensor([int(it["label"]) for it in items])

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
    summary_metrics = ("oIoU", "mIoU", "prec@0.5")
    text_field = "expression"
    prompt_name = "segmentation"
    reads_image = True
    needs_feature_maps = True
    keeps_predictions = True
    hub_tags = ("referring-segmentation", "image-segmentation")
    pipeline_tag = "image-segmentation"

    def build_head(self, d_text, *, d_image, level_channels, num_classes, decoder):
        if level_channels is None:
            raise ValueError("segmentation needs the encoder's level_channels")
        return SegmentationDecoder(level_channels, d_text, decoder)

    def outputs(self, head, batch, text, config):
        logits = head([batch[f"level{i}"] for i in range(3)], text, batch["pixel_size"])
        out = {"logits": logits}
        if "mask" in batch:
            out["loss"] = segmentation_loss(logits, batch["mask"], config.bce_weight)
        return out

    def collate(self, items, batch, pixel_size):
        batch["pixel_size"] = (pixel_size, pixel_size)
        if "mask" in items[0]:
            masks = [
                torch.as_tensor(np.asarray(it["mask"], dtype=np.float32))[None, None]
                for it in items
            ]
            batch["mask"] = torch.cat(
                [F.interpolate(m, size=(pixel_size, pixel_size), mode="nearest") for m in masks]
            )
            batch["original_masks"] = [np.asarray(it["mask"], bool) for it in items]

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
    summary_metrics = ("mae", "corr", "acc2_has0", "acc7")
    hub_tags = ("multimodal-sentiment-analysis", "regression")
    pipeline_tag = "text-classification"
    prompt_name = "sentiment"

    def build_head(self, d_text, *, d_image, level_channels, num_classes, decoder):
        return RegressionHead(d_text)

    def outputs(self, head, batch, text, config):
        pred = head(text)
        out = {"prediction": pred}
        if "label" in batch:
            out["loss"] = regression_loss(pred, batch["label"], config.regression_loss)
        return out

    def collate(self, items, batch, pixel_size):
        if "label" in items[0]:
            batch["label"] = torch.tensor([float(it["label"]) for it in items])
        for m in ("audio", "vision"):
            if m in items[0]:
                batch[m] = torch.as_tensor(
                    np.stack([np.asarray(it[m], np.float32) for it in items])
                )
                batch[f"{m}_length"] = torch.tensor([int(it[f"{m}_length"]) for it in items])

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
