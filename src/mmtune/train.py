"""Training and evaluation on Hugging Face accelerate: one code path for 1 CPU process or N GPUs.

Launch: ``mmtune train CONFIG.yaml`` (one process), or ``torchrun --nproc_per_node N -m
mmtune.cli train CONFIG.yaml`` (DDP; gloo on CPU, NCCL on GPUs). Every rank sees a disjoint
shard of each global batch, drawn from a permutation seeded by (seed, epoch), so a run's data
order never depends on the number of restarts. Evaluation splits a data set into contiguous
per-rank chunks and gathers per-sample results by id, so every sample is scored exactly once.

Each epoch ends with a checkpoint directory ``checkpoints/epoch-NNN`` (trainable weights,
optimizer, scheduler, every rank's RNG state, history: safetensors + JSON under a SHA-256
manifest, :mod:`mmtune.training.checkpoint`), built under a temporary name and renamed into
place: ``resume`` continues from the newest intact one, bit for bit on CPU.

The output directory belongs to the run (:mod:`mmtune.training.rundir`): it is checked for
writing before any work, locked for the run's life, refused when it holds another run (unless
``resume`` with the same settings or ``overwrite``), and the final outputs appear together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mmtune._version import __version__
from mmtune.data import load_dataset
from mmtune.data.base import DataSplits, check_options
from mmtune.data.mini import MINI_BENCHMARKS
from mmtune.encoders.sequence import SequenceEncoderConfig
from mmtune.encoders.vision import encode_images, load_vision_encoder
from mmtune.heads import SegmentationDecoderConfig
from mmtune.methods.concat import ConcatConfig, PeftAdapterConfig, inject_peft
from mmtune.methods.mit import MiTConfig, MiTModel, inject_mit
from mmtune.metrics import (
    classification_metrics,
    mask_intersection_union,
    segmentation_metrics,
    sentiment_metrics,
)
from mmtune.models.cache import FeatureCache, content_hash
from mmtune.models.llm import load_llm
from mmtune.pipeline import LowerLayerCache, TaskConfig, TaskModel, collate
from mmtune.training import checkpoint as ckpt
from mmtune.training.adapter import write_run_adapter
from mmtune.training.rundir import (
    RUN_FILE,
    Finisher,
    RunLock,
    check_writable,
    claim,
    clear,
)
from mmtune.utils.io import (
    atomic_write,
    copy_tensors_into,
    load_tensors,
    save_tensors,
    verify_manifest,
    write_json,
    write_manifest,
)
from mmtune.utils.progress import Progress, report, tracked

__all__ = [
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "evaluate_split",
    "load_train_config",
    "load_trainable",
    "train",
]


@dataclass
class ModelConfig:
    """The frozen models and the trainable encoders' shapes."""

    llm: str = "smollm2-135m"
    """LLM: an embedded name, a directory or a hub id."""
    vision: str = "mobilenet-v2"
    """Vision encoder: a registered name, a directory or a hub id (image tasks)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen LLM (the trainable parts stay fp32)."""
    attn_implementation: str = "sdpa"
    """Attention backend of the LLM: sdpa, eager, flash_attention_2."""
    image_size: int | None = None
    """Input side of a CNN vision encoder (default: its own, 224 for MobileNetV2); ViTs keep
    their fixed size."""
    sequence: SequenceEncoderConfig = field(default_factory=SequenceEncoderConfig)
    """Sentiment: shape of each frame encoder (d_in is set from the data)."""
    decoder: SegmentationDecoderConfig = field(default_factory=SegmentationDecoderConfig)
    """Segmentation: shape of the decoder."""


