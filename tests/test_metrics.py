"""Metrics: golden values from MMSA's conventions and the referring-segmentation convention."""

from __future__ import annotations

import numpy as np
import pytest

from mmtune.metrics import (
    classification_metrics,
    mask_intersection_union,
    segmentation_metrics,
    sentiment_metrics,
)

TRUTH = [-3, -2.6, -1.5, -0.5, 0, 0, 0.4, 0.5, 1.5, 2.5, 3, -0.2]
PRED = [-2.2, -3.4, -1.4, 0.1, 0, -0.3, 0.6, 0.49, 2.5, 1.6, 3.8, -0.6]


def test_sentiment_golden_values_mmsa_conventions():
    result = sentiment_metrics(PRED, TRUTH)
    m = result["metrics"]
    assert m["acc2_has0"] == pytest.approx(0.8333, abs=1e-4)
    assert m["f1_has0"] == pytest.approx(0.8333, abs=1e-4)
    assert m["acc2_non0"] == pytest.approx(0.9, abs=1e-4)
    assert m["f1_non0"] == pytest.approx(0.899, abs=1e-3)
    assert m["acc5"] == pytest.approx(0.75, abs=1e-4)
    assert m["acc7"] == pytest.approx(0.6667, abs=1e-4)
    assert m["mae"] == pytest.approx(0.4925, abs=1e-4)
    assert m["corr"] == pytest.approx(0.9486, abs=1e-4)
    assert "halves to even" in result["conventions"]["acc7"]


def test_rounding_is_half_to_even_and_clipping_applies():
    # 2.5 rounds to 2 and 3.5 (clipped to 3) to 3: numpy's convention, not "half up"
    m = sentiment_metrics([2.5, 3.9], [2.0, 3.0])["metrics"]
    assert m["acc7"] == 1.0
    assert sentiment_metrics([0.5], [1.0])["metrics"]["acc7"] == 0.0  # 0.5 -> 0


def test_segmentation_golden_values():
    result = segmentation_metrics([5, 3, 0], [16, 16, 0])
    m = result["metrics"]
    assert m["oIoU"] == pytest.approx(0.25)
    assert m["mIoU"] == pytest.approx(0.1667, abs=1e-4)
    m = segmentation_metrics([9, 7, 5], [10, 10, 10])["metrics"]
    assert (m["prec@0.5"], m["prec@0.7"], m["prec@0.8"], m["prec@0.9"]) == (
        1.0,
        2 / 3,
        1 / 3,
        1 / 3,
    )
    assert "original image size" in result["conventions"]["scored_at"]


def test_mask_counts_need_the_original_size():
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[:2], b[1:3] = True, True
    assert mask_intersection_union(a, b) == (5, 15)
    with pytest.raises(ValueError, match="score at the original image size"):
        mask_intersection_union(a, np.zeros((5, 4), bool))


def test_classification_against_sklearn_definitions():
    m = classification_metrics([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1])["metrics"]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 = 1, c1 = 0.5, c2 = 2/3; supports 1, 2, 3
    assert m["f1_macro"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx((1 * 1 + 0.5 * 2 + 2 / 3 * 3) / 6)
    with pytest.raises(ValueError, match="as many predictions as labels"):
        classification_metrics([0, 1], [0])


def test_bad_metric_inputs():
    with pytest.raises(ValueError, match="empty"):
        sentiment_metrics([], [])
    with pytest.raises(ValueError, match="NaN"):
        sentiment_metrics([float("nan")], [0.0])
    with pytest.raises(ValueError, match=r"intersection must be in \[0, union\]"):
        segmentation_metrics([5], [4])
