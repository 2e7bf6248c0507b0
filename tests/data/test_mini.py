"""The embedded mini-benchmarks: deterministic, well-formed, and their labels are right."""

from __future__ import annotations

import numpy as np
import pytest

from mmtune.data.mini import _expressions, digits_ve, movie_sentiment, movie_snippets, shapes_ref


def test_shapes_ref_is_deterministic_and_expressions_pick_one_object():
    a, b = shapes_ref(num_samples=60, seed=3), shapes_ref(num_samples=60, seed=3)
    c = shapes_ref(num_samples=60, seed=4)
    assert a.sizes() == {"train": 36, "val": 9, "test": 15}
    for split in a.splits:
        for x, y in zip(a.splits[split].items, b.splits[split].items, strict=True):
            assert x["expression"] == y["expression"] and np.array_equal(x["image"], y["image"])
    assert [x["expression"] for x in a.splits["train"].items] != [
        x["expression"] for x in c.splits["train"].items
    ]
    for item in a.splits["train"].items:
        assert item["image"].shape == (112, 112, 3) and item["mask"].dtype == bool
        assert 20 < item["mask"].sum() < 112 * 112 / 4
        assert 2 <= item["num_objects"] <= 5


def test_expression_rules():
    objs = [
        {"shape": "circle", "colour": "red", "big": True, "cx": 10.0},
        {"shape": "circle", "colour": "red", "big": False, "cx": 50.0},
        {"shape": "square", "colour": "blue", "big": False, "cx": 30.0},
    ]
    assert _expressions(objs, 0) == ["the leftmost circle", "the larger red shape"]
    assert _expressions(objs, 1) == ["the rightmost circle", "the smaller red shape"]
    assert _expressions(objs, 2) == ["the blue square"]


def test_digits_ve_labels_follow_the_digit():
    data = digits_ve(seed=0)
    assert sum(data.sizes().values()) == 1797
    counts = np.bincount([x["label"] for x in data.splits["train"].items], minlength=3)
    assert counts.min() > 0.25 * counts.sum()  # balanced three ways
    for item in data.splits["train"].items:
        d, text, label = item["digit"], item["text"], item["label"]
        if label == 1:
            continue
        truth = label == 0
        words = text.rstrip(".").split()
        if "even" in words or "odd" in words:
            assert ((d % 2 == 0) == ("even" in words)) == truth
        elif "greater" in words:
            assert (d > int(words[-1])) == truth
        elif "less" in words:
            assert (d < int(words[-1])) == truth
        else:
            assert (int(words[-1]) == d) == truth
        assert (
            item["image"].shape == (8, 8) and 0 <= item["image"].min() <= item["image"].max() <= 1
        )


def test_movie_sentiment_uses_all_10605_rated_snippets():
    try:
        rows = movie_snippets()
    except FileNotFoundError as e:
        pytest.fail(f"the vaderSentiment sdist should be installed by `make`: {e}")
    assert len(rows) == 10605
    assert min(r for _, r in rows) >= -4 and max(r for _, r in rows) <= 4
    data = movie_sentiment(num_samples=400, seed=0)
    item = data.splits["test"][0]
    assert item["audio"].shape == (20, 5) and item["vision"].shape == (16, 20)
    assert 10 <= item["audio_length"] <= 20 and not item["audio"][item["audio_length"] :].any()
    labels = np.array([x["label"] for x in data.splits["train"].items])
    assert labels.min() >= -3 and labels.max() <= 3
    # the simulated frames carry a weak label signal (documented as simulated)
    means = np.array([x["audio"][: x["audio_length"]].mean(0) for x in data.splits["train"].items])
    corr = max(abs(np.corrcoef(means[:, k], labels)[0, 1]) for k in range(5))
    assert 0.1 < corr < 0.9
