"""Loaders on files in the benchmarks' real formats (shared fixtures, or written here)."""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtune.data import (
    SNLI_VE_LABELS,
    annotation_mask,
    detect_format,
    load_dataset,
    load_food101,
    load_mmsa,
    load_refcoco,
    load_snli_ve,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"shared fixture {path} not found (the repo's ../shared/fixtures)")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- RefCOCO


def _refs(tmp_path: Path, instances: Path) -> Path:
    """A REFER refs pickle in the real schema over the fixture's three annotations."""
    folder = tmp_path / "refcoco"
    folder.mkdir()
    (folder / "instances.json").write_bytes(instances.read_bytes())
    refs = [
        {
            "ref_id": 1,
            "ann_id": 3007,
            "image_id": 98304,
            "split": "train",
            "category_id": 18,
            "file_name": "COCO_train2014_000000098304_3007.jpg",
            "sent_ids": [10, 11],
            "sentences": [
                {
                    "sent_id": 10,
                    "sent": "the small dog",
                    "raw": "The small dog.",
                    "tokens": ["the", "small", "dog"],
                },
                {
                    "sent_id": 11,
                    "sent": "dog on the left",
                    "raw": "Dog on the left",
                    "tokens": ["dog", "on", "the", "left"],
                },
            ],
        },
        {
            "ref_id": 2,
            "ann_id": 99893,
            "image_id": 98304,
            "split": "testA",
            "category_id": 63,
            "file_name": "COCO_train2014_000000098304_99893.jpg",
            "sent_ids": [12],
            "sentences": [{"sent_id": 12, "sent": "couch", "raw": "couch", "tokens": ["couch"]}],
        },
        {
            "ref_id": 3,
            "ann_id": 108703,
            "image_id": 98304,
            "split": "val",
            "category_id": 62,
            "file_name": "COCO_train2014_000000098304_108703.jpg",
            "sent_ids": [13],
            "sentences": [{"sent_id": 13, "sent": "chair", "raw": "chair", "tokens": ["chair"]}],
        },
    ]
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    images = tmp_path / "images" / "train2014"
    images.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (424, 640, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "COCO_train2014_000000098304.jpg")
    return folder / "refs(unc).p"


def test_refcoco_on_the_shared_coco_fixture(tmp_path):
    instances = _fixture("coco_instances_sample.json")
    before = _sha(instances)
    refs = _refs(tmp_path, instances)
    data = load_refcoco(refs)
    assert data.task == "segmentation" and data.sizes() == {"train": 2, "val": 1, "testA": 1}
    counts = {}
    for split in data.splits.values():
        for i in range(len(split)):
            item = split[i]
            assert item["image"].shape == (424, 640, 3) and item["mask"].shape == (424, 640)
            counts[item["ann_id"]] = int(item["mask"].sum())
    assert counts == {3007: 196, 99893: 27155, 108703: 11094}  # fixtures/README.md
    assert [data.splits["train"][i]["expression"] for i in range(2)] == [
        "the small dog",
        "dog on the left",
    ]
    one = load_refcoco(refs, one_sentence_per_ref=True, seed=0)
    assert one.sizes()["train"] == 1
    assert _sha(instances) == before  # never modified
    assert detect_format(refs.parent) == ("refcoco", refs)


def test_several_polygons_merge_as_a_union_not_a_sum():
    square = [0, 0, 10, 0, 10, 10, 0, 10]
    shifted = [5, 0, 15, 0, 15, 10, 5, 10]  # overlaps the first by 5 x 10
    one = annotation_mask([square], 20, 20).sum()
    both = annotation_mask([square, shifted], 20, 20)
    assert both.dtype == bool and both.max() == 1
    assert one < both.sum() < 2 * one  # union: the overlap counts once
    rle = {"size": [20, 20], "counts": [0, 400]}  # uncompressed RLE, all ones
    assert annotation_mask(rle, 20, 20).sum() == 400


