"""Write an independent SNLI-VE-format set of handwritten digits ("numerals-ve") to a folder.

It exists to check that a recipe chosen on the embedded ``digits-ve`` mini-benchmark carries over
to data it was not tuned on (docs/modality.md, "Data the recipe was not tuned on"). Nothing here
imports or mirrors ``mmtune.data.mini``:

- images are scikit-learn's digits written to disk as JPEG files (``<folder>/images/<id>.jpg``),
  read back by mmtune's real SNLI-VE loader; by default they are enlarged to 32 x 32 with
  bicubic resampling and drawn dark ink on light paper (``--polarity``, ``--size``), as a scan
  of handwriting would be, where digits-ve feeds the 8 x 8 arrays light-on-dark;
- every image has three statements, one per class (entailment, neutral, contradiction), as in
  SNLI-VE, from statement families and wordings that digits-ve does not have: primes, multiples
  of three, closed loops, perfect squares, numbers written as words with "at least / at most",
  "one more than" parity, and naming the numeral in words. Neutral statements speak of what no
  image can show, in wordings of their own;
- dev and test images are disjoint from the training images (``--train-images`` of them train).

Text alone can tell neutral statements apart (they never mention the numeral) but not the other
two: each image's entailed and contradicted statements are drawn from the same pool of families,
so the text-only level is about 2/3.

    python benchmarks/heldout_ve.py OUT_DIR [--seed 0] [--bank a] [--polarity dark-on-light]
    python benchmarks/heldout_ve.py OUT_DIR --ceilings        # OUT_DIR/ceilings.json
    mmtune train --config configs/levers/digits-ve-plateau.yaml --task.format snli-ve \
        --task.data OUT_DIR --task.data_options '{image_dir: OUT_DIR/images}' \
        --task.val_split dev --output_dir RUN_DIR      # --method text: the text-only level
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LOOPS = {0, 6, 8, 9}  # numerals drawn with a closed loop (4 is often open in handwriting)

NEUTRAL = [
    "The ink was blue.",
    "It was written in the afternoon.",
    "The writer used a pencil with a soft lead.",
    "The sheet came from a school notebook.",
    "The person writing it wore glasses.",
    "It took less than two seconds to write.",
    "The writer is a student.",
    "The form was filled in at a bank.",
]


FAMILIES: list[tuple[set[int], list[str], list[str]]] = [
    # (numerals for which the property holds, wordings that assert it, wordings that deny it)
    (
        {2, 3, 5, 7},
        ["It is a prime number.", "The numeral written is prime.", "This is a prime."],
        ["It is not a prime number.", "The numeral written is composite or one.", "No prime here."],
    ),
    (
        {0, 3, 6, 9},
        ["The value is a multiple of three.", "Three divides it evenly.", "It is divisible by 3."],
        [
            "The value is not divisible by three.",
            "Three does not divide it.",
            "It leaves a remainder when divided by 3.",
        ],
    ),
    (
        {0, 6, 8, 9},  # drawn with a closed loop (4 is often open in handwriting)
        ["The written figure contains a closed loop.", "There is an enclosed hole in the stroke."],
        ["The written figure has no closed loop.", "The strokes enclose no area."],
    ),
    (
        {0, 1, 4, 9},
        ["It is a perfect square.", "The value is the square of a whole number."],
        ["It is not a perfect square.", "No whole number squared gives this value."],
    ),
    (
        {1, 3, 5, 7, 9},  # parity in disguise: one more than it is even
        ["Adding one to it gives an even number.", "One more than this value is even."],
        ["Adding one to it gives an odd number.", "One more than this value is odd."],
    ),
    (
        {0, 1, 2, 3, 5, 8},
        ["It belongs to the Fibonacci sequence.", "The value is a Fibonacci number."],
        ["It is not in the Fibonacci sequence.", "The value is not a Fibonacci number."],
    ),
]

# Bank "b": other properties, other wordings, other neutral statements (a second check set).
FAMILIES_B: list[tuple[set[int], list[str], list[str]]] = [
    (
        {0, 1, 3, 6},
        ["It is a triangular number.", "The amount could be stacked as a triangle of dots."],
        ["It is not a triangular number.", "No triangle of dots has this many dots."],
    ),
    (
        {1, 2, 4, 8},
        ["It is a power of two.", "Doubling one, again and again, reaches this value."],
        ["It is not a power of two.", "Repeated doubling of one never lands on this value."],
    ),
    (
        {0, 4, 8},
        ["Four divides it exactly.", "It is a multiple of four."],
        ["Four does not divide it exactly.", "It is not a multiple of four."],
    ),
    (
        {0, 2, 4, 6, 8},
        ["Two people could split this many coins fairly.", "It can be halved into whole parts."],
        ["Two people could not split this many coins fairly.", "Halving it leaves a fraction."],
    ),
]
NEUTRAL_B = [
    "The scan was made on a cloudy day.",
    "The author of this numeral owns a cat.",
    "It was drawn with the left hand.",
    "The page had coffee stains on it.",
    "The writer was born in the spring.",
    "This sample was collected at a post office.",
]


def _comparison_b(d: int, truth: bool, rng: np.random.Generator, kind: int) -> str | None:
    if kind == 0:  # bigger than k: true iff d > k
        ks = [k for k in range(0, 9) if (d > k) == truth]
        return f"The quantity is bigger than {WORDS[int(rng.choice(ks))]}." if ks else None
    if kind == 1:  # smaller than k: true iff d < k
        ks = [k for k in range(1, 10) if (d < k) == truth]
        return f"The quantity is smaller than {int(rng.choice(ks))}." if ks else None
    shown = d if truth else int(rng.choice([x for x in range(10) if x != d]))
    return f"The scribble represents a {WORDS[shown]}."


def _families(d: int, truth: bool, rng: np.random.Generator, bank: str = "a") -> str:
    """One statement about numeral ``d`` that is true (``truth``) or false, from a random family."""
    families = FAMILIES if bank == "a" else FAMILIES_B
    while True:
        kind = int(rng.integers(0, len(families) + 3))
        if bank == "b" and kind >= len(families):
            text = _comparison_b(d, truth, rng, kind - len(families))
            if text is not None:
                return text
            continue
        if kind < len(families):
            members, yes, no = families[kind]
            pool = yes if (d in members) == truth else no
            return pool[int(rng.integers(0, len(pool)))]
        kind -= len(FAMILIES)
        if kind == 0:  # at least k: true iff d >= k
            ks = [k for k in range(1, 10) if (d >= k) == truth]
            if ks:
                k = int(rng.choice(ks))
                return rng.choice(
                    [f"The value is at least {WORDS[k]}.", f"It is no smaller than {k}."]
                )
        if kind == 1:  # at most k: true iff d <= k
            ks = [k for k in range(0, 9) if (d <= k) == truth]
            if ks:
                k = int(rng.choice(ks))
                return rng.choice([f"The value is at most {WORDS[k]}.", f"It does not exceed {k}."])
        if kind == 2:
            shown = d if truth else int(rng.choice([x for x in range(10) if x != d]))
            return rng.choice(
                [f"Someone wrote the numeral {WORDS[shown]}.", f"The handwriting says {shown}."]
            )


def rule(text: str, d: int) -> int:
    """The label (0 entailment, 1 neutral, 2 contradiction) of ``text`` about numeral ``d`` by
    this generator's own grammar: the structured probe's reading of the statement."""
    for members, yes, no in FAMILIES + FAMILIES_B:
        if text in yes or text in no:
            return 0 if (d in members) == (text in yes) else 2
    for pattern, holds in (
        (r"The quantity is bigger than (\w+)\.", lambda k: d > k),
        (r"The quantity is smaller than (\d)\.", lambda k: d < k),
        (r"The scribble represents a (\w+)\.", lambda k: d == k),
        (r"The value is at least (\w+)\.|It is no smaller than (\d)\.", lambda k: d >= k),
        (r"The value is at most (\w+)\.|It does not exceed (\d)\.", lambda k: d <= k),
        (r"Someone wrote the numeral (\w+)\.|The handwriting says (\d)\.", lambda k: d == k),
    ):
        m = re.fullmatch(pattern, text)
        if m:
            k = m.group(1) or m.group(2)
            return 0 if holds(WORDS.index(k) if k in WORDS else int(k)) else 2
    return 1


def ceilings(folder: Path, image_size: int = 112) -> dict[str, dict[str, float | str]]:
    """Majority, text probe, image probe, the digit probe and the structured probe on the test
    split, with mmtune's embedded MobileNetV2 preprocessed as ``mmtune train`` does at
    ``model.image_size`` (resize to size x 256/224, centre crop)."""
    import dataclasses

    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mmtune.encoders.vision import encode_images, load_vision_encoder
    from mmtune.metrics import classification_metrics

    labels = ["entailment", "neutral", "contradiction"]
    rows = {
        s: [json.loads(line) for line in (folder / f"snli_ve_{s}.jsonl").read_text().splitlines()]
        for s in ("train", "test")
    }
    encoder = load_vision_encoder("mobilenet-v2")
    encoder.preprocess = dataclasses.replace(
        encoder.preprocess, size=image_size, resize=round(image_size * 256 / 224)
    )
    feats = {
        s: encode_images(encoder, [folder / "images" / r["Flikr30kID"] for r in rs], levels=False)[
            "pooled"
        ].numpy()
        for s, rs in rows.items()
    }
    y = {s: np.array([labels.index(r["gold_label"]) for r in rs]) for s, rs in rows.items()}
    digit = {s: np.array([r["numeral"] for r in rs]) for s, rs in rows.items()}
    text = {s: [r["sentence2"] for r in rs] for s, rs in rows.items()}
    scaler = StandardScaler().fit(feats["train"])
    x = {s: scaler.transform(f) for s, f in feats.items()}

    def score(pred: np.ndarray) -> dict[str, float]:
        m = classification_metrics(pred, y["test"])["metrics"]
        return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}

    out: dict[str, dict[str, float | str]] = {}
    majority = int(np.bincount(y["train"]).argmax())
    out["majority"] = {"sees": "nothing", **score(np.full(len(y["test"]), majority))}
    words = CountVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b")
    t_train, t_test = words.fit_transform(text["train"]), words.transform(text["test"])
    text_lr = LogisticRegression(max_iter=2000).fit(t_train, y["train"])
    out["text_probe"] = {"sees": "word and bigram counts", **score(text_lr.predict(t_test))}
    img_lr = LogisticRegression(max_iter=2000, C=0.1).fit(x["train"], y["train"])
    out["image_probe"] = {"sees": "the image vector only", **score(img_lr.predict(x["test"]))}
    digit_lr = LogisticRegression(max_iter=2000, C=0.1).fit(x["train"], digit["train"])
    read = digit_lr.predict(x["test"])
    out["digit_probe"] = {
        "sees": "the image vector: digit identity (logistic regression)",
        "accuracy": float((read == digit["test"]).mean()),
    }
    pred = np.array([rule(t, int(d)) for t, d in zip(text["test"], read, strict=True)])
    out["structured_probe"] = {
        "sees": "the digit read from the image vector, the statement read by the grammar",
        **score(pred),
    }
    truth = np.array([rule(t, int(d)) for t, d in zip(text["test"], digit["test"], strict=True)])
    assert (truth == y["test"]).all(), "the grammar must reproduce every gold label"
    return out


def _image(pixels: np.ndarray, size: int, polarity: str) -> Image.Image:
    """sklearn's (8, 8) array in 0..16 -> a grayscale ``size`` x ``size`` picture."""
    ink = np.clip(pixels / 16.0, 0.0, 1.0)
    gray = 1.0 - ink if polarity == "dark-on-light" else ink
    im = Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L")
    return im.resize((size, size), Image.Resampling.BICUBIC) if size != 8 else im


