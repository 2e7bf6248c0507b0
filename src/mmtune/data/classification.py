"""Image-text classification: SNLI-VE and UPMC-Food101.

SNLI-VE (``snli_ve_{train,dev,test}.jsonl``): one premise image, one hypothesis
(``sentence2``), ``gold_label`` in entailment / neutral / contradiction. The image id is read from
``Flikr30kID`` (the original, misspelt field) or ``Flickr30K_ID``, with a ``.jpg`` suffix
stripped; rows whose ``gold_label`` is ``-`` (no annotator majority) are dropped, as in SNLI.

UPMC-Food101, two layouts:

- CSV (``texts/{train,test}_titles.csv``, no header): image file, title, class name; images in
  ``images/{train,test}/<class>/<file>``. It has no validation split: one is drawn from train
  with a fixed seed (``val_fraction``, default 5%), identical on every machine;
- MMBT JSON lines (``{train,dev,test}.jsonl``): ``id``, ``label`` (class name), ``text``,
  ``img`` (path relative to the data folder).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.data.base import DataSplits, TaskDataset, read_jsonl, require_file
from mmtune.encoders.images import to_rgb_array

__all__ = ["SNLI_VE_LABELS", "ImageTextDataset", "load_food101", "load_snli_ve"]

SNLI_VE_LABELS = ["entailment", "neutral", "contradiction"]


class ImageTextDataset(TaskDataset):
    """Items: image (H, W, 3 uint8; decoded on access), image_path, text, label (int), id."""

    def __init__(self, records: list[dict[str, Any]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def metadata(self, i: int) -> dict[str, Any]:
        """The record without decoding its image."""
        return dict(self.records[i])

    def image_source(self, i: int) -> Path:
        return self.records[i]["image_path"]  # decoded from its file by the encoder

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {**r, "image": to_rgb_array(r["image_path"])}


def _describe(label_names: list[str]):
    def describe(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": item["text"],
            "label": f"{item['label']} ({label_names[item['label']]})",
            "image": f"{item['image_path']} {item['image'].shape}",
            "id": item["id"],
        }

    return describe


def _text(value: Any, where: str, field: str) -> str:
    """A sample's text: a non-empty string, else an error naming the place and field."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value


def _unique_ids(records: list[dict[str, Any]], path: Path) -> None:
    seen: dict[str, Any] = {}
    for r in records:
        if r["id"] in seen:
            raise ValueError(
                f"{path}: lines {seen[r['id']]} and {r['line']} share the id {r['id']!r} "
                "(each pair needs its own id: results are matched by it)"
            )
        seen[r["id"]] = r["line"]