def test_refcoco_schema_errors_name_file_record_and_field(tmp_path):
    instances = _fixture("coco_instances_sample.json")
    refs = _refs(tmp_path, instances)
    records = pickle.loads(refs.read_bytes())
    records[1]["ann_id"] = 424242
    refs.write_bytes(pickle.dumps(records))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p, ref #1: ann_id 424242 is not in"):
        load_refcoco(refs)
    del records[1]["sentences"]
    refs.write_bytes(pickle.dumps(records))
    with pytest.raises(ValueError, match=r"ref #1: missing field\(s\) \['sentences'\]"):
        load_refcoco(refs)
    with pytest.raises(FileNotFoundError, match="COCO instances"):
        load_refcoco(refs, instances=tmp_path / "nope.json")


def test_pickles_that_name_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(ValueError, match=r"refers to builtins\.print.*refusing"):
        load_refcoco(path, instances=_fixture("coco_instances_sample.json"))


# ----------------------------------------------------------------------------- SNLI-VE


def test_snli_ve_fixture_drops_the_unlabelled_row():
    path = _fixture("xvnli_en_train_5.jsonl")
    data = load_snli_ve(path)
    train = data.splits["train"]
    assert len(train) == 17  # 18 rows, one with gold_label "-"
    assert data.label_names == SNLI_VE_LABELS
    first = train.metadata(0)
    assert first["text"] == "The man and woman are sitting." and first["label"] == 0
    assert first["image_path"].name == "4868221344.jpg"
    assert detect_format(path)[0] == "snli-ve"


def test_snli_ve_other_id_field_and_jpg_suffix(tmp_path):
    rows = [
        {"gold_label": "contradiction", "sentence2": "A cat.", "Flickr30K_ID": "77.jpg"},
        {"gold_label": "-", "sentence2": "?", "Flickr30K_ID": "78"},
    ]
    (tmp_path / "snli_ve_dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    images = tmp_path / "Flickr30K" / "flickr30k_images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(images / "77.jpg")
    data = load_snli_ve(tmp_path)
    item = data.splits["dev"][0]
    assert item["label"] == 2 and item["image"].shape == (6, 8, 3)
    (tmp_path / "snli_ve_dev.jsonl").write_text(
        json.dumps({"gold_label": "maybe", "sentence2": "x", "Flikr30kID": 1})
    )
    with pytest.raises(ValueError, match=r"snli_ve_dev\.jsonl, line 1: gold_label 'maybe'"):
        load_snli_ve(tmp_path)
    (tmp_path / "snli_ve_dev.jsonl").write_text(
        json.dumps({"gold_label": "neutral", "sentence2": "x"})
    )
    with pytest.raises(ValueError, match=r"line 1: missing field 'Flikr30kID'"):
        load_snli_ve(tmp_path)


# ----------------------------------------------------------------------------- Food101


def _food_csv(root: Path, n_per_class: int = 10) -> None:
    (root / "texts").mkdir(parents=True)
    for split in ("train", "test"):
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            w = csv.writer(f)
            for cls in ("apple_pie", "sushi", "waffles"):
                d = root / "images" / split / cls
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n_per_class if split == "train" else 2):
                    name = f"{cls}_{i}.jpg"
                    Image.new("RGB", (5, 4), (i, 0, 0)).save(d / name)
                    w.writerow([name, f"best {cls.replace('_', ' ')} recipe, {i}", cls])


def test_food101_csv_layout_with_a_seeded_validation_split(tmp_path):
    _food_csv(tmp_path)
    a = load_food101(tmp_path, val_fraction=0.2, seed=3)
    b = load_food101(tmp_path, val_fraction=0.2, seed=3)
    c = load_food101(tmp_path, val_fraction=0.2, seed=4)
    assert a.sizes() == {"train": 24, "dev": 6, "test": 6}
    ids = lambda d, s: [r["id"] for r in d.splits[s].records]  # noqa: E731
    assert ids(a, "dev") == ids(b, "dev") != ids(c, "dev")
    assert not set(ids(a, "dev")) & set(ids(a, "train"))
    assert a.label_names == ["apple_pie", "sushi", "waffles"]
    item = a.splits["test"][3]
    assert item["label"] == 1 and item["image"].shape == (4, 5, 3) and "sushi" in item["text"]
    assert detect_format(tmp_path) == ("food101", tmp_path)