@dataclass
class OptimConfig:
    """Optimiser and schedule (defaults: the paper's sec. 3.3)."""

    lr: float = 4e-5
    """Adam learning rate of the infusion (and sequence encoders)."""
    head_lr_scale: float = 0.1
    """The head's learning rate is lr x this (the paper: decoder lr x 0.1)."""
    epochs: int = 30
    """Passes over the training split."""
    decay_every: int | None = 10
    """Multiply the learning rates by decay_gamma every this many epochs (null: no decay)."""
    decay_gamma: float = 0.1
    """Step-decay factor."""
    batch_size: int = 8
    """Samples per step on each process."""
    eval_batch_size: int = 32
    """Samples per forward in evaluation."""
    grad_clip: float = 1.0
    """Max gradient norm (0: off)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("OptimConfig: epochs, batch_size and eval_batch_size must be >= 1")
        if self.lr <= 0 or self.head_lr_scale <= 0:
            raise ValueError("OptimConfig: lr and head_lr_scale must be > 0")
        if self.decay_every is not None and self.decay_every < 1:
            raise ValueError(
                f"optim.decay_every must be >= 1, or null for no decay; got {self.decay_every}"
            )
        if not 0 < self.decay_gamma <= 1:
            raise ValueError(f"optim.decay_gamma must be in (0, 1], got {self.decay_gamma}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0: off), got {self.grad_clip}")


REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
Method = Literal["mit", "text", "concat", "concat_lora", "concat_ia3"]
METHOD_NAMES: tuple[str, ...] = ("mit", "text", "concat", "concat_lora", "concat_ia3")


@dataclass
class TrainConfig:
    """One training run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    """Data, prompt and task options."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Frozen models and trainable encoder shapes."""
    method: Method = "mit"
    """How the modality reaches the frozen LLM: ``mit`` (infusion); ``text`` (it does not:
    text-only baseline); ``concat`` (projected tokens before the text, projector trained);
    ``concat_lora`` / ``concat_ia3`` (the same plus LoRA / IA3 adapters in the LLM, via PEFT)."""
    mit: MiTConfig = field(default_factory=MiTConfig)
    """MiT (d_modality is set from the modality encoder when left empty)."""
    concat: ConcatConfig = field(default_factory=ConcatConfig)
    """Token concatenation (methods concat, concat_lora, concat_ia3)."""
    peft: PeftAdapterConfig = field(default_factory=PeftAdapterConfig)
    """LoRA / IA3 adapters (methods concat_lora, concat_ia3)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    output_dir: str = "runs/train"
    """Where checkpoints, results.json, TensorBoard logs and pictures go."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    resume: bool = False
    """Continue the run in output_dir from its newest intact checkpoint; every setting except
    optim.epochs must match the run's."""
    overwrite: bool = False
    """Replace the run already in output_dir (its results, weights and checkpoints are removed)."""
    cache_lower_layers: bool = True
    """Compute the hidden states below the first infused layer once (they do not depend on I)."""
    feature_cache: bool = True
    """Store frozen-encoder features in $MMTUNE_CACHE and reuse them across runs."""
    keep_checkpoints: int = 2
    """How many epoch checkpoints to keep (the newest intact ones; at least 1)."""
    plots: bool = True
    """Write PNG pictures (curves, masks or scatter)."""
    report_to: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    """Where the training loss and the val metrics are logged, through accelerate's trackers:
    ``tensorboard`` (``output_dir/tensorboard``), ``wandb`` or ``mlflow`` (their packages
    installed and set up by you), or ``none``."""

    def __post_init__(self) -> None:
        if self.report_to not in REPORT_TO:
            raise ValueError(
                f"TrainConfig.report_to must be one of {', '.join(REPORT_TO)}; got "
                f"{self.report_to!r}"
            )
        if self.method not in METHOD_NAMES:
            raise ValueError(
                f"TrainConfig.method must be one of {', '.join(METHOD_NAMES)}; got {self.method!r}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: choose one")