def _snli_file(path: Path, image_dir: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, r in read_jsonl(path):
        where = f"{path}, line {lineno}"
        for f in ("gold_label", "sentence2"):
            if f not in r:
                raise ValueError(f"{where}: missing field {f!r}")
        image_id = r.get("Flikr30kID", r.get("Flickr30K_ID"))
        if image_id is None:
            raise ValueError(f"{where}: missing field 'Flikr30kID' (or 'Flickr30K_ID')")
        label = r["gold_label"]
        if label == "-":
            continue  # no majority label
        if label not in SNLI_VE_LABELS:
            raise ValueError(f"{where}: gold_label {label!r} is not one of {SNLI_VE_LABELS}")
        image_id = str(image_id).removesuffix(".jpg")
        records.append(
            {
                "id": str(r.get("pairID", f"{path.stem}:{lineno}")),
                "line": lineno,
                "text": _text(r["sentence2"], where, "sentence2"),
                "premise": r.get("sentence1"),
                "label": SNLI_VE_LABELS.index(label),
                "image_path": image_dir / f"{image_id}.jpg",
            }
        )
    _unique_ids(records, path)
    return records


def load_snli_ve(path: str | Path, image_dir: str | Path | None = None) -> DataSplits:
    """A folder with ``snli_ve_{train,dev,test}.jsonl`` (or any one such file, as its split).

    Images: ``image_dir`` (default ``<folder>/Flickr30K/flickr30k_images``), ``<id>.jpg``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = {s: path / f"snli_ve_{s}.jsonl" for s in ("train", "dev", "test")}
        files = {s: f for s, f in files.items() if f.is_file()}
        if not files:
            raise FileNotFoundError(f"{path}: no snli_ve_{{train,dev,test}}.jsonl inside")
        folder = path
    else:
        require_file(path, "SNLI-VE jsonl")
        split = next((s for s in ("train", "dev", "test") if s in path.stem), path.stem)
        files, folder = {split: path}, path.parent
    images = Path(image_dir) if image_dir else folder / "Flickr30K" / "flickr30k_images"
    splits = {s: ImageTextDataset(_snli_file(f, images)) for s, f in files.items()}
    return DataSplits(
        "snli-ve", "classification", splits, SNLI_VE_LABELS, _describe(SNLI_VE_LABELS)
    )


def _food_csv(path: Path, image_root: Path, split: str) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 3:
                raise ValueError(
                    f"{path}, line {lineno}: expected 3 columns (image, title, class name), "
                    f"got {len(row)}"
                )
            image, title, cls = (x.strip() for x in row)
            if not cls:
                raise ValueError(f"{path}, line {lineno}: empty class name")
            _text(title, f"{path}, line {lineno}", "title")
            image_path = Path(image)
            if not image_path.is_absolute():
                image_path = image_root / split / cls / image_path.name
            records.append(
                {
                    "id": f"{split}:{cls}/{image_path.name}",
                    "line": lineno,
                    "text": title,
                    "class": cls,
                    "image_path": image_path,
                }
            )
    _unique_ids(records, path)
    return records


def _food_mmbt(path: Path, folder: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, r in read_jsonl(path):
        for f in ("id", "label", "text", "img"):
            if f not in r:
                raise ValueError(f"{path}, line {lineno}: missing field {f!r}")
        records.append(
            {
                "id": str(r["id"]),
                "line": lineno,
                "text": _text(r["text"], f"{path}, line {lineno}", "text"),
                "class": str(r["label"]),
                "image_path": folder / r["img"],
            }
        )
    _unique_ids(records, path)
    return records


def load_food101(path: str | Path, *, val_fraction: float = 0.05, seed: int = 0) -> DataSplits:
    """UPMC-Food101 from its folder, in the CSV or the MMBT JSON-lines layout."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (UPMC-Food101 root)")
    if (folder / "train.jsonl").is_file():
        raw = {
            s: _food_mmbt(folder / f"{s}.jsonl", folder)
            for s in ("train", "dev", "test")
            if (folder / f"{s}.jsonl").is_file()
        }
        layout = "mmbt jsonl"
    elif (folder / "texts" / "train_titles.csv").is_file():
        raw = {
            s: _food_csv(folder / "texts" / f"{s}_titles.csv", folder / "images", s)
            for s in ("train", "test")
            if (folder / "texts" / f"{s}_titles.csv").is_file()
        }
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        order = np.random.default_rng(seed).permutation(len(raw["train"]))
        n_val = max(1, round(val_fraction * len(order)))
        train = raw["train"]
        raw["dev"] = [train[i] for i in sorted(order[:n_val])]
        raw["train"] = [train[i] for i in sorted(order[n_val:])]
        layout = f"csv, dev = {val_fraction:.0%} of train (seed {seed})"
    else:
        raise FileNotFoundError(
            f"{folder}: neither train.jsonl (MMBT layout) nor texts/train_titles.csv (CSV layout)"
        )
    names = sorted({r["class"] for r in raw["train"]})
    index = {n: i for i, n in enumerate(names)}
    for split, records in raw.items():
        unknown = sorted({r["class"] for r in records} - set(index))
        if unknown:
            raise ValueError(
                f"{folder}: split {split!r} has classes absent from train: {unknown[:5]}"
            )
        for r in records:
            r["label"] = index[r["class"]]
    splits = {s: ImageTextDataset(raw[s]) for s in ("train", "dev", "test") if s in raw}
    return DataSplits(f"upmc-food101 ({layout})", "classification", splits, names, _describe(names))
