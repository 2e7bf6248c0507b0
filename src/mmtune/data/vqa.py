"""VQA mini-benchmarks and stage-1 captions from the embedded data, scored by exact match.

- ``digits``: scikit-learn's handwritten digits (real handwriting, 8 x 8), "Which digit is
  shown?", answer the numeral ("7").
- ``shapes``: rendered scenes of 2-5 coloured shapes (the generator of ``shapes-ref``) holding
  exactly one square, "What colour is the square?", answer the colour ("red").

Each item also has a caption (stage 1 trains the projector on the train split's captions only;
val and test images are never captioned). Splits are fixed by ``seed``; a run's seed only changes
initialisation and order.
"""

from __future__ import annotations

import re
import string
from typing import Any

import numpy as np

from mmtune.data.mini import _scene

__all__ = ["VQA_BENCHMARKS", "exact_match", "normalize_answer", "vqa_digits", "vqa_shapes"]

_SPLIT_FRACTIONS = (0.15, 0.25)  # val, test
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _splits(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    n = len(items)
    n_val, n_test = round(_SPLIT_FRACTIONS[0] * n), round(_SPLIT_FRACTIONS[1] * n)
    n_train = n - n_val - n_test
    return {
        "train": items[:n_train],
        "val": items[n_train : n_train + n_val],
        "test": items[n_train + n_val :],
    }


def vqa_digits(num_samples: int = 400, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """'Which digit is shown?' over scikit-learn's digits; answers are numerals."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= num_samples <= len(digits.target):
        raise ValueError(f"vqa_digits: num_samples must be in 1..{len(digits.target)}")
    order = np.random.default_rng(seed).permutation(len(digits.target))[:num_samples]
    items = []
    for i in order:
        d = int(digits.target[i])
        items.append(
            {
                "id": f"vqa-digits-{i}",
                "image": (digits.images[i] / 16.0).astype(np.float32),  # (8, 8) in [0, 1]
                "question": "Which digit is shown?",
                "answer": str(d),
                "caption": f"A handwritten digit {_NUMBERS[d]} ({d}) in black ink on white.",
            }
        )
    return _splits(items)


def _caption(objects: list[dict[str, Any]]) -> str:
    parts = [
        f"a {'big' if o['big'] else 'small'} {o['colour']} {o['shape']}"
        for o in sorted(objects, key=lambda o: o["cx"])
    ]
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"{len(objects)} shapes on white paper, from left to right: {listed}."


def vqa_shapes(
    num_samples: int = 400, image_size: int = 112, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """'What colour is the square?' over rendered scenes that hold exactly one square."""
    rng = np.random.default_rng(seed)
    items: list[dict[str, Any]] = []
    while len(items) < num_samples:
        scene = _scene(rng, image_size, with_objects=True)
        if scene is None:
            continue
        squares = [o for o in scene["objects"] if o["shape"] == "square"]
        if len(squares) != 1:
            continue
        items.append(
            {
                "id": f"vqa-shapes-{seed}-{len(items)}",
                "image": scene["image"],
                "question": "What colour is the square?",
                "answer": squares[0]["colour"],
                "caption": _caption(scene["objects"]),
            }
        )
    return _splits(items)


VQA_BENCHMARKS = {"digits": vqa_digits, "shapes": vqa_shapes}

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (the VQA convention, simplified)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to the answer after :func:`normalize_answer`."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match: no answers")
    hits = sum(
        normalize_answer(p) == normalize_answer(a)
        for p, a in zip(predictions, answers, strict=True)
    )
    return hits / len(answers)
