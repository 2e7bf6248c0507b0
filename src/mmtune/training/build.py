"""What a run trains: its data (frozen features computed once, cached on disk) and task model."""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mmtune.data import load_dataset
from mmtune.data.base import DataSplits, TaskDataset, check_options
from mmtune.data.mini import MINI_BENCHMARKS
from mmtune.encoders.vision import encode_images, load_vision_encoder
from mmtune.methods.concat import inject_peft
from mmtune.methods.mit import MiTConfig, MiTModel, inject_mit
from mmtune.methods.registry import get_method
from mmtune.models.llm import enable_activation_checkpointing, load_llm
from mmtune.models.partial import LowerLayerCache
from mmtune.tasks import get_task
from mmtune.tasks.model import TaskConfig, TaskModel
from mmtune.utils.cache import FeatureCache
from mmtune.utils.progress import Progress

if TYPE_CHECKING:
    from mmtune.training.config import TrainConfig

__all__ = ["FeaturedSplit", "build", "light_items", "load_task_data", "make_model", "split_images"]


def load_task_data(cfg: TaskConfig) -> DataSplits:
    if cfg.data in MINI_BENCHMARKS:
        generator = MINI_BENCHMARKS[cfg.data]
        check_options(generator, cfg.data_options, "task.data_options")
        return generator(**cfg.data_options)
    return load_dataset(cfg.data, cfg.format, where="task.data_options", **cfg.data_options)


def _check_ids(name: str, split: str, items: list[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        sid = str(item["id"])
        if sid in seen:
            raise ValueError(
                f"{name}, split {split!r}: samples {seen[sid]} and {i} share the id {sid!r}; "
                "every sample needs its own id (results are gathered by id)"
            )
        seen[sid] = i


def split_images(split: TaskDataset) -> list[Any]:
    """What the frozen encoder reads for every item of ``split`` (paths or arrays)."""
    return [split.image_source(i) for i in range(len(split))]


def light_items(split: TaskDataset) -> list[dict[str, Any]]:
    """Every item without its decoded image (the frozen features stand in for it)."""
    out = []
    for i in range(len(split)):
        item = split.scoring_item(i)
        item.setdefault("id", f"{i}")
        out.append(item)
    return out


class FeaturedSplit(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]], features: dict[str, torch.Tensor]):
        self.items, self.features = items, features

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.items[i], **{k: v[i] for k, v in self.features.items()}}


def _image_splits(
    cfg: TrainConfig, data: DataSplits, progress: Progress | None
) -> tuple[dict[str, FeaturedSplit], dict[str, Any], dict[str, Any]]:
    """Every split's frozen image features (cached on disk when asked), the spec entries the
    encoder decides, and what the encoding cost."""
    kind = get_task(data.task)
    splits: dict[str, FeaturedSplit] = {}
    encoder = load_vision_encoder(cfg.model.vision)
    if cfg.model.image_size:
        size = cfg.model.image_size
        encoder.preprocess = dataclasses.replace(
            encoder.preprocess, size=size, resize=max(size, round(size * 256 / 224))
        )
    if kind.needs_feature_maps:  # the whole image, squashed: masks map back to every pixel
        encoder.preprocess = dataclasses.replace(encoder.preprocess, resize=None)
    cache = FeatureCache() if cfg.feature_cache else None
    start = time.perf_counter()
    hits = []
    for name, split in data.splits.items():
        split.check_image_sizes()  # RefCOCO: masks are scored at that size
        feats = encode_images(
            encoder,
            split_images(split),
            levels=kind.needs_feature_maps or get_method(cfg.method).needs_feature_maps,
            cache=cache,
            name=f"{cfg.task.data}-{name}".replace("/", "_"),
            progress=progress,
        )
        hits.append(bool(cache and cache.last_hit))
        splits[name] = FeaturedSplit(light_items(split), feats)
    features = {
        "encoder": encoder.cache_id,
        "seconds": time.perf_counter() - start,
        "cache_hits": hits,
    }
    extra = {
        "preprocess": encoder.preprocess.to_dict(),
        "d_image": encoder.d_global,
        "level_channels": encoder.level_channels,
        "num_classes": len(data.label_names),
        "pixel_size": encoder.preprocess.size,
    }
    return splits, extra, features


