"""Embedded mini-benchmarks, generated deterministically from a seed and shipped data.

Each has train / val / test splits whose items look like the real loaders' items, so the same
training code runs on both.

- ``shapes-ref`` (referring segmentation): rendered scenes of 2-5 objects (shape, colour, size,
  position) with an expression that only the text can resolve ("the blue square", "the leftmost
  circle", "the larger red shape") and the target's ground-truth mask.
- ``digits-ve`` (3-way image-text entailment, like SNLI-VE): scikit-learn's handwritten digits
  (real handwriting, 8 x 8) with hypotheses entailed or contradicted by the digit ("The digit
  is even.", "The number shown is greater than 6.") or that the image cannot decide (neutral).
  Labels are balanced, so text alone can spot neutral hypotheses but not the other two.
- ``movie-sentiment`` (regression, like MOSI): 10,605 movie-review snippets with human valence
  ratings (mean of raters, [-4, 4]) from the vaderSentiment 3.3.2 source distribution (Hutto &
  Gilbert, ICWSM 2014), rescaled to [-3, 3]. The acoustic (5-d) and facial (20-d) frame
  sequences are SIMULATED: frames = (label / 3) x a fixed random direction x strength + unit
  Gaussian noise, with random lengths. They exist so the paper's T / T+A / T+F / T+A+F ablation
  can run; they are not real audio or video features.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.data.base import DataSplits, TaskDataset
from mmtune.data.classification import SNLI_VE_LABELS

__all__ = ["MINI_BENCHMARKS", "ListDataset", "digits_ve", "movie_sentiment", "shapes_ref"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("square", "circle", "triangle")


class ListDataset(TaskDataset):
    """Items held in memory."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def metadata(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _three_splits(items: list[dict[str, Any]], fractions: tuple[float, float]):
    """train / val / test in order; fractions are (val, test) of all items."""
    n = len(items)
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    n_train = n - n_val - n_test
    return {
        "train": ListDataset(items[:n_train]),
        "val": ListDataset(items[n_train : n_train + n_val]),
        "test": ListDataset(items[n_train + n_val :]),
    }