def load_train_config(path: str | Path) -> TrainConfig:
    """The TrainConfig a YAML file describes, exactly as ``mmtune train PATH`` reads it.

    The file's keys are TrainConfig's fields (``task:``, ``optim:`` ...); jsonargparse checks
    every key and type, so a misspelt field is a one-line error naming it. Nothing in the file
    is executed (yaml safe loading)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TrainConfig)
    try:
        ns = parser.parse_path(str(path))
    except argparse.ArgumentError as e:
        raise ValueError(f"{path}: {e}") from None
    init = parser.instantiate(ns)
    return TrainConfig(**{k: v for k, v in vars(init).items() if k != "__path__"})


# ----------------------------------------------------------------------------- data


def _load_data(cfg: TaskConfig) -> DataSplits:
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


def _images(split: Any) -> list[Any]:
    if hasattr(split, "image_path"):  # RefCOCO
        return [split.image_path(i) for i in range(len(split))]
    if hasattr(split, "records"):  # image-text records: decode from their files
        return [r["image_path"] for r in split.records]
    return [split[i]["image"] for i in range(len(split))]


def _light_items(split: Any) -> list[dict[str, Any]]:
    """Every item without its decoded image (the frozen features stand in for it)."""
    out = []
    for i in range(len(split)):
        if hasattr(split, "samples"):  # RefCOCO: the mask needs only the annotation
            item = {**split.samples[i], "mask": split.mask(i)}
        elif hasattr(split, "metadata"):
            item = dict(split.metadata(i))
        else:
            item = dict(split[i])
        item.pop("image", None)
        item.setdefault("id", f"{i}")
        out.append(item)
    return out


class _Featured(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]], features: dict[str, torch.Tensor]):
        self.items, self.features = items, features

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.items[i], **{k: v[i] for k, v in self.features.items()}}


# ----------------------------------------------------------------------------- building


def build(
    cfg: TrainConfig, progress: Progress | None = None
) -> tuple[TaskModel, dict[str, _Featured], DataSplits, dict[str, Any]]:
    """Load data, frozen models and encoders; inject MiT; return the task model and splits.

    ``progress`` hears the embedded LLM's one-off conversion and the image encoding."""
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg.task)
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
    )
    info: dict[str, Any] = {"data": data.name, "task": task, "splits": data.sizes()}
    splits: dict[str, _Featured] = {}
    extra: dict[str, Any] = {}
    if task in ("classification", "segmentation"):
        encoder = load_vision_encoder(cfg.model.vision)
        if cfg.model.image_size:
            size = cfg.model.image_size
            encoder.preprocess = dataclasses.replace(
                encoder.preprocess, size=size, resize=max(size, round(size * 256 / 224))
            )
        if task == "segmentation":  # the whole image, squashed: masks map back to every pixel
            encoder.preprocess = dataclasses.replace(encoder.preprocess, resize=None)
        cache = FeatureCache() if cfg.feature_cache else None
        start = time.perf_counter()
        hits = []
        for name, split in data.splits.items():
            if hasattr(split, "check_image_sizes"):  # RefCOCO: masks are scored at that size
                split.check_image_sizes()
            feats = encode_images(
                encoder,
                _images(split),
                levels=task == "segmentation" or cfg.method.startswith("concat"),
                cache=cache,
                name=f"{cfg.task.data}-{name}".replace("/", "_"),
                progress=progress,
            )
            hits.append(bool(cache and cache.last_hit))
            splits[name] = _Featured(_light_items(split), feats)
        info["features"] = {
            "encoder": encoder.cache_id,
            "seconds": time.perf_counter() - start,
            "cache_hits": hits,
        }
        d_modality = encoder.d_global
        extra = {
            "preprocess": encoder.preprocess.to_dict(),
            "d_image": encoder.d_global,
            "level_channels": encoder.level_channels,
            "num_classes": len(data.label_names),
            "pixel_size": encoder.preprocess.size,
        }
        del encoder
    else:
        for name, split in data.splits.items():
            splits[name] = _Featured(_light_items(split), {})
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


