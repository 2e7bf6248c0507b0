"""Metrics with pinned conventions. Every result dict carries its conventions in words.

Published numbers in this field disagree mostly through metric conventions, so each function
returns ``{"metrics": {...}, "conventions": {...}}`` and the conventions travel with every
results file.

- referring segmentation (LAVT / CRIS / ReLA convention): masks scored at the original image
  size; ``oIoU = sum_i I_i / sum_i U_i`` over the split; ``mIoU = mean_i I_i / U_i`` with an
  empty union counting 0; ``prec@t = mean_i [IoU_i >= t]`` for t in 0.5 .. 0.9.
- classification: accuracy, macro-F1 and weighted-F1 (scikit-learn).
- sentiment regression (MMSA, ``metricsTop.py``): MAE and Pearson correlation on the raw
  predictions; Acc-2 / F1 "has0": ``>= 0`` against ``< 0`` over all samples; "non0": samples with
  truth exactly 0 dropped, ``> 0`` against ``<= 0``; F1 weighted; Acc-7 / Acc-5: clip truth and
  prediction to +-3 / +-2, then ``numpy.round`` (halves to even) and compare.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

__all__ = [
    "CLASSIFICATION_CONVENTIONS",
    "RELIANCE_CONVENTIONS",
    "SEGMENTATION_CONVENTIONS",
    "SENTIMENT_CONVENTIONS",
    "classification_metrics",
    "derangement",
    "mask_intersection_union",
    "paired_bootstrap_se",
    "segmentation_metrics",
    "sentiment_metrics",
]

SEGMENTATION_CONVENTIONS = {
    "scored_at": "original image size",
    "oIoU": "sum of intersections / sum of unions over the split",
    "mIoU": "mean of per-sample IoU; a sample with an empty union counts 0",
    "prec@t": "share of samples with IoU >= t, t in {0.5, 0.6, 0.7, 0.8, 0.9}",
    "ground_truth": "COCO polygons rasterised with pycocotools, several polygons merged as a union",
}
CLASSIFICATION_CONVENTIONS = {
    "accuracy": "sklearn.metrics.accuracy_score",
    "f1_macro": "sklearn.metrics.f1_score(average='macro')",
    "f1_weighted": "sklearn.metrics.f1_score(average='weighted')",
}
SENTIMENT_CONVENTIONS = {
    "source": "MMSA metricsTop.py (MOSI/MOSEI regression)",
    "mae": "mean |prediction - truth| on raw, unclipped values",
    "corr": "Pearson correlation on raw values (numpy.corrcoef)",
    "acc2_has0": "(pred >= 0) == (truth >= 0) over all samples; f1_has0 weighted F1 of the same",
    "acc2_non0": "samples with truth == 0 dropped; (pred > 0) == (truth > 0); f1_non0 weighted",
    "acc7": "clip both to [-3, 3], numpy.round (halves to even), exact match",
    "acc5": "clip both to [-2, 2], numpy.round (halves to even), exact match",
}
RELIANCE_CONVENTIONS = {
    "deranged": "the headline metric with each sample's modality (MiT's vector I and any image "
    "vector the head reads, the concatenated tokens, the frames, or the image a LLaVA-style "
    "model answers about) taken from another sample "
    "of the split; the donor is fixed by a seeded derangement (Sattolo's algorithm, seed 0), "
    "never the sample itself and, where the data says, never a sample of the same image",
    "drop": "headline - deranged (deranged - headline where lower is better): how much the "
    "model relies on the modality; ~0 means it does not use it",
}
RELIANCE_NOISE = (
    "the standard error of the drop by a paired bootstrap over the split's samples (each "
    "resample scores the same samples with their own and with their donors' modality; 200 "
    "resamples, seed 0); the modality counts as unused when drop <= 2 x that error"
)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def paired_bootstrap_se(
    score: Callable[[Sequence[Any]], float],
    rows: Sequence[Any],
    other: Sequence[Any],
    *,
    resamples: int = 200,
    seed: int = 0,
) -> float:
    """Standard error of ``score(rows) - score(other)`` by a paired bootstrap over samples.

    ``rows[i]`` and ``other[i]`` are the same sample scored two ways (its own modality, and a
    donor's); every resample draws sample indices with replacement and scores both on them,
    so the error of a split-level metric (oIoU: summed intersections over summed unions)
    comes out as well as that of a mean."""
    if len(rows) != len(other) or len(rows) < 2:
        raise ValueError(
            f"paired bootstrap needs two equally long score lists of >= 2 samples; got "
            f"{len(rows)} and {len(other)}"
        )
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, len(rows), size=len(rows))
        diffs.append(score([rows[i] for i in idx]) - score([other[i] for i in idx]))
    return float(np.std(diffs, ddof=1))


def derangement(n: int, seed: int = 0, groups: Sequence[Any] | None = None) -> list[int]:
    """donor[i] != i for every i: a seeded, uniformly random cyclic permutation (Sattolo).

    With ``groups`` (e.g. image ids), donors of the same group as their sample are exchanged
    with other samples' donors until none is left where that is possible.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 samples, got {n}")
    rng = np.random.default_rng(seed)
    donor = list(range(n))
    for i in range(n - 1, 0, -1):  # Sattolo: j < i, so the result is one n-cycle
        j = int(rng.integers(0, i))
        donor[i], donor[j] = donor[j], donor[i]
    if groups is not None:
        g = list(groups)
        for i in range(n):
            if g[donor[i]] != g[i]:
                continue
            for j in rng.permutation(n).tolist():  # swap donors with a j that stays valid
                if g[donor[j]] != g[i] and g[donor[i]] != g[j] and donor[i] != j and donor[j] != i:
                    donor[i], donor[j] = donor[j], donor[i]
                    break
    return donor


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty: no samples to score")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def mask_intersection_union(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """Pixel counts (I, U) of two boolean masks of the same (original image) shape."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(
            f"prediction mask {pred.shape} and ground truth {truth.shape} differ: score at the "
            "original image size"
        )
    return int(np.logical_and(pred, truth).sum()), int(np.logical_or(pred, truth).sum())


