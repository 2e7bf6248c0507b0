"""Evaluate a finished run on any split, and predict on one input, from ``RUN_DIR/final``.

A run directory holds ``final/config.json`` (the TrainConfig), ``final/spec.json`` (what the
data decided: task, widths, class names, preprocessing) and ``final/trainable.safetensors``
(every trainable tensor: infusion, head, sequence encoders). The frozen models are reloaded from
their own sources, so a run directory stays a few MB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmtune.encoders.images import ImagePreprocess, to_rgb_array
from mmtune.encoders.sequence import SequenceEncoderConfig
from mmtune.encoders.vision import load_vision_encoder
from mmtune.heads import SegmentationDecoderConfig
from mmtune.methods.base import atomic_write
from mmtune.methods.concat import ConcatConfig, PeftAdapterConfig
from mmtune.methods.mit import MiTConfig
from mmtune.models.llm import load_llm
from mmtune.pipeline import TaskConfig, TaskModel, collate
from mmtune.train import (
    ModelConfig,
    OptimConfig,
    TrainConfig,
    build,
    evaluate_split,
    load_trainable,
    make_model,
)

__all__ = ["evaluate_run", "load_config", "load_run", "predict"]


def load_config(run: str | Path) -> TrainConfig:
    path = Path(run) / "final" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; is {run} a finished mmtune run?")
    raw = json.loads(path.read_text())
    model = dict(raw["model"])
    model["sequence"] = SequenceEncoderConfig(**model["sequence"])
    model["decoder"] = SegmentationDecoderConfig(**model["decoder"])
    return TrainConfig(
        **{
            **raw,
            "task": TaskConfig(**raw["task"]),
            "model": ModelConfig(**model),
            "mit": MiTConfig(**raw["mit"]),
            "concat": ConcatConfig(**raw.get("concat", {})),
            "peft": PeftAdapterConfig(**raw.get("peft", {})),
            "optim": OptimConfig(**raw["optim"]),
        }
    )


def load_run(run: str | Path) -> tuple[TrainConfig, dict[str, Any], TaskModel]:
    """(config, spec, task model with trained weights) of a finished run, without its data."""
    run = Path(run)
    cfg = load_config(run)
    spec = json.loads((run / "final" / "spec.json").read_text())
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    llm, tokenizer = load_llm(
        cfg.model.llm, dtype=dtype, attn_implementation=cfg.model.attn_implementation
    )
    model = make_model(cfg, spec, llm, tokenizer)
    model.lower_cache = None
    load_trainable(model, run / "final" / "trainable.safetensors")
    return cfg, spec, model.eval()


def evaluate_run(run: str | Path, split: str = "test") -> dict[str, Any]:
    """Score a finished run on a split of its data; writes ``eval-<split>.json`` in the run."""
    from accelerate import Accelerator

    run = Path(run)
    cfg = load_config(run)
    model, splits, _, _ = build(cfg)
    if split not in splits:
        raise ValueError(f"no split {split!r}; the data has {list(splits)}")
    model.lower_cache = None
    load_trainable(model, run / "final" / "trainable.safetensors")
    result = evaluate_split(
        model,
        splits[split],
        Accelerator(cpu=not torch.cuda.is_available()),
        cfg.optim.eval_batch_size,
    )
    result.pop("rows")
    result["split"] = split
    with atomic_write(run / f"eval-{split}.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def predict(
    run: str | Path,
    text: str,
    image: str | Path | None = None,
    frames: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """One input through a finished run: a class, a mask (saved as an overlay PNG) or a score."""
    cfg, spec, model = load_run(run)
    task = spec["task"]
    item: dict[str, Any] = {
        "id": "input",
        ("expression" if task == "segmentation" else "text"): text,
    }
    if task in ("classification", "segmentation"):
        if image is None:
            raise ValueError(f"a {task} run needs --image")
        encoder = load_vision_encoder(cfg.model.vision)
        encoder.preprocess = ImagePreprocess(**spec["preprocess"])
        rgb = to_rgb_array(image, where=str(image))
        feats = encoder.encode([rgb])
        item["pooled"] = feats.pooled[0]
        for i, level in enumerate(feats.levels):
            item[f"level{i}"] = level[0]
    elif frames is not None:
        data = np.load(frames)
        for m in model.config.modalities:
            if m not in data:
                raise ValueError(f"{frames}: no array {m!r} (has {list(data)})")
            item[m], item[f"{m}_length"] = data[m].astype(np.float32), len(data[m])
    elif model.frames is not None or (task == "sentiment" and model.projector is not None):
        raise ValueError(f"this run reads {model.config.modalities} frames: pass --frames FILE.npz")
    batch = collate([item], task, spec.get("pixel_size"))
    output = model(batch)
    if task == "classification":
        probs = output["logits"].softmax(-1)[0]
        k = int(probs.argmax())
        return {"class": spec["label_names"][k], "index": k, "probability": float(probs[k])}
    if task == "sentiment":
        return {"score": float(output["prediction"][0])}
    logits = F.interpolate(
        output["logits"], size=rgb.shape[:2], mode="bilinear", align_corners=False
    )[0, 0]
    mask = (logits > 0).numpy()
    out = Path(out or "prediction.png")
    overlay = rgb.astype(np.float32)
    overlay[mask] = 0.45 * overlay[mask] + 0.55 * np.array([255.0, 40.0, 40.0])
    from PIL import Image

    with atomic_write(out) as tmp:
        Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")
    return {"mask_pixels": int(mask.sum()), "overlay": str(out)}