def _warn_cut_prompts(model: TaskModel, splits: dict[str, _Featured]) -> None:
    """One warning with the number of prompts whose text ``max_length`` cuts."""
    field_name = "expression" if model.task == "segmentation" else "text"
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
    method = "concat" if cfg.method.startswith("concat") else cfg.method
    if method != "mit":
        wrapped: nn.Module = llm
        llm.requires_grad_(False)
        if cfg.method in ("concat_lora", "concat_ia3"):
            inject_peft(llm, cfg.method.removeprefix("concat_"), cfg.peft)
    elif d_modality:
        mit_cfg = MiTConfig(**{**asdict(cfg.mit), "d_modality": cfg.mit.d_modality or d_modality})
        if mit_cfg.d_modality != d_modality:
            raise ValueError(f"mit.d_modality {mit_cfg.d_modality} != the encoder's {d_modality}")
        wrapped = inject_mit(llm, mit_cfg)
    else:
        llm.requires_grad_(False)
        wrapped = llm
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
        elif method == "text" or (method == "mit" and not d_modality):  # the whole LLM is frozen
            model.lower_cache = LowerLayerCache(wrapped.config.num_hidden_layers + 1)
    return model


# ----------------------------------------------------------------------------- loop helpers


def _batches(
    ds: _Featured,
    indices: list[int],
    size: int,
    task: str,
    pixel: int | None,
    swap: tuple[list[int], dict[str, str]] | None = None,
):
    """Collated batches of ``indices``; with ``swap`` = (donors, {target: source}), each
    item's target fields are taken from its donor's source fields (the reliance check)."""
    for s in range(0, len(indices), size):
        items = [ds[i] for i in indices[s : s + size]]
        if swap is not None:
            donors, fields = swap
            for item, i in zip(items, indices[s : s + size], strict=True):
                donor = ds[donors[i]]
                item.update({target: donor[source] for target, source in fields.items()})
        yield collate(items, task, pixel)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_split(
    model: TaskModel,
    ds: _Featured,
    accelerator: Any,
    batch_size: int,
    with_predictions: bool = False,
    donors: list[int] | None = None,
    progress: Progress | None = None,
    stage: str = "eval",
) -> dict[str, Any]:
    """Score a split; each rank takes a contiguous chunk, results are gathered by sample id.

    With ``donors``, sample i reads the modality of sample ``donors[i]`` (see
    :func:`reliance`). ``progress`` hears ``stage`` once per batch."""
    module = accelerator.unwrap_model(model)
    was_training = module.training
    module.eval()
    chunks = np.array_split(np.arange(len(ds)), accelerator.num_processes)
    mine = chunks[accelerator.process_index].tolist()
    rows: list[dict[str, Any]] = []
    swap = None if donors is None else (donors, module.modality_fields())
    batches = _batches(ds, mine, batch_size, module.task, module.pixel_size, swap)
    for batch in tracked(batches, progress, stage, -(-len(mine) // batch_size)):
        batch = _to_device(batch, accelerator.device)
        out = module(batch)
        for r, sid in enumerate(batch["id"]):
            row: dict[str, Any] = {"id": sid}
            if module.task == "classification":
                row.update(pred=int(out["prediction"][r]), label=int(batch["label"][r]))
            elif module.task == "sentiment":
                row.update(pred=float(out["prediction"][r]), label=float(batch["label"][r]))
            else:
                truth = batch["original_masks"][r]
                logits = torch.nn.functional.interpolate(
                    out["logits"][r : r + 1].float(),
                    size=truth.shape,
                    mode="bilinear",
                    align_corners=False,
                )
                pred = (logits[0, 0] > 0).cpu().numpy()  # sigmoid > 0.5, at the original size
                inter, union = mask_intersection_union(pred, truth)
                row.update(intersection=inter, union=union)
                if with_predictions:
                    row["mask"] = pred
            rows.append(row)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object(rows)
    else:
        gathered = rows
    by_id = {r["id"]: r for r in gathered}  # one row per sample, whatever the sharding
    ordered = [by_id[str(item["id"])] for item in ds.items]
    if module.task == "classification":
        result = classification_metrics([r["pred"] for r in ordered], [r["label"] for r in ordered])
    elif module.task == "sentiment":
        result = sentiment_metrics([r["pred"] for r in ordered], [r["label"] for r in ordered])
    else:
        result = segmentation_metrics(
            [r["intersection"] for r in ordered], [r["union"] for r in ordered]
        )
    result["rows"] = ordered
    module.train(was_training)
    return result


def _headline(task: str) -> str:
    return {"classification": "accuracy", "segmentation": "oIoU", "sentiment": "mae"}[task]


def reliance(
    model: TaskModel,
    ds: _Featured,
    accelerator: Any,
    batch_size: int,
    headline: dict[str, float],
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The headline metric again with every sample's modality taken from another sample.

    Donors come from a seeded derangement that avoids samples of the same image where the
    data names images (``image_id`` / ``image_path``); the drop is the model's reliance on
    the modality (DESIGN.md section 9). A model that reads no modality gets drop None.
    """
    from mmtune.metrics import RELIANCE_CONVENTIONS, derangement

    ((key, value),) = headline.items()
    fields = accelerator.unwrap_model(model).modality_fields()
    out: dict[str, Any] = {"metric": key, "headline": value, "swapped": sorted(fields)}
    if not fields or len(ds) < 2:
        return {**out, "deranged": None, "drop": None, "conventions": RELIANCE_CONVENTIONS}
    groups = [item.get("image_id", item.get("image_path")) for item in ds.items]
    donors = derangement(len(ds), seed, None if all(g is None for g in groups) else groups)
    deranged = evaluate_split(
        model, ds, accelerator, batch_size, donors=donors, progress=progress, stage="reliance"
    )["metrics"][key]
    drop = deranged - value if key in ("mae", "rmse") else value - deranged
    return {
        **out,
        "deranged": deranged,
        "drop": drop,
        "seed": seed,
        "conventions": RELIANCE_CONVENTIONS,
    }


def _trainable(module: TaskModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, path: Path) -> None:
    """Copy a trainable.safetensors into ``module``; its keys and shapes must be exactly the
    trainable ones, and its values finite."""
    weights = load_tensors(path, "trainable weights")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    copy_tensors_into(params, weights, path)


FINAL_FORMAT = "mmtune-final/1"
FINAL_FILES = ("trainable.safetensors", "config.json", "spec.json")


def verify_final(run: Path) -> Path:
    """``run/final`` after checking its manifest; a run saved before manifests existed loads
    with a warning, a damaged one is refused naming the file."""
    final = Path(run) / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(
            2, f"no such file; is {run} a finished mmtune run?", str(final / "config.json")
        )
    if not (final / "manifest.json").is_file():
        warnings.warn(
            f"{final}: records no SHA-256 (saved by mmtune < 0.2); loading unchecked",
            stacklevel=2,
        )
        return final
    verify_manifest(final, "final model")
    return final


def _write_final(final: Path, trainable: dict[str, torch.Tensor], cfg: TrainConfig, spec: dict):
    final.mkdir(parents=True, exist_ok=True)
    save_tensors(final / "trainable.safetensors", trainable)
    write_json(final / "config.json", asdict(cfg))
    write_json(final / "spec.json", spec)
    write_manifest(final, FINAL_FILES, format=FINAL_FORMAT, mmtune_version=__version__)


def _save_checkpoint(
    accelerator: Any,
    module: TaskModel,
    optimizer: Any,
    scheduler: Any,
    epoch: int,
    history: dict,
    out: Path,
    cfg: TrainConfig,
) -> None:
    final = out / "checkpoints" / f"epoch-{epoch:03d}"
    tmp = out / "checkpoints" / f".epoch-{epoch:03d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    ckpt.save_state(tmp, f"rng-rank{rank}", ckpt.rng_state())
    trainable = _trainable(module)
    digest = content_hash(trainable.values())  # every rank must hold the same weights
    with atomic_write(tmp / f"trainable-sha256-rank{rank}.txt") as part:  # ENOSPC names it
        part.write_text(digest + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        digests = {(tmp / f"trainable-sha256-rank{r}.txt").read_text() for r in range(world)}
        if len(digests) != 1:
            raise RuntimeError(
                f"{tmp}: the {world} processes hold different trainable weights after epoch "
                f"{epoch}; refusing to save a checkpoint that no rank could resume exactly"
            )
        save_tensors(tmp / "trainable.safetensors", trainable)
        ckpt.save_state(
            tmp,
            "state",
            {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "world_size": world,
                "config": asdict(cfg),
            },
        )
        files = [p.name for p in tmp.iterdir() if p.is_file()]
        write_manifest(tmp, files, format=ckpt.FORMAT, epoch=epoch, mmtune_version=__version__)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint appears complete or not at all
        ckpt.rotate(out, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def _load_checkpoint(
    path: Path, accelerator: Any, module: TaskModel, optimizer: Any, scheduler: Any
) -> tuple[int, dict]:
    state = ckpt.load_state(path, "state")
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"{path}: saved with {state['world_size']} processes, resumed with "
            f"{accelerator.num_processes}"
        )
    load_trainable(module, path / "trainable.safetensors")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(ckpt.load_state(path, f"rng-rank{accelerator.process_index}"))
    return state["epoch"], state["history"]


def _versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {
        "mmtune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


# ----------------------------------------------------------------------------- train


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The training order of an epoch: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _rebuild_cache(
    module: TaskModel,
    splits: dict[str, _Featured],
    cfg: TrainConfig,
    accelerator: Any,
    progress: Progress | None,
) -> None:
    """After a resume: the lower-layer states the interrupted run kept in epoch 1 (its training
    batches) and in its first validation (its evaluation batches), recomputed from the very
    same batches, so the resumed run reads exactly what an uninterrupted one would have."""
    task, pixel, rank = module.task, module.pixel_size, accelerator.process_index
    train_ds, b, world = splits["train"], cfg.optim.batch_size, accelerator.num_processes
    steps = len(train_ds) // (b * world)
    perm = _epoch_order(cfg.seed, 1, len(train_ds))
    batches: list[Any] = []
    if not module._lower_dropout():  # otherwise training kept none (TaskModel.text_vector)
        for step in range(steps):
            lo = step * b * world + rank * b
            batches.append((train_ds, perm[lo : lo + b]))
    val = splits[cfg.task.val_split]
    mine = np.array_split(np.arange(len(val)), world)[rank].tolist()  # as evaluate_split
    e = cfg.optim.eval_batch_size
    batches += [(val, mine[s : s + e]) for s in range(0, len(mine), e)]
    module.fill_lower_cache(
        _to_device(collate([ds[i] for i in idx], task, pixel), accelerator.device)
        for ds, idx in tracked(batches, progress, "lower-layer cache (resume)", len(batches))
    )


def _cache_saving(epochs: list[dict[str, Any]], first: int) -> dict[str, float | None]:
    """Seconds of the epoch that filled the cache against the mean of the cached ones."""
    filling = [e["seconds"] for e in epochs if e["epoch"] == first]
    cached = [e["seconds"] for e in epochs if e["epoch"] > first]
    if not filling:
        return {"filling_epoch_seconds": None, "cached_epoch_seconds": None}
    return {
        "filling_epoch_seconds": filling[0],
        "cached_epoch_seconds": float(np.mean(cached)) if cached else None,
    }


def _check_tracker(name: str) -> None:
    """A tracker whose package is missing is one clear error before any work."""
    if name in ("none", "tensorboard"):
        return
    from accelerate.utils import is_mlflow_available, is_wandb_available

    if not {"wandb": is_wandb_available, "mlflow": is_mlflow_available}[name]():
        raise ValueError(f"report_to: {name} needs the {name} package (pip install {name})")


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as one level of scalar values (what every tracker's hparams accept)."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(_flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, bool | int | float | str):
            flat[f"{prefix}{k}"] = v
        else:
            flat[f"{prefix}{k}"] = json.dumps(v)
    return flat


def train(cfg: TrainConfig, progress: Progress | bool | None = None) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate on the test split; returns the results dict.

    Before any work the output directory is checked for writing, locked for this run, and
    claimed (:func:`mmtune.training.rundir.claim`): a directory holding another run is refused
    unless ``resume`` (same settings) or ``overwrite``.

    ``progress`` (:mod:`mmtune.utils.progress`) hears every long wait on the main process:
    the embedded LLM's conversion, image encoding, the lower-layer cache fill per split, each
    epoch's steps (with ``loss`` and ``samples_s``), evaluation and the reliance check. None
    or False: nothing is reported (the command line draws bars; this function prints nothing).
    """
    if not callable(progress):
        progress = None
    from accelerate import Accelerator

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    _check_tracker(cfg.report_to)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    check_writable(out)
    with RunLock(out, accelerator.process_index):
        mode = claim(out, asdict(cfg), resume=cfg.resume, overwrite=cfg.overwrite)
        accelerator.wait_for_everyone()  # every rank has decided before anything is removed
        return _train(cfg, accelerator, out, mode, progress, start)


def _train(
    cfg: TrainConfig,
    accelerator: Any,
    out: Path,
    mode: str,
    progress: Progress | None,
    start: float,
) -> dict[str, Any]:
    if not accelerator.is_main_process:
        progress = None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, splits, data, info = build(cfg, progress)
    if accelerator.is_main_process:  # the data and models are good: the directory is ours
        if mode == "overwrite":
            clear(out)
        if mode != "resume":
            write_json(
                out / RUN_FILE,
                {"config": asdict(cfg), "mmtune_version": __version__, "started": time.ctime()},
            )
    accelerator.wait_for_everyone()
    module = model
    model.to(accelerator.device)
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.Adam(
        [
            {"params": body, "lr": cfg.optim.lr},
            {"params": head_params, "lr": cfg.optim.lr * cfg.optim.head_lr_scale},
        ]
    )
    if cfg.optim.decay_every is None:
        scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, cfg.optim.decay_every, cfg.optim.decay_gamma
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    train_ds = splits["train"]
    task = module.task

    world, b = accelerator.num_processes, cfg.optim.batch_size
    steps = len(train_ds) // (b * world)
    if steps == 0:
        raise ValueError(
            f"{len(train_ds)} training samples cannot fill one global batch of "
            f"{b} x {world} processes"
        )

    # The lower-layer cache (if any) fills itself during the first epoch and each split's first
    # evaluation (LowerLayerCache): there is no separate pass over the data.
    first_epoch, history = 1, {"step_loss": [], "epochs": []}
    if mode == "resume":
        last = ckpt.newest_intact(out)
        if last is None:
            warnings.warn(
                f"{out}: no intact checkpoint to resume from; training from epoch 1", stacklevel=2
            )
        else:
            done, history = _load_checkpoint(last, accelerator, module, optimizer, scheduler)
            first_epoch = done + 1
            if module.lower_cache is not None:
                _rebuild_cache(module, splits, cfg, accelerator, progress)

    logging = cfg.report_to != "none"
    if logging:  # accelerate's trackers; they log on the main process only
        accelerator.init_trackers(
            "tensorboard" if cfg.report_to == "tensorboard" else out.name or "mmtune",
            config=_flat_config(asdict(cfg)),
        )

    train_seconds = 0.0
    model.train()
    for epoch in range(first_epoch, cfg.optim.epochs + 1):
        perm = _epoch_order(cfg.seed, epoch, len(train_ds))
        stage = f"{cfg.task.data} epoch {epoch}/{cfg.optim.epochs}"
        report(progress, stage, 0, steps)
        t0 = time.perf_counter()
        losses = []
        for step in range(steps):
            lo = step * b * world + accelerator.process_index * b
            batch = collate([train_ds[i] for i in perm[lo : lo + b]], task, module.pixel_size)
            loss = model(_to_device(batch, accelerator.device))["loss"]
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(
                    [p for grp in optimizer.param_groups for p in grp["params"]],
                    cfg.optim.grad_clip,
                )
            optimizer.step()
            losses.append(loss.item())
            report(
                progress,
                stage,
                step + 1,
                steps,
                {
                    "loss": loss.item(),
                    "samples_s": (step + 1) * b * world / (time.perf_counter() - t0),
                },
            )
            if logging:
                accelerator.log({"train/loss": loss.item()}, step=(epoch - 1) * steps + step)
        scheduler.step()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        val = evaluate_split(
            model,
            splits[cfg.task.val_split],
            accelerator,
            cfg.optim.eval_batch_size,
            progress=progress,
            stage=f"eval {cfg.task.val_split}",
        )
        history["step_loss"].extend(losses)
        history["epochs"].append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val": val["metrics"],
                "seconds": epoch_seconds,
            }
        )
        if logging:  # at the epoch's last step, so that every tracker's steps increase
            accelerator.log({f"val/{k}": v for k, v in val["metrics"].items()}, step=epoch * steps)
        _save_checkpoint(accelerator, module, optimizer, scheduler, epoch, history, out, cfg)

    test = evaluate_split(
        model,
        splits[cfg.task.test_split],
        accelerator,
        cfg.optim.eval_batch_size,
        with_predictions=task == "segmentation",
        progress=progress,
        stage=f"eval {cfg.task.test_split}",
    )
    headline = {_headline(task): test["metrics"][_headline(task)]}
    relies = reliance(
        model,
        splits[cfg.task.test_split],
        accelerator,
        cfg.optim.eval_batch_size,
        headline,
        progress=progress,
    )
    infusion = module.llm.trainable_parameters() if isinstance(module.llm, MiTModel) else None
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in module.parameters())
    results = {
        "task": task,
        "data": {  # the standardisation statistics live in final/spec.json
            **info,
            "model": {k: v for k, v in info["model"].items() if k != "modality_stats"},
        },
        "test_split": cfg.task.test_split,
        "metrics": test["metrics"],
        "conventions": test["conventions"],
        "headline": headline,
        "reliance": relies,
        "history": history["epochs"],
        "parameters": {
            "trainable": n_train,
            "total": n_total,
            "share": n_train / n_total,
            "infusion": infusion.trainable if infusion else 0,
        },
        "lower_layer_cache": None
        if module.lower_cache is None
        else {
            "first_infused_layer": module.lower_cache.first_layer,
            "bytes": module.lower_cache.nbytes,
            "filled": "during the first epoch and each split's first evaluation (no extra pass)",
            **_cache_saving(history["epochs"], first_epoch),
        },
        "processes": world,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "versions": _versions(),
        "config": asdict(cfg),
    }
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group too
        tracker.finish()
    if accelerator.is_main_process:
        finish = Finisher(out)  # built aside, moved into place together, results.json last
        rows = [{k: v for k, v in r.items() if k != "mask"} for r in test["rows"]]
        predictions = finish.stage / f"predictions-{cfg.task.test_split}.jsonl"
        predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _write_final(finish.stage / "final", _trainable(module), cfg, info["model"])
        if cfg.plots:
            from mmtune.report import write_pictures

            drawn = write_pictures(finish.stage, task, history, test, splits, data, cfg)
            results["pictures"] = {k: str(out / Path(v).name) for k, v in drawn.items()}
        write_run_adapter(finish.stage / "adapter", module, asdict(cfg), info["model"], results)
        write_json(finish.stage / "results.json", results)
        finish.commit()
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # ends cleanly (see DESIGN.md section 8)
    return results