def segmentation_metrics(intersections: Sequence[float], unions: Sequence[float]) -> dict[str, Any]:
    """oIoU, mIoU and prec@0.5..0.9 from per-sample intersection and union pixel counts."""
    inter, union = _as_1d(intersections, "intersections"), _as_1d(unions, "unions")
    if inter.shape != union.shape:
        raise ValueError(f"{inter.size} intersections but {union.size} unions")
    if (inter < 0).any() or (inter > union).any():
        raise ValueError("each intersection must be in [0, union]")
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    total_union = union.sum()
    metrics = {
        "oIoU": float(inter.sum() / total_union) if total_union > 0 else 0.0,
        "mIoU": float(iou.mean()),
        **{f"prec@{t}": float((iou >= t).mean()) for t in THRESHOLDS},
        "num_samples": int(inter.size),
    }
    return {"metrics": metrics, "conventions": SEGMENTATION_CONVENTIONS}


def classification_metrics(predictions: Sequence[int], truth: Sequence[int]) -> dict[str, Any]:
    """Accuracy, macro-F1 and weighted-F1 of class indices."""
    pred = np.asarray(predictions).ravel()
    true = np.asarray(truth).ravel()
    if pred.size == 0 or pred.shape != true.shape:
        raise ValueError(f"need as many predictions as labels; got {pred.size} and {true.size}")
    metrics = {
        "accuracy": float(accuracy_score(true, pred)),
        "f1_macro": float(f1_score(true, pred, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(true, pred, average="weighted", zero_division=0)),
        "num_samples": int(pred.size),
    }
    return {"metrics": metrics, "conventions": CLASSIFICATION_CONVENTIONS}


def sentiment_metrics(predictions: Sequence[float], truth: Sequence[float]) -> dict[str, Any]:
    """MMSA's MOSI/MOSEI regression metrics (see module docstring for the conventions)."""
    pred, true = _as_1d(predictions, "predictions"), _as_1d(truth, "truth")
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions but {true.size} labels")
    corr = float(np.corrcoef(pred, true)[0, 1]) if pred.size > 1 else float("nan")
    non0 = true != 0
    has0_true, has0_pred = true >= 0, pred >= 0

    def acc_k(bound: float) -> float:
        return float(
            (
                np.round(np.clip(pred, -bound, bound)) == np.round(np.clip(true, -bound, bound))
            ).mean()
        )

    if non0.any():
        non0_true, non0_pred = true[non0] > 0, pred[non0] > 0
        acc2_non0 = float(accuracy_score(non0_true, non0_pred))
        f1_non0 = float(f1_score(non0_true, non0_pred, average="weighted", zero_division=0))
    else:  # every truth is exactly 0: the non0 convention has nothing to score
        acc2_non0 = f1_non0 = float("nan")
    metrics = {
        "mae": float(np.abs(pred - true).mean()),
        "corr": corr,
        "acc2_has0": float(accuracy_score(has0_true, has0_pred)),
        "f1_has0": float(f1_score(has0_true, has0_pred, average="weighted", zero_division=0)),
        "acc2_non0": acc2_non0,
        "f1_non0": f1_non0,
        "acc7": acc_k(3.0),
        "acc5": acc_k(2.0),
        "num_samples": int(pred.size),
    }
    return {"metrics": metrics, "conventions": SENTIMENT_CONVENTIONS}
