"""Data set loaders, one file per benchmark format, behind one registration point."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmtune.data.base import DataSplits, check_options
from mmtune.data.classification import SNLI_VE_LABELS, load_food101, load_snli_ve
from mmtune.data.mmsa import load_mmsa
from mmtune.data.prompts import DEFAULT_PROMPTS, PromptTemplate
from mmtune.data.refcoco import annotation_mask, load_refcoco

__all__ = [
    "DATA_FORMATS",
    "DEFAULT_PROMPTS",
    "SNLI_VE_LABELS",
    "DataSplits",
    "PromptTemplate",
    "annotation_mask",
    "detect_format",
    "load_dataset",
    "load_food101",
    "load_mmsa",
    "load_refcoco",
    "load_snli_ve",
    "register_data_format",
]

DATA_FORMATS: dict[str, Callable[..., DataSplits]] = {
    "refcoco": load_refcoco,
    "snli-ve": load_snli_ve,
    "food101": load_food101,
    "mmsa": load_mmsa,
}


def register_data_format(name: str, loader: Callable[..., DataSplits]) -> None:
    """Register a loader ``loader(path, **options) -> DataSplits`` under ``name``."""
    DATA_FORMATS[name] = loader


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format name, path to pass to its loader) from a file or folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if list(path.glob("snli_ve_*.jsonl")):
            return "snli-ve", path
        if (path / "train.jsonl").is_file() or (path / "texts" / "train_titles.csv").is_file():
            return "food101", path
        refs = sorted(path.glob("refs(*).p"))
        if refs:
            return "refcoco", refs[0]
        pkls = sorted(path.glob("*.pkl"))
        if pkls:
            return "mmsa", pkls[0]
    elif path.name.startswith("refs(") and path.suffix == ".p":
        return "refcoco", path
    elif path.suffix == ".pkl":
        return "mmsa", path
    elif path.suffix == ".jsonl":
        try:
            with open(path, encoding="utf8") as f:
                first = next((line for line in f if line.strip()), "{}")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        try:
            record = json.loads(first)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line 1: not valid JSON ({e})") from e
        if "gold_label" in record:
            return "snli-ve", path
        if {"img", "label", "text"} <= set(record):
            return "food101", path.parent
    elif path.suffix == ".csv":
        return "food101", path.parent.parent
    raise ValueError(
        f"{path}: cannot tell the data format; name it with --format ({', '.join(DATA_FORMATS)})"
    )


def load_dataset(
    path: str | Path, format: str = "auto", *, where: str = "options", **options: Any
) -> DataSplits:
    """Load a data set with the loader of ``format`` (``auto``: detected from the path).

    An option the loader does not take is refused, naming it (``where`` says where it came
    from, e.g. ``task.data_options``).
    """
    if format == "auto":
        format, path = detect_format(path)
    if format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {format!r}; known: {', '.join(DATA_FORMATS)}")
    check_options(DATA_FORMATS[format], options, where, skip=1)
    return DATA_FORMATS[format](path, **options)