def write(
    out: Path,
    *,
    seed: int = 0,
    train_images: int = 1200,
    dev_images: int = 300,
    size: int = 32,
    polarity: str = "dark-on-light",
    bank: str = "a",
) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([seed, 7919])
    order = rng.permutation(len(digits.target))
    parts = {
        "train": order[:train_images],
        "dev": order[train_images : train_images + dev_images],
        "test": order[train_images + dev_images :],
    }
    neutral = NEUTRAL if bank == "a" else NEUTRAL_B
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, idx in parts.items():
        rows = []
        for i in idx:
            d = int(digits.target[i])
            image_id = f"numeral-{seed}-{int(i):04d}"
            _image(digits.images[i], size, polarity).save(images / f"{image_id}.jpg", quality=92)
            statements = {
                "entailment": _families(d, True, rng, bank),
                "neutral": neutral[int(rng.integers(0, len(neutral)))],
                "contradiction": _families(d, False, rng, bank),
            }
            for label in statements:
                rows.append(
                    {
                        "Flikr30kID": f"{image_id}.jpg",
                        "sentence1": "A handwritten numeral.",
                        "sentence2": statements[label],
                        "gold_label": label,
                        "pairID": f"{image_id}#{label[0]}",
                        "numeral": d,
                    }
                )
        rng.shuffle(rows)
        with open(out / f"snli_ve_{split}.jsonl", "w", encoding="utf8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        counts[split] = len(rows)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=1200)
    p.add_argument("--dev-images", type=int, default=300)
    p.add_argument("--size", type=int, default=32, help="side of the saved image (8: as sklearn)")
    p.add_argument(
        "--polarity", choices=["dark-on-light", "light-on-dark"], default="dark-on-light"
    )
    p.add_argument(
        "--bank",
        choices=["a", "b"],
        default="a",
        help="statement families and wordings: a (primes, loops, ...) or b (powers of two, ...)",
    )
    p.add_argument(
        "--ceilings", action="store_true", help="score the probes on OUT (written before) instead"
    )
    a = p.parse_args()
    if a.ceilings:
        result = ceilings(a.out)
        (a.out / "ceilings.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return
    counts = write(
        a.out,
        seed=a.seed,
        train_images=a.train_images,
        dev_images=a.dev_images,
        size=a.size,
        polarity=a.polarity,
        bank=a.bank,
    )
    print(json.dumps({"out": str(a.out), "pairs": counts}))


if __name__ == "__main__":
    main()
