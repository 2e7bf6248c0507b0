"""CMU-MOSI and CMU-MOSEI in MMSA's pickle format (``unaligned_50.pkl``, ``aligned_50.pkl``).

``{"train" | "valid" | "test": {"raw_text": [N], "audio": (N, T_a, d_a), "vision": (N, T_v,
d_v), "regression_labels": (N,), "audio_lengths": [N], "vision_lengths": [N], "id": [N], ...}}``.
Widths: MOSI text 768 / audio 5 / vision 20, MOSEI 768 / 74 / 35. Labels lie in [-3, 3].

The file is only read. Non-finite audio or vision values (MMSA's audio holds -inf) are replaced
with 0 in memory, and the count is reported once in a warning per modality; a modality whose
values are mostly non-finite in a split is refused (there is nothing left to learn from). Empty
texts, duplicate ids and zero-length frame sequences are refused, naming split and sample.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.data.base import DataSplits, TaskDataset, load_pickle, require_fields

__all__ = ["MMSA_WIDTHS", "SentimentDataset", "load_mmsa"]

MMSA_WIDTHS = {"mosi": {"audio": 5, "vision": 20}, "mosei": {"audio": 74, "vision": 35}}
FIELDS = (
    "raw_text",
    "audio",
    "vision",
    "regression_labels",
    "audio_lengths",
    "vision_lengths",
    "id",
)


class SentimentDataset(TaskDataset):
    """Items: text, audio (T_a, d_a), vision (T_v, d_v), their lengths, label (float), id."""

    def __init__(self, split: dict[str, Any]):
        self.data = split

    def __len__(self) -> int:
        return len(self.data["raw_text"])

    def metadata(self, i: int) -> dict[str, Any]:
        return self[i]

    def image_source(self, i: int) -> Any:
        raise ValueError("sentiment data holds frames, not images")

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = self.data
        return {
            "id": str(d["id"][i]),
            "text": str(d["raw_text"][i]),
            "audio": d["audio"][i],
            "audio_length": int(d["audio_lengths"][i]),
            "vision": d["vision"][i],
            "vision_length": int(d["vision_lengths"][i]),
            "label": float(d["regression_labels"][i]),
        }


def load_mmsa(path: str | Path, dataset: str | None = None) -> DataSplits:
    """Load an MMSA pickle; ``dataset`` (``mosi``/``mosei``) checks the feature widths, and is
    inferred from them when omitted."""
    path = Path(path).expanduser()
    data = load_pickle(path, "MMSA")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of splits, got {type(data).__name__}")
    splits: dict[str, SentimentDataset] = {}
    widths: dict[str, int] | None = None
    replaced: dict[str, int] = {}
    for split in ("train", "valid", "test"):
        if split not in data:
            raise ValueError(f"{path}: missing split {split!r} (has {sorted(data)})")
        d = dict(data[split])  # a shallow copy: the loaded file contents stay as they were
        where = f"{path}, split {split!r}"
        require_fields(d, FIELDS, where)
        n = len(d["raw_text"])
        if n == 0:
            raise ValueError(f"{where}: no samples")
        for f in FIELDS:
            if len(d[f]) != n:
                raise ValueError(f"{where}: field {f!r} has {len(d[f])} entries, raw_text {n}")
        labels = np.asarray(d["regression_labels"], dtype=np.float64).reshape(n)
        if not np.isfinite(labels).all() or np.abs(labels).max() > 3 + 1e-6:
            bad = int(np.flatnonzero(~np.isfinite(labels) | (np.abs(labels) > 3 + 1e-6))[0])
            raise ValueError(
                f"{where}: regression_labels[{bad}] = {labels[bad]} is outside [-3, 3]"
            )
        d["regression_labels"] = labels
        for i, text in enumerate(d["raw_text"]):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: raw_text[{i}] is empty ({text!r})")
        ids = [str(x) for x in d["id"]]
        if len(set(ids)) != n:
            dup = next(x for x in ids if ids.count(x) > 1)
            raise ValueError(f"{where}: id {dup!r} appears more than once")
        these = {}
        for m in ("audio", "vision"):
            arr = np.asarray(d[m], dtype=np.float32)
            if arr.ndim != 3:
                raise ValueError(f"{where}: field {m!r} must be (N, T, width); got {arr.shape}")
            lengths = np.asarray(d[f"{m}_lengths"])
            if (lengths < 0).any() or (lengths > arr.shape[1]).any():
                raise ValueError(f"{where}: {m}_lengths outside [0, {arr.shape[1]}]")
            if (lengths == 0).any():
                i = int(np.flatnonzero(lengths == 0)[0])
                raise ValueError(
                    f"{where}: {m}_lengths[{i}] is 0 (sample id {ids[i]!r}): a sample needs at "
                    f"least one {m} frame"
                )
            bad = ~np.isfinite(arr)
            if bad.any():
                share = float(bad.mean())
                if share > 0.5:
                    raise ValueError(
                        f"{where}: field {m!r} is {100 * share:.0f}% NaN or infinite; the "
                        f"{m} modality carries no usable signal (drop it from task.modalities "
                        "or fix the file)"
                    )
                replaced[m] = replaced.get(m, 0) + int(bad.sum())
                arr = np.where(bad, np.float32(0), arr)
            d[m] = arr
            these[m] = arr.shape[2]
        if widths is None:
            widths = these
        elif these != widths:
            raise ValueError(f"{where}: feature widths {these} differ from train's {widths}")
        splits[split] = SentimentDataset(d)
    assert widths is not None
    if dataset is None:
        dataset = next((k for k, v in MMSA_WIDTHS.items() if v == widths), "custom")
    elif dataset not in MMSA_WIDTHS:
        raise ValueError(f"dataset must be one of {sorted(MMSA_WIDTHS)}, got {dataset!r}")
    elif widths != MMSA_WIDTHS[dataset]:
        raise ValueError(
            f"{path}: feature widths {widths} are not {dataset.upper()}'s {MMSA_WIDTHS[dataset]}"
        )
    for m, count in replaced.items():
        warnings.warn(f"{path}: {count} non-finite {m} values replaced with 0", stacklevel=2)

    def describe(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": item["text"],
            "label": item["label"],
            "audio": f"{item['audio'].shape}, length {item['audio_length']}",
            "vision": f"{item['vision'].shape}, length {item['vision_length']}",
            "id": item["id"],
        }

    return DataSplits(f"mmsa ({dataset}, widths {widths})", "sentiment", splits, describe=describe)