# ----------------------------------------------------------------------------- shapes-ref


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if shape == "square":
        return (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    top = cy - r  # an upright triangle: apex at the top, base at cy + r
    return (y >= top) & (y <= cy + r) & (np.abs(x - cx) <= (y - top) / 2)


def _expressions(objects: list[dict[str, Any]], t: int) -> list[str]:
    """Expressions that pick object ``t`` and no other in the scene."""
    target, out = objects[t], []
    same_cs = [
        o for o in objects if o["colour"] == target["colour"] and o["shape"] == target["shape"]
    ]
    if len(same_cs) == 1:
        out.append(f"the {target['colour']} {target['shape']}")
    same_shape = [o for o in objects if o["shape"] == target["shape"]]
    if len(same_shape) >= 2:
        xs = [o["cx"] for o in same_shape]
        if target["cx"] == min(xs):
            out.append(f"the leftmost {target['shape']}")
        if target["cx"] == max(xs):
            out.append(f"the rightmost {target['shape']}")
    same_colour = [o for o in objects if o["colour"] == target["colour"]]
    if len(same_colour) == 2 and same_colour[0]["big"] != same_colour[1]["big"]:
        out.append(f"the {'larger' if target['big'] else 'smaller'} {target['colour']} shape")
    return out


def _scene(
    rng: np.random.Generator, size: int, with_objects: bool = False
) -> dict[str, Any] | None:
    n = int(rng.integers(2, 6))
    objects: list[dict[str, Any]] = []
    occupied = np.zeros((size, size), bool)
    for _ in range(n):
        for _attempt in range(30):
            big = bool(rng.integers(0, 2))
            r = float(rng.uniform(0.12, 0.16) if big else rng.uniform(0.065, 0.085)) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            shape = SHAPES[int(rng.integers(0, 3))]
            mask = _shape_mask(shape, cx, cy, r, size)
            grown = _shape_mask("circle", cx, cy, r * 1.5, size)
            if not (grown & occupied).any():
                occupied |= mask
                colour = list(COLOURS)[int(rng.integers(0, 4))]
                objects.append(
                    {"shape": shape, "colour": colour, "big": big, "cx": cx, "mask": mask}
                )
                break
    if len(objects) < 2:
        return None
    choices = [(t, e) for t in range(len(objects)) for e in _expressions(objects, t)]
    if not choices:
        return None
    pick = int(rng.integers(0, len(choices)))
    t, expression = choices[pick]
    image = np.full((size, size, 3), 235, np.float64)
    image += rng.normal(0, 6, size=image.shape)  # paper texture
    for o in objects:
        image[o["mask"]] = np.array(COLOURS[o["colour"]]) + rng.normal(0, 8, 3)
    scene = {
        "image": np.clip(image, 0, 255).astype(np.uint8),
        "mask": objects[t]["mask"],
        "expression": expression,
        "num_objects": len(objects),
        "objects_mask": np.any([o["mask"] for o in objects], axis=0),  # the every-object answer
        # the other (object, expression) pairs of this scene, for expressions_per_image > 1
        "_others": [(objects[c]["mask"], e) for j, (c, e) in enumerate(choices) if j != pick],
    }
    if with_objects:  # attributes only (no masks), for the VQA questions and captions
        scene["objects"] = [{k: o[k] for k in ("shape", "colour", "big", "cx")} for o in objects]
    return scene


def shapes_ref(
    num_samples: int = 900,
    image_size: int = 112,
    seed: int = 0,
    fractions: tuple[float, float] = (0.15, 0.25),
    expressions_per_image: int = 1,
) -> DataSplits:
    """Referring segmentation on rendered shapes; deterministic given the arguments.

    Every scene has one expression (object and wording drawn uniformly among those that pick
    exactly one object). With ``expressions_per_image`` k > 1, each *training* scene gets up to
    k - 1 more of its other valid (object, expression) pairs, drawn without replacement by a
    second seeded generator; the scenes, the splits and the val/test items stay exactly those
    of k = 1, so no val/test image is ever seen in training. Extra items share the scene's
    ``image_id``."""
    if expressions_per_image < 1:
        raise ValueError(f"expressions_per_image must be >= 1, got {expressions_per_image}")
    rng = np.random.default_rng(seed)
    items: list[dict[str, Any]] = []
    others: list[list[tuple[np.ndarray, str]]] = []
    while len(items) < num_samples:
        scene = _scene(rng, image_size)
        if scene is not None:
            others.append(scene.pop("_others"))
            sid = f"shapes-{seed}-{len(items)}"
            items.append({**scene, "id": sid, "image_id": sid})
    splits = _three_splits(items, fractions)
    if expressions_per_image > 1:
        more = np.random.default_rng([seed, 1])
        train = []
        for item, extra in zip(splits["train"].items, others, strict=False):
            train.append(item)
            chosen = more.permutation(len(extra))[: expressions_per_image - 1]
            for j, c in enumerate(chosen):
                mask, expression = extra[int(c)]
                train.append(
                    {**item, "id": f"{item['id']}-e{j + 1}", "mask": mask, "expression": expression}
                )
        splits["train"] = ListDataset(train)

    def describe(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "expression": item["expression"],
            "image": f"{item['image'].shape}",
            "mask_pixels": int(item["mask"].sum()),
            "objects": item["num_objects"],
        }

    return DataSplits("shapes-ref (mini)", "segmentation", splits, describe=describe)


# ----------------------------------------------------------------------------- digits-ve

_NEUTRAL = [
    "The digit was written with a blue pen.",
    "The person who wrote the digit is left-handed.",
    "The digit was written on a Monday.",
    "The writer was in a hurry.",
    "The digit was copied from a phone number.",
    "The paper was lying on a wooden desk.",
]


def _hypothesis(digit: int, label: int, rng: np.random.Generator) -> str:
    """A statement about ``digit`` that is entailed (0), neutral (1) or contradicted (2)."""
    if label == 1:
        return _NEUTRAL[int(rng.integers(0, len(_NEUTRAL)))]
    truth = label == 0
    kind = int(rng.integers(0, 4))
    if kind == 0:
        even = (digit % 2 == 0) == truth
        return f"The digit is {'even' if even else 'odd'}."
    if kind == 1:  # "greater than k": true iff digit > k
        ks = [k for k in range(0, 9) if (digit > k) == truth]
        if ks:
            return f"The number shown is greater than {ks[int(rng.integers(0, len(ks)))]}."
    if kind == 2:
        ks = [k for k in range(1, 10) if (digit < k) == truth]
        if ks:
            return f"The number shown is less than {ks[int(rng.integers(0, len(ks)))]}."
    shown = digit if truth else int(rng.choice([d for d in range(10) if d != digit]))
    return f"The image shows the digit {shown}."


def digits_ve(
    num_samples: int | None = None,
    seed: int = 0,
    fractions: tuple[float, float] = (0.15, 0.25),
    hypotheses_per_image: int = 1,
) -> DataSplits:
    """Image-text entailment over scikit-learn's 1,797 handwritten digits.

    Every image has one hypothesis (label drawn uniformly); with ``hypotheses_per_image`` k > 1,
    each *training* image gets k - 1 more (new labels and statements, from a second seeded
    generator), so the first hypothesis of every image, the splits and the val/test items stay
    exactly those of k = 1, and no val/test image is ever seen in training."""
    if hypotheses_per_image < 1:
        raise ValueError(f"hypotheses_per_image must be >= 1, got {hypotheses_per_image}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:num_samples]
    items = []
    for i in order:
        label = int(rng.integers(0, 3))
        digit = int(digits.target[i])
        items.append(
            {
                "id": f"digits-{i}",
                "image": (digits.images[i] / 16.0).astype(np.float32),  # (8, 8) in [0, 1]
                "text": _hypothesis(digit, label, rng),
                "label": label,
                "digit": digit,
            }
        )
    splits = _three_splits(items, fractions)
    if hypotheses_per_image > 1:
        more = np.random.default_rng([seed, 1])
        train = []
        for item in splits["train"].items:
            train.append(item)
            for j in range(1, hypotheses_per_image):
                label = int(more.integers(0, 3))
                text = _hypothesis(item["digit"], label, more)
                train.append({**item, "id": f"{item['id']}-h{j}", "text": text, "label": label})
        splits["train"] = ListDataset(train)

    def describe(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": item["text"],
            "label": f"{item['label']} ({SNLI_VE_LABELS[item['label']]})",
            "digit": item["digit"],
            "image": f"{item['image'].shape}",
        }

    return DataSplits("digits-ve (mini)", "classification", splits, SNLI_VE_LABELS, describe)


# ----------------------------------------------------------------------------- movie-sentiment

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"


def vader_sdist() -> Path:
    """The vaderSentiment 3.3.2 source distribution (``make`` fetches it next to the venv)."""
    candidates = [
        os.environ.get("MMTUNE_VADER_SDIST"),
        Path(sys.prefix) / "share" / "mmtune" / VADER_SDIST,
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError(
        f"{VADER_SDIST} not found (looked at {[str(c) for c in candidates if c]}); fetch it with "
        f"`pip download --no-binary :all: --no-deps vaderSentiment==3.3.2 -d "
        f"{Path(sys.prefix) / 'share' / 'mmtune'}` or set MMTUNE_VADER_SDIST"
    )


def movie_snippets(path: Path | None = None) -> list[tuple[str, float]]:
    """(sentence, mean human rating in [-4, 4]) for the 10,605 movie-review snippets."""
    path = path or vader_sdist()
    with tarfile.open(path) as outer:
        inner = outer.extractfile(
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
        )
        if inner is None:
            raise ValueError(f"{path}: no additional_resources/hutto_ICWSM_2014.tar.gz inside")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as t:
            raw = t.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()
    rows = []
    for lineno, line in enumerate(raw.decode("utf8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(
                f"{path}: movieReviewSnippets_GroundTruth.txt line {lineno}: "
                f"expected id, rating, text"
            )
        rows.append((parts[2].strip(), float(parts[1])))
    return rows


def movie_sentiment(
    num_samples: int | None = 3000,
    seed: int = 0,
    fractions: tuple[float, float] = (0.15, 0.25),
    strength: float = 0.3,
    path: Path | None = None,
) -> DataSplits:
    """Movie-review valence regression with simulated acoustic (5-d) and facial (20-d) frames."""
    rows = movie_snippets(path)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))[: num_samples or len(rows)]
    directions = {"audio": rng.normal(size=5), "vision": rng.normal(size=20)}
    for k in directions:
        directions[k] /= np.linalg.norm(directions[k]) / np.sqrt(len(directions[k]))
    items = []
    for i in order:
        text, rating = rows[i]
        label = float(np.clip(rating * 0.75, -3.0, 3.0))  # [-4, 4] -> [-3, 3]
        item: dict[str, Any] = {"id": f"movie-{i + 1}", "text": text, "label": label}
        for m, width, max_len in (("audio", 5, 20), ("vision", 20, 16)):
            length = int(rng.integers(max_len // 2, max_len + 1))
            frames = np.zeros((max_len, width), np.float32)
            signal = (label / 3.0) * strength * directions[m]
            frames[:length] = signal + rng.normal(size=(length, width))
            item[m], item[f"{m}_length"] = frames, length
        items.append(item)
    splits = _three_splits(items, fractions)

    def describe(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": item["text"],
            "label": round(item["label"], 3),
            "audio (simulated)": f"{item['audio'].shape}, length {item['audio_length']}",
            "vision (simulated)": f"{item['vision'].shape}, length {item['vision_length']}",
        }

    return DataSplits(
        "movie-sentiment (mini; A/F frames simulated)", "sentiment", splits, describe=describe
    )


MINI_BENCHMARKS = {
    "shapes-ref": shapes_ref,
    "digits-ve": digits_ve,
    "movie-sentiment": movie_sentiment,
}
