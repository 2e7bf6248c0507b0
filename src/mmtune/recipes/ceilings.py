"""Ceilings of a benchmark (docs/design.md section 9): the trivial answers and scikit-learn probes.

Each entry says exactly what it sees. The probes are fitted on the training split and scored
on the test split with the project's metric conventions (:mod:`mmtune.metrics`):

- classification: ``majority`` (the most frequent training label); ``text_probe`` (logistic
  regression on word and bigram counts of the text); ``image_probe`` (logistic regression on the
  frozen, standardized image vector); ``joint_probe`` (both, concatenated: linear, so it cannot
  model an image x text interaction); for ``digits-ve`` also ``structured_probe``: the digit
  read from the image vector by a logistic regression trained on the training digits, then the
  hypothesis read by the generator's own grammar (parity, comparisons, identity; anything else
  is neutral) - the ceiling of a model that both sees the digit and understands the statement;
- sentiment: ``constant`` (the training mean); ``text_probe`` (ridge on word counts);
  ``frames_probe`` (ridge on each modality's mean frame); ``joint_probe`` (both);
- segmentation: ``every_object`` (the union of every object's mask, where the data has it: the
  answer of a model that segments objects but ignores the expression); ``empty`` (no pixel);
  ``decoder_probe``: the project's segmentation decoder trained alone (AdamW, lr 1e-3, batch
  8, DICE + 0.5 BCE, ``probe_epochs`` epochs, the last one scored) on the frozen encoder's
  three feature maps and a one-hot code of the expression string - perfect reading of the
  words, no language model - the ceiling of the decoder at this data size.

The text method (the frozen LLM without the modality) is the other floor; it is a row of the
method table, trained like every method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmtune.metrics import (
    classification_metrics,
    mask_intersection_union,
    segmentation_metrics,
    sentiment_metrics,
)
from mmtune.tasks import get_task
from mmtune.utils.progress import Progress, tracked

__all__ = ["ceilings", "decoder_probe", "digits_rule"]


def digits_rule(text: str, digit: int) -> int:
    """The digits-ve label of ``text`` about ``digit`` by the generator's grammar
    (0 entailed, 1 neutral, 2 contradicted)."""
    m = re.fullmatch(r"The digit is (even|odd)\.", text)
    if m:
        truth = (digit % 2 == 0) == (m.group(1) == "even")
    elif m := re.fullmatch(r"The number shown is (greater|less) than (\d)\.", text):
        k = int(m.group(2))
        truth = digit > k if m.group(1) == "greater" else digit < k
    elif m := re.fullmatch(r"The image shows the digit (\d)\.", text):
        truth = int(m.group(1)) == digit
    else:
        return 1
    return 0 if truth else 2


def _texts(split: Any, key: str) -> list[str]:
    return [str(split[i][key]) for i in range(len(split))]


def _classification(data: Any, features: dict[str, np.ndarray], name: str) -> dict[str, Any]:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = data.splits["train"], data.splits["test"]
    y_train = np.array([int(train[i]["label"]) for i in range(len(train))])
    y_test = np.array([int(test[i]["label"]) for i in range(len(test))])
    out: dict[str, Any] = {}
    majority = int(np.bincount(y_train).argmax())
    out["majority"] = {
        "sees": f"nothing: always class {majority} ({data.label_names[majority]})",
        **classification_metrics(np.full(len(y_test), majority), y_test)["metrics"],
    }
    words = CountVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b")
    t_train, t_test = (
        words.fit_transform(_texts(train, "text")),
        words.transform(_texts(test, "text")),
    )
    lr = LogisticRegression(max_iter=2000, C=1.0)
    out["text_probe"] = {
        "sees": "the text only (word and bigram counts; logistic regression)",
        **classification_metrics(lr.fit(t_train, y_train).predict(t_test), y_test)["metrics"],
    }
    if features:
        scaler = StandardScaler().fit(features["train"])
        x_train, x_test = scaler.transform(features["train"]), scaler.transform(features["test"])
        lr = LogisticRegression(max_iter=2000, C=0.1)
        out["image_probe"] = {
            "sees": "the frozen image vector only (standardized; logistic regression)",
            **classification_metrics(lr.fit(x_train, y_train).predict(x_test), y_test)["metrics"],
        }
        j_train = hstack([csr_matrix(x_train), t_train]).tocsr()
        j_test = hstack([csr_matrix(x_test), t_test]).tocsr()
        lr = LogisticRegression(max_iter=4000, C=0.1)
        out["joint_probe"] = {
            "sees": "image vector and text counts concatenated (linear: no interaction)",
            **classification_metrics(lr.fit(j_train, y_train).predict(j_test), y_test)["metrics"],
        }
        if name == "digits-ve":
            d_train = np.array([int(train[i]["digit"]) for i in range(len(train))])
            d_test = np.array([int(test[i]["digit"]) for i in range(len(test))])
            lr = LogisticRegression(max_iter=2000, C=0.1).fit(x_train, d_train)
            digit = lr.predict(x_test)
            pred = [
                digits_rule(t, int(d)) for t, d in zip(_texts(test, "text"), digit, strict=True)
            ]
            out["structured_probe"] = {
                "sees": "the digit read from the image vector (logistic regression trained on "
                "the training digits) and the hypothesis read by the generator's grammar",
                "digit_accuracy": float((digit == d_test).mean()),
                **classification_metrics(pred, y_test)["metrics"],
            }
    return out


def _sentiment(data: Any, modalities: list[str]) -> dict[str, Any]:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    train, test = data.splits["train"], data.splits["test"]
    y_train = np.array([float(train[i]["label"]) for i in range(len(train))])
    y_test = np.array([float(test[i]["label"]) for i in range(len(test))])
    out: dict[str, Any] = {
        "constant": {
            "sees": f"nothing: always the training mean {y_train.mean():.3f}",
            **sentiment_metrics(np.full(len(y_test), y_train.mean()), y_test)["metrics"],
        }
    }
    words = CountVectorizer(ngram_range=(1, 2))
    t_train, t_test = (
        words.fit_transform(_texts(train, "text")),
        words.transform(_texts(test, "text")),
    )
    out["text_probe"] = {
        "sees": "the text only (word and bigram counts; ridge regression)",
        **sentiment_metrics(Ridge(alpha=10.0).fit(t_train, y_train).predict(t_test), y_test)[
            "metrics"
        ],
    }

    def mean_frames(split: Any) -> np.ndarray:
        rows = []
        for i in range(len(split)):
            item = split[i]
            rows.append(
                np.concatenate(
                    [np.asarray(item[m])[: item[f"{m}_length"]].mean(0) for m in modalities]
                )
            )
        return np.stack(rows)

    if modalities:
        scaler = StandardScaler().fit(mean_frames(train))
        f_train, f_test = scaler.transform(mean_frames(train)), scaler.transform(mean_frames(test))
        out["frames_probe"] = {
            "sees": f"the {'/'.join(modalities)} frames only (mean frame; ridge regression)",
            **sentiment_metrics(Ridge(alpha=1.0).fit(f_train, y_train).predict(f_test), y_test)[
                "metrics"
            ],
        }
        j_train = hstack([csr_matrix(f_train), t_train]).tocsr()
        j_test = hstack([csr_matrix(f_test), t_test]).tocsr()
        out["joint_probe"] = {
            "sees": "mean frames and text counts concatenated (ridge regression)",
            **sentiment_metrics(Ridge(alpha=10.0).fit(j_train, y_train).predict(j_test), y_test)[
                "metrics"
            ],
        }
    return out


def decoder_probe(
    train: Sequence[dict[str, Any]],
    evals: dict[str, Sequence[dict[str, Any]]],
    text_of: Callable[[list[str]], Any],
    d_text: int,
    pixel_size: int,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    bce_weight: float = 0.5,
    seed: int = 0,
    on_epoch: Callable[[int, float, dict[str, dict[str, float]]], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """Train the segmentation decoder alone on precomputed maps; its metrics on each eval split.

    Items are split items as :func:`mmtune.tasks.model.collate` takes them (``level0..2``,
    ``mask``, ``expression``); ``text_of(expressions) -> (B, d_text)`` is the fixed text vector
    (a one-hot code, or a frozen LLM's pooled prompt vector). AdamW (weight decay 0.01), DICE +
    ``bce_weight`` BCE. Scores follow the project's conventions (logit > 0 at the original
    size; :func:`mmtune.metrics.segmentation_metrics`). ``on_epoch(epoch, mean train loss,
    {split: metrics})``, when given, is called after every epoch with every eval split scored
    (a learning curve); otherwise only the last epoch is scored."""
    import torch
    import torch.nn.functional as F

    from mmtune.heads.losses import segmentation_loss
    from mmtune.heads.segmentation import SegmentationDecoder
    from mmtune.tasks.model import collate

    torch.manual_seed(seed)
    channels = tuple(int(train[0][f"level{i}"].shape[0]) for i in range(3))
    decoder = SegmentationDecoder(channels, d_text)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)

    def forward(batch: dict[str, Any]) -> Any:
        levels = [batch[f"level{i}"] for i in range(3)]
        return decoder(levels, text_of(batch["expression"]), batch["pixel_size"])

    def score(items: Sequence[dict[str, Any]]) -> dict[str, float]:
        inter, union = [], []
        decoder.eval()
        with torch.no_grad():
            for s in range(0, len(items), 32):
                chunk = [items[i] for i in range(s, min(s + 32, len(items)))]
                batch = collate(chunk, "segmentation", pixel_size)
                logits = forward(batch)
                for r, truth in enumerate(batch["original_masks"]):
                    up = F.interpolate(
                        logits[r : r + 1], size=truth.shape, mode="bilinear", align_corners=False
                    )
                    i, u = mask_intersection_union((up[0, 0] > 0).numpy(), truth)
                    inter.append(i)
                    union.append(u)
        decoder.train()
        return segmentation_metrics(inter, union)["metrics"]

    scores: dict[str, dict[str, float]] = {}
    for epoch in tracked(range(1, epochs + 1), progress, "decoder probe epochs", epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        losses = []
        for s in range(0, len(order), batch_size):
            batch = collate(
                [train[i] for i in order[s : s + batch_size]], "segmentation", pixel_size
            )
            loss = segmentation_loss(forward(batch), batch["mask"], bce_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
        if on_epoch is not None or epoch == epochs:
            scores = {name: score(items) for name, items in evals.items()}
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(losses)), scores)
    return scores


def _onehot_probe(
    data: Any,
    levels: dict[str, dict[str, Any]],
    pixel_size: int,
    epochs: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    import torch

    def items(split: str) -> list[dict[str, Any]]:
        ds = data.splits[split]
        return [
            {**ds[i], **{f"level{k}": levels[split][f"level{k}"][i] for k in range(3)}}
            for i in range(len(ds))
        ]

    train = items("train")
    words = sorted({str(it["expression"]) for it in train})
    code = {w: i for i, w in enumerate(words)}
    eye = torch.eye(len(words) + 1)  # the last row: an expression never seen in training

    def text_of(expressions: list[str]) -> Any:
        return eye[[code.get(str(e), len(words)) for e in expressions]]

    scores = decoder_probe(
        train,
        {"test": items("test")},
        text_of,
        len(words) + 1,
        pixel_size,
        epochs,
        progress=progress,
    )
    return {
        "sees": "the frozen encoder's three feature maps and a one-hot code of the expression "
        f"({len(words)} distinct in training): the segmentation decoder alone, {epochs} epochs",
        **scores["test"],
    }


def _segmentation(
    data: Any,
    levels: dict[str, dict[str, Any]] | None = None,
    pixel_size: int = 0,
    probe_epochs: int = 30,
    progress: Progress | None = None,
) -> dict[str, Any]:
    test = data.splits["test"]
    out: dict[str, Any] = {}
    items = [test[i] for i in range(len(test))]
    if "objects_mask" in items[0]:
        pairs = [mask_intersection_union(it["objects_mask"], it["mask"]) for it in items]
        out["every_object"] = {
            "sees": "where the objects are, not the expression: the union of every object's mask",
            **segmentation_metrics([p[0] for p in pairs], [p[1] for p in pairs])["metrics"],
        }
    pairs = [mask_intersection_union(np.zeros_like(it["mask"]), it["mask"]) for it in items]
    out["empty"] = {
        "sees": "nothing: no pixel",
        **segmentation_metrics([p[0] for p in pairs], [p[1] for p in pairs])["metrics"],
    }
    if levels is not None and probe_epochs > 0:
        out["decoder_probe"] = _onehot_probe(data, levels, pixel_size, probe_epochs, progress)
    return out


def ceilings(cfg: Any, probe_epochs: int = 30, progress: Progress | None = None) -> dict[str, Any]:
    """Ceilings of the benchmark named by a TrainConfig's task (its data and encoder).

    ``probe_epochs``: segmentation's decoder probe (0: skip it). ``progress`` hears the image
    encoding and the probe's epochs (:mod:`mmtune.utils.progress`)."""
    import dataclasses

    from mmtune.encoders.vision import encode_images, load_vision_encoder
    from mmtune.training.build import load_task_data, split_images
    from mmtune.utils.cache import FeatureCache

    data = load_task_data(cfg.task)
    name = cfg.task.data
    result: dict[str, Any] = {"data": data.name, "task": data.task, "sizes": data.sizes()}
    kind = get_task(data.task)
    if not kind.reads_image:  # frames: the sentiment ceilings
        result["ceilings"] = _sentiment(data, list(cfg.task.modalities))
        return result
    encoder = load_vision_encoder(cfg.model.vision)
    if cfg.model.image_size:
        size = cfg.model.image_size
        encoder.preprocess = dataclasses.replace(
            encoder.preprocess, size=size, resize=max(size, round(size * 256 / 224))
        )
    segmentation = kind.needs_feature_maps  # the decoder probe over the feature maps
    if segmentation:  # as in training: the whole image, squashed
        encoder.preprocess = dataclasses.replace(encoder.preprocess, resize=None)
    cache = FeatureCache() if cfg.feature_cache else None
    feats = {
        split: encode_images(
            encoder,
            split_images(data.splits[split]),
            levels=segmentation,
            cache=cache,
            name=f"{name}-{split}-{'levels' if segmentation else 'pooled'}".replace("/", "_"),
            progress=progress,
        )
        for split in ("train", "test")
    }
    result["encoder"] = encoder.cache_id
    if segmentation:
        result["ceilings"] = _segmentation(
            data, feats, encoder.preprocess.size, probe_epochs, progress
        )
    else:
        pooled = {k: v["pooled"].numpy() for k, v in feats.items()}
        result["ceilings"] = _classification(data, pooled, name)
    return result
