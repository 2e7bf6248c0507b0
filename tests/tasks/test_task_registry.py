"""The Task registry: the three tasks are registered, answer the registry's questions, score rows
with the pinned metrics, and a new task plugs in through register_task alone."""

import numpy as np
import pytest
import torch

from mmtune.metrics import classification_metrics, segmentation_metrics
from mmtune.tasks import LOWER_IS_BETTER, Task, get_task, lower_is_better, register_task, tasks


def test_the_three_tasks_are_registered_with_their_headlines():
    assert {"classification", "segmentation", "sentiment"} <= set(tasks())
    assert get_task("classification").headline == "accuracy"
    assert get_task("segmentation").headline == "oIoU"
    assert get_task("sentiment").headline == "mae"
    assert get_task("sentiment").lower_is_better and not get_task("segmentation").lower_is_better
    assert lower_is_better("rmse") and not lower_is_better("accuracy")
    assert {"mae", "rmse"} == LOWER_IS_BETTER


def test_unknown_task_is_one_error_naming_the_known_ones():
    with pytest.raises(KeyError, match="task 'retrieval': not one of classification"):
        get_task("retrieval")


def test_fields_and_modalities_per_task():
    seg, cls, sent = get_task("segmentation"), get_task("classification"), get_task("sentiment")
    assert seg.text_field == "expression" and cls.text_field == sent.text_field == "text"
    assert seg.reads_image and cls.reads_image and not sent.reads_image
    assert seg.needs_feature_maps and not cls.needs_feature_maps
    assert seg.keeps_predictions and not cls.keeps_predictions


def test_classification_rows_and_metrics_match_the_pinned_function():
    task = get_task("classification")
    out = {"prediction": torch.tensor([1, 0, 2])}
    batch = {"label": torch.tensor([1, 1, 2])}
    rows = [task.row(out, batch, r, keep=False) for r in range(3)]
    assert rows == [{"pred": 1, "label": 1}, {"pred": 0, "label": 1}, {"pred": 2, "label": 2}]
    assert task.metrics(rows) == classification_metrics([1, 0, 2], [1, 1, 2])


def test_segmentation_rows_score_at_the_original_size_and_keep_masks_on_request():
    task = get_task("segmentation")
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # the top-left quarter
    truth = np.zeros((8, 8), bool)
    truth[:4, :] = True  # the top half, at twice the logits' size
    batch = {"original_masks": [truth]}
    row = task.row({"logits": logits}, batch, 0, keep=True)
    assert (row["intersection"], row["union"]) == (16, 32)
    assert row["mask"].shape == (8, 8) and row["mask"][:4, :4].all()
    assert "mask" not in task.row({"logits": logits}, batch, 0, keep=False)
    assert task.metrics([row]) == segmentation_metrics([16], [32])


def test_a_new_task_plugs_in_through_register_task():
    class Count(Task):
        name, headline, metric_names = "count-test", "exact", ("exact",)

        def row(self, output, batch, r, keep):
            return {"ok": int(output["prediction"][r]) == int(batch["label"][r])}

        def metrics(self, rows):
            return {"metrics": {"exact": float(np.mean([r["ok"] for r in rows]))}}

    register_task(Count())
    task = get_task("count-test")
    rows = [task.row({"prediction": [3, 4]}, {"label": [3, 5]}, r, False) for r in range(2)]
    assert task.metrics(rows)["metrics"]["exact"] == 0.5 and not task.lower_is_better

    class Broken(Task):
        name = "broken-test"

    with pytest.raises(TypeError, match="needs the class attribute 'headline'"):
        register_task(Broken())
