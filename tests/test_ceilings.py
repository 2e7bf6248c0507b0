"""Ceilings: the trivial answers and probes, each saying what it sees."""

from __future__ import annotations

import pytest

from mmtune.ceilings import ceilings, digits_rule
from mmtune.data.mini import digits_ve, shapes_ref
from mmtune.pipeline import TaskConfig
from mmtune.train import ModelConfig, TrainConfig
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
