"""Ceilings: the trivial answers and probes, each saying what it sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmtune.data.mini import digits_ve, shapes_ref
from mmtune.recipes.ceilings import ceilings, decoder_probe, digits_rule
from mmtune.recipes.train import ModelConfig, TrainConfig
from mmtune.tasks.model import TaskConfig
from tiny_assets import tiny_llm_dir, tiny_vit_dir


def test_the_digits_rule_reads_every_generated_hypothesis_right():
    data = digits_ve(num_samples=600)
    for split in data.splits.values():
        for i in range(len(split)):
            item = split[i]
            assert digits_rule(item["text"], item["digit"]) == item["label"], item["text"]


def test_every_object_mask_contains_the_target():
    data = shapes_ref(num_samples=30)
    for i in range(len(data.splits["train"])):
        item = data.splits["train"][i]
        assert (item["objects_mask"] >= item["mask"]).all()
        assert item["objects_mask"].sum() > item["mask"].sum()  # two objects at least


@pytest.mark.parametrize("data", ["digits-ve", "shapes-ref", "movie-sentiment"])
def test_ceilings_of_each_task_say_what_they_see(tmp_path, data):
    cfg = TrainConfig(
        task=TaskConfig(data=data, data_options={"num_samples": 90}),
        model=ModelConfig(
            llm=str(tiny_llm_dir(tmp_path / "l")), vision=str(tiny_vit_dir(tmp_path / "v"))
        ),
        feature_cache=False,
    )
    result = ceilings(cfg, probe_epochs=2)
    names = {
        "digits-ve": {"majority", "text_probe", "image_probe", "joint_probe", "structured_probe"},
        "shapes-ref": {"every_object", "empty", "decoder_probe"},
        "movie-sentiment": {"constant", "text_probe", "frames_probe", "joint_probe"},
    }[data]
    assert set(result["ceilings"]) == names
    assert all(entry["sees"] for entry in result["ceilings"].values())
    if data == "shapes-ref":
        assert result["ceilings"]["empty"]["oIoU"] == 0.0
        assert 0 < result["ceilings"]["every_object"]["oIoU"] < 1


def test_more_hypotheses_per_image_add_training_pairs_only():
    one = digits_ve(num_samples=200)
    four = digits_ve(num_samples=200, hypotheses_per_image=4)
    assert len(four.splits["train"]) == 4 * len(one.splits["train"])
    for split in ("val", "test"):
        assert [it["id"] for it in four.splits[split].items] == [
            it["id"] for it in one.splits[split].items
        ]
    first = [it for it in four.splits["train"].items if "-h" not in it["id"]]
    assert [(it["id"], it["text"]) for it in first] == [
        (it["id"], it["text"]) for it in one.splits["train"].items
    ]
    for it in four.splits["train"].items:
        assert digits_rule(it["text"], it["digit"]) == it["label"]
    seen = {it["id"].split("-h")[0] for it in four.splits["train"].items}
    assert not seen & {it["id"] for it in four.splits["test"].items}


def test_more_expressions_per_image_add_training_pairs_only():
    one = shapes_ref(num_samples=60)
    four = shapes_ref(num_samples=60, expressions_per_image=4)
    base = one.splits["train"].items
    assert len(base) < len(four.splits["train"]) <= 4 * len(base)
    for split in ("val", "test"):
        a, b = one.splits[split].items, four.splits[split].items
        assert [(it["id"], it["expression"]) for it in a] == [
            (it["id"], it["expression"]) for it in b
        ]
    first = {it["id"]: it for it in four.splits["train"].items if "-e" not in it["id"]}
    assert [(it["id"], it["expression"]) for it in base] == [
        (k, it["expression"]) for k, it in first.items()
    ]
    for it in four.splits["train"].items:  # an extra pair: same scene, another target
        scene = first[it["image_id"]]
        assert (it["image"] == scene["image"]).all()
        assert (it["objects_mask"] >= it["mask"]).all() and it["mask"].any()
        if it is not scene:
            assert it["expression"] != scene["expression"]
    seen = {it["image_id"] for it in four.splits["train"].items}
    assert not seen & {it["image_id"] for it in four.splits["test"].items}
    with pytest.raises(ValueError, match="expressions_per_image"):
        shapes_ref(num_samples=10, expressions_per_image=0)


def test_the_decoder_probe_learns_a_mask_the_text_names_and_reports_a_curve():
    # Every scene has an object on the left and one on the right (channels 0 and 1 of the maps
    # show both); the text names one. Segmenting both would score an IoU of 0.5.
    torch.manual_seed(0)
    left, right = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    left[4:12, 1:7], right[4:12, 9:15] = True, True
    both = torch.stack(
        [torch.as_tensor(left, dtype=torch.float32), torch.as_tensor(right, dtype=torch.float32)]
    )
    items = []
    for i in range(48):
        side = ("left", "right")[i % 2]
        levels = {}
        for k in range(3):
            noise = 0.1 * torch.randn(4, 8 // 2**k, 8 // 2**k)
            noise[:2] += F.adaptive_avg_pool2d(both, 8 // 2**k)
            levels[f"level{k}"] = noise
        mask = left if side == "left" else right
        items.append({"id": str(i), "expression": side, "mask": mask, **levels})
    eye = torch.eye(2)
    curve = []
    scores = decoder_probe(
        items[:32],
        {"test": items[32:]},
        lambda expressions: eye[[("left", "right").index(e) for e in expressions]],
        d_text=2,
        pixel_size=16,
        epochs=12,
        on_epoch=lambda epoch, loss, s: curve.append((epoch, loss, s["test"]["oIoU"])),
    )
    assert [c[0] for c in curve] == list(range(1, 13))
    assert scores["test"]["oIoU"] == curve[-1][2]
    assert curve[-1][1] < curve[0][1]  # the loss falls
    assert scores["test"]["prec@0.5"] > 0.9  # the named half, not both
