"""Evaluate a finished run on any split, and predict on one input, from ``RUN_DIR/adapter``
(:mod:`mmtune.training.adapter`; copied anywhere, it loads the same) or, for runs saved by
mmtune < 0.3, from ``RUN_DIR/final``.

A run directory holds ``final/config.json`` (the TrainConfig), ``final/spec.json`` (what the
data decided: task, widths, class names, preprocessing), ``final/trainable.safetensors``
(every trainable tensor: infusion, head, sequence encoders) and ``final/manifest.json`` (the
SHA-256 of the three, checked before anything is read). The frozen models are reloaded from
their own sources, so a run directory stays a few MB.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtune.encoders.images import ImagePreprocess, to_rgb_array
from mmtune.encoders.sequence import SequenceEncoderConfig
from mmtune.encoders.vision import load_vision_encoder
from mmtune.heads import SegmentationDecoderConfig
from mmtune.methods.concat import ConcatConfig, PeftAdapterConfig
from mmtune.methods.mit import MiTConfig
from mmtune.methods.registry import split_legacy_method
from mmtune.models.llm import QuantizationConfig, load_llm
from mmtune.tasks import get_task
from mmtune.tasks.model import TaskConfig, TaskModel, collate
from mmtune.training.adapter import (
    RUN_FILE as RUN_ADAPTER_FILE,
)
from mmtune.training.adapter import (
    find_run_adapter,
    load_run_adapter_weights,
    read_run_file,
)
from mmtune.training.build import build, make_model
from mmtune.training.config import ModelConfig, OptimConfig, TrainConfig
from mmtune.training.evaluation import evaluate_split, headline_metric, reliance
from mmtune.training.final import load_trainable, verify_final
from mmtune.utils.io import read_json, write_json
from mmtune.utils.progress import Progress

__all__ = ["evaluate_run", "load_config", "load_run", "predict", "write_eval"]


def load_config(run: str | Path) -> TrainConfig:
    """The TrainConfig of a finished run (or of its ``adapter/``), after checking the manifest."""
    adapter = find_run_adapter(run)
    if adapter is not None:
        path, raw = adapter / RUN_ADAPTER_FILE, read_run_file(adapter)["config"]
    else:
        path = verify_final(Path(run)) / "config.json"
        raw = read_json(path, "run config")
    try:
        raw = dict(raw)
        if isinstance(raw.get("peft"), dict):  # mmtune < 0.4: the adapters' options
            raw["peft_config"], raw["peft"] = raw.pop("peft"), "none"
        raw["method"], raw["peft"] = split_legacy_method(
            raw["method"], raw.get("peft", "none"), str(path), warn=False
        )
        model = dict(raw["model"])
        model["sequence"] = SequenceEncoderConfig(**model["sequence"])
        model["decoder"] = SegmentationDecoderConfig(**model["decoder"])
        model["quantization"] = QuantizationConfig(**model.get("quantization", {}))
        return TrainConfig(
            **{
                **raw,
                # runs made before the field existed scaled I not at all
                "task": TaskConfig(**{"modality_norm": "none", **raw["task"]}),
                "model": ModelConfig(**model),
                "mit": MiTConfig(**raw["mit"]),
                "concat": ConcatConfig(**raw.get("concat", {})),
                "peft_config": PeftAdapterConfig(**raw.get("peft_config", {})),
                "optim": OptimConfig(**raw["optim"]),
            }
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a TrainConfig of this mmtune version ({e})") from e


def _spec(run: Path) -> dict[str, Any]:
    adapter = find_run_adapter(run)
    if adapter is not None:
        return read_run_file(adapter)["spec"]
    return read_json(run / "final" / "spec.json", "run spec")


def _load_weights(model: TaskModel, run: Path) -> None:
    """The trained tensors from ``adapter/`` (mmtune >= 0.3) or else ``final/``."""
    adapter = find_run_adapter(run)
    if adapter is not None:
        load_run_adapter_weights(model, adapter)
    else:
        load_trainable(model, run / "final" / "trainable.safetensors")


def load_run(run: str | Path) -> tuple[TrainConfig, dict[str, Any], TaskModel]:
    """(config, spec, task model with trained weights) of a finished run, without its data.

    ``run`` is a run directory or its ``adapter/`` (which may be copied anywhere): the frozen
    models are rebuilt from the names it records, the trained tensors copied in."""
    run = Path(run)
    cfg = load_config(run)
    spec = _spec(run)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    llm, tokenizer = load_llm(
        cfg.model.llm,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        quantization=cfg.model.quantization,
    )
    model = make_model(cfg, spec, llm, tokenizer)
    model.lower_cache = None
    _load_weights(model, run)
    return cfg, spec, model.eval()


def evaluate_run(
    run: str | Path, split: str = "test", write: bool = True, progress: Progress | None = None
) -> dict[str, Any]:
    """Score a finished run on a split of its data; with ``write``, also writes
    ``eval-<split>.json`` in the run (see :func:`write_eval`). ``progress`` hears the image
    encoding, the evaluation and the reliance check (:mod:`mmtune.utils.progress`)."""
    from accelerate import Accelerator

    run = Path(run)
    cfg = load_config(run)
    model, splits, _, _ = build(cfg, progress)
    if split not in splits:
        raise ValueError(f"no split {split!r}; the data has {list(splits)}")
    model.lower_cache = None
    _load_weights(model, run)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    result = evaluate_split(
        model,
        splits[split],
        accelerator,
        cfg.optim.eval_batch_size,
        progress=progress,
        stage=f"eval {split}",
    )
    rows = result.pop("rows")
    result["split"] = split
    key = headline_metric(model.task)
    result["reliance"] = reliance(
        model,
        splits[split],
        accelerator,
        cfg.optim.eval_batch_size,
        {key: result["metrics"][key]},
        progress=progress,
        rows=rows,
    )
    if write:
        write_eval(run, result)
    return result


def write_eval(run: str | Path, result: dict[str, Any]) -> Path:
    """Write an evaluation result as ``RUN/eval-<split>.json``."""
    return write_json(Path(run) / f"eval-{result['split']}.json", result)


@torch.no_grad()
def predict(
    run: str | Path,
    text: str,
    image: str | Path | None = None,
    frames: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """One input through a finished run: a class, a mask (saved as an overlay PNG) or a score.

    An input the run does not read (an image for a sentiment run, frames for an image run or
    a text-only one) is named in a warning and ignored.
    """
    if out is not None and Path(out).is_dir():
        raise IsADirectoryError(21, "is a directory; --out names the overlay PNG file", str(out))
    if not str(text).strip():
        raise ValueError("text: empty; give the expression, hypothesis, title or sentence")
    cfg, spec, model = load_run(run)
    task = spec["task"]
    kind = get_task(task)
    reads_frames = not kind.reads_image and (
        model.frames is not None or model.projector is not None
    )
    if image is not None and not kind.reads_image:
        warnings.warn(f"--image {image}: a {task} run reads no image; ignored", stacklevel=2)
    if frames is not None and not reads_frames:
        warnings.warn(f"--frames {frames}: this {task} run reads no frames; ignored", stacklevel=2)
        frames = None
    item: dict[str, Any] = {
        "id": "input",
        kind.text_field: text,
    }
    rgb = None
    if kind.reads_image:
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
        data = _read_frames(Path(frames), model.config.modalities)
        for m, arr in data.items():
            item[m], item[f"{m}_length"] = arr, len(arr)
    elif model.frames is not None or (not kind.reads_image and model.projector is not None):
        raise ValueError(f"this run reads {model.config.modalities} frames: pass --frames FILE.npz")
    batch = collate([item], task, spec.get("pixel_size"))
    try:
        output = model(batch)
    except ValueError as e:
        if frames is None:
            raise
        raise ValueError(f"{frames}: {e}") from e  # the input the user gave
    return kind.answer(output, spec, rgb, None if out is None else Path(out))


def _read_frames(path: Path, modalities: list[str]) -> dict[str, np.ndarray]:
    """The (T, width) frame arrays of an .npz file; errors name the file and the array."""
    if not path.is_file():
        raise FileNotFoundError(2, "no such file (--frames, an .npz)", str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {m: data[m] for m in modalities if m in data.files}
            names = list(data.files)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz of frame arrays ({e})") from e
    out = {}
    for m in modalities:
        if m not in arrays:
            raise ValueError(f"{path}: no array {m!r} (has {names})")
        arr = arrays[m]
        if arr.ndim != 2 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(
                f"{path}: array {m!r} must be numeric (frames, width) with >= 1 frame; got "
                f"{arr.dtype} {arr.shape}"
            )
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: array {m!r} holds NaN or infinite values (or overflows)")
        out[m] = arr
    return out