def test_food101_mmbt_layout_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (3, 3)).save(tmp_path / "img" / "1.jpg")
    train = [
        {"id": 1, "label": "sushi", "text": "rolls", "img": "img/1.jpg"},
        {"id": 2, "label": "ramen", "text": "noodles", "img": "img/1.jpg"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    (tmp_path / "test.jsonl").write_text(json.dumps(train[0]))
    data = load_food101(tmp_path)
    assert data.sizes() == {"train": 2, "test": 1} and data.label_names == ["ramen", "sushi"]
    (tmp_path / "test.jsonl").write_text(json.dumps({**train[0], "label": "pizza"}))
    with pytest.raises(
        ValueError, match=r"split 'test' has classes absent from train: \['pizza'\]"
    ):
        load_food101(tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": 3, "label": "sushi", "text": "x"}))
    with pytest.raises(ValueError, match=r"test\.jsonl, line 1: missing field 'img'"):
        load_food101(tmp_path)
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\] have no samples"):
        load_food101(tmp_path)


# ----------------------------------------------------------------------------- MMSA


def _mmsa(path: Path, audio_width: int = 5, vision_width: int = 20, n: int = 4) -> None:
    rng = np.random.default_rng(0)
    data = {}
    for split in ("train", "valid", "test"):
        audio = rng.normal(size=(n, 6, audio_width)).astype(np.float32)
        audio[0, 2, 1] = -np.inf  # as in MMSA's real audio features
        data[split] = {
            "raw_text": [f"{split} sentence {i}" for i in range(n)],
            "text": rng.normal(size=(n, 8, 768)).astype(np.float32),
            "audio": audio,
            "vision": rng.normal(size=(n, 5, vision_width)).astype(np.float32),
            "regression_labels": np.array([-3.0, -0.4, 0.0, 2.6][:n], dtype=np.float32),
            "audio_lengths": [6, 3, 1, 2][:n],
            "vision_lengths": [5, 5, 2, 1][:n],
            "id": [f"vid_{i}" for i in range(n)],
        }
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_mmsa_mosi_schema_and_inf_replacement(tmp_path):
    path = tmp_path / "unaligned_50.pkl"
    _mmsa(path)
    before = _sha(path)
    with pytest.warns(UserWarning, match="3 non-finite audio values replaced with 0"):
        data = load_dataset(path)
    assert data.name.startswith("mmsa (mosi") and data.sizes() == {
        "train": 4,
        "valid": 4,
        "test": 4,
    }
    item = data.splits["train"][0]
    assert item["audio"].shape == (6, 5) and np.isfinite(item["audio"]).all()
    assert item["audio"][2, 1] == 0 and item["label"] == -3.0 and item["text"] == "train sentence 0"
    assert _sha(path) == before  # the file is only read


def test_mmsa_errors_name_the_problem(tmp_path):
    path = tmp_path / "mosei.pkl"
    _mmsa(path, audio_width=74, vision_width=35)
    with pytest.warns(UserWarning):
        assert "mosei" in load_mmsa(path).name
    with pytest.raises(ValueError, match=r"widths \{'audio': 74, 'vision': 35\} are not MOSI"):
        load_mmsa(path, dataset="mosi")
    data = pickle.loads(path.read_bytes())
    data["valid"]["regression_labels"][1] = 3.5
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=r"split 'valid': regression_labels\[1\] = 3\.5"):
        load_mmsa(path)
    del data["test"]["vision_lengths"]
    data["valid"]["regression_labels"][1] = 0.5
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=r"split 'test': missing field\(s\) \['vision_lengths'\]"):
        load_mmsa(path)
    del data["test"]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match="missing split 'test'"):
        load_mmsa(path)


def test_unknown_format_and_missing_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the data format"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown data format 'coco'"):
        load_dataset(tmp_path, format="coco")