def build(
    cfg: TrainConfig, progress: Progress | None = None
) -> tuple[TaskModel, dict[str, FeaturedSplit], DataSplits, dict[str, Any]]:
    """Load data, frozen models and encoders; inject MiT; return the task model and splits.

    ``progress`` hears the embedded LLM's one-off conversion and the image encoding."""
    torch.manual_seed(cfg.seed)
    data = load_task_data(cfg.task)
    for split in (cfg.task.val_split, cfg.task.test_split, "train"):
        if split not in data.splits:
            raise ValueError(
                f"{data.name}: no split {split!r} (has {list(data.splits)}); set "
                f"task.val_split / task.test_split"
            )
    task = data.task
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    llm, tokenizer = load_llm(
        cfg.model.llm,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        progress=progress,
        quantization=cfg.model.quantization,
    )
    info: dict[str, Any] = {"data": data.name, "task": task, "splits": data.sizes()}
    splits: dict[str, FeaturedSplit] = {}
    extra: dict[str, Any] = {}
    kind = get_task(task)
    if kind.reads_image:
        splits, extra, info["features"] = _image_splits(cfg, data, progress)
        d_modality = extra["d_image"]
    else:
        for name, split in data.splits.items():
            splits[name] = FeaturedSplit(light_items(split), {})
        first = splits["train"][0]
        extra = {
            "frame_widths": {
                m: int(np.asarray(first[m]).shape[-1]) for m in ("audio", "vision") if m in first
            }
        }
        d_modality = cfg.model.sequence.d_out * len(cfg.task.modalities)
    for name, ds in splits.items():
        _check_ids(data.name, name, ds.items)
    if cfg.task.max_train_samples:
        splits["train"].items = splits["train"].items[: cfg.task.max_train_samples]
        splits["train"].features = {
            k: v[: cfg.task.max_train_samples] for k, v in splits["train"].features.items()
        }
    if cfg.task.modality_norm in ("standardize", "unit") and "pooled" in splits["train"].features:
        pooled = splits["train"].features["pooled"].double()  # (N, d_I)
        extra["modality_stats"] = (
            pooled.mean(0).tolist(),
            pooled.std(0).clamp_min(1e-6).tolist(),  # a constant dimension stays 0
        )
    extra.update(task=task, d_modality=d_modality, label_names=list(data.label_names))
    model = make_model(cfg, extra, llm, tokenizer)
    _warn_cut_prompts(model, splits)
    info["model"] = extra
    return model, splits, data, info


def _warn_cut_prompts(model: TaskModel, splits: dict[str, FeaturedSplit]) -> None:
    """One warning with the number of prompts whose text ``max_length`` cuts."""
    field_name = get_task(model.task).text_field
    cut = total = 0
    for ds in splits.values():
        texts = [item[field_name] for item in ds.items]
        cut += model.fit_prompts(texts)[1]
        total += len(texts)
    if cut:
        warnings.warn(
            f"{cut} of {total} prompts are longer than task.max_length="
            f"{model.config.max_length} tokens: their text is cut at its end (the template "
            "and the text's start stay); raise task.max_length to keep them whole",
            stacklevel=3,
        )


def make_model(cfg: TrainConfig, spec: dict[str, Any], llm: nn.Module, tokenizer: Any) -> TaskModel:
    """The task model from a run's config and its data-derived spec (saved as final/spec.json)."""
    d_modality = spec["d_modality"]
    method = cfg.method
    reads = get_method(method).reads  # vector: MiT; tokens: concat; nothing: text only
    if reads != "vector":
        wrapped: nn.Module = llm
        llm.requires_grad_(False)
        if cfg.peft != "none":
            inject_peft(llm, cfg.peft, cfg.peft_config)
    elif d_modality:
        mit_cfg = MiTConfig(**{**asdict(cfg.mit), "d_modality": cfg.mit.d_modality or d_modality})
        if mit_cfg.d_modality != d_modality:
            raise ValueError(f"mit.d_modality {mit_cfg.d_modality} != the encoder's {d_modality}")
        wrapped = inject_mit(llm, mit_cfg)
    else:
        llm.requires_grad_(False)
        wrapped = llm
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(llm)
    model = TaskModel(
        spec["task"],
        wrapped,
        tokenizer,
        cfg.task,
        d_image=spec.get("d_image", 0),
        level_channels=spec.get("level_channels"),
        num_classes=spec.get("num_classes", 0),
        frame_widths=spec.get("frame_widths"),
        sequence=cfg.model.sequence,
        decoder=cfg.model.decoder,
        pixel_size=spec.get("pixel_size"),
        method=method,
        concat=cfg.concat,
        modality_stats=spec.get("modality_stats"),
    )
    lower_ok = cfg.task.pooling == "last"  # a trainable task token enters at layer 0
    if cfg.cache_lower_layers and lower_ok:
        if isinstance(wrapped, MiTModel) and min(wrapped.layer_ids) > 1:
            model.lower_cache = LowerLayerCache(min(wrapped.layer_ids))
        elif reads == "nothing" or (reads == "vector" and not d_modality):  # all frozen
            model.lower_cache = LowerLayerCache(wrapped.config.num_hidden_layers + 1)
    return model
