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

import json
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtune._version import __version__
from mmtune.methods.mit import MiTModel
from mmtune.tasks import get_task, lower_is_better
from mmtune.tasks.model import TaskModel, collate
from mmtune.training.adapter import write_run_adapter
from mmtune.training.build import FeaturedSplit, build
from mmtune.training.config import (
    METHOD_NAMES,
    Method,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_train_config,
)
from mmtune.training.evaluation import evaluate_split, headline_metric, reliance, to_device
from mmtune.training.final import trainable_tensors, write_final
from mmtune.training.loop import FitSettings, epoch_order, fit, flat_config
from mmtune.training.rundir import (
    RUN_FILE,
    Finisher,
    RunLock,
    check_writable,
    claim,
    clear,
)
from mmtune.utils.io import (
    write_json,
)
from mmtune.utils.progress import Progress, tracked

__all__ = [
    "METHOD_NAMES",
    "Method",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "load_train_config",
    "train",
]


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- building


# ----------------------------------------------------------------------------- loop helpers


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


def _rebuild_cache(
    module: TaskModel,
    splits: dict[str, FeaturedSplit],
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
    perm = epoch_order(cfg.seed, 1, len(train_ds))
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
        to_device(collate([ds[i] for i in idx], task, pixel), accelerator.device)
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


def _score_and_report(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    module: TaskModel,
    splits: dict[str, FeaturedSplit],
    info: dict[str, Any],
    fitted: Any,
    progress: Progress | None,
    start: float,
) -> dict[str, Any]:
    """The test split's metrics and reliance, and the results dict (``_test``: the raw rows)."""
    task = module.task
    history, first_epoch = fitted.history, fitted.first_epoch
    train_seconds, world = fitted.train_seconds, accelerator.num_processes
    test = evaluate_split(
        model,
        splits[cfg.task.test_split],
        accelerator,
        cfg.optim.eval_batch_size,
        with_predictions=get_task(task).keeps_predictions,
        progress=progress,
        stage=f"eval {cfg.task.test_split}",
    )
    headline = {headline_metric(task): test["metrics"][headline_metric(task)]}
    relies = reliance(
        model,
        splits[cfg.task.test_split],
        accelerator,
        cfg.optim.eval_batch_size,
        headline,
        progress=progress,
        rows=test["rows"],
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
    results["_test"] = test
    return results


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
    if cfg.model.quantization.bits is not None and not torch.cuda.is_available():
        raise ValueError(
            f"model.quantization.bits {cfg.model.quantization.bits}: training through a "
            "quantized LLM needs CUDA. On the CPU, bitsandbytes repacks a 4-bit weight at its "
            "first forward without grad (the first evaluation) and drops every gradient "
            "through it after that; evaluating or predicting with a quantized base works"
        )
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
    groups = [
        {"params": body, "lr": cfg.optim.lr},
        {"params": head_params, "lr": cfg.optim.lr * cfg.optim.head_lr_scale},
    ]
    train_ds = splits["train"]
    task = module.task
    settings = FitSettings(
        epochs=cfg.optim.epochs,
        batch_size=cfg.optim.batch_size,
        seed=cfg.seed,
        optimizer="adam",
        decay_every=cfg.optim.decay_every,
        decay_gamma=cfg.optim.decay_gamma,
        schedule=cfg.optim.schedule,
        plateau_threshold=cfg.optim.plateau_threshold,
        max_decays=cfg.optim.max_decays,
        grad_clip=cfg.optim.grad_clip,
        keep_checkpoints=cfg.keep_checkpoints,
    )

    def make_batch(indices: list[int]) -> dict[str, Any]:
        batch = collate([train_ds[i] for i in indices], task, module.pixel_size)
        return to_device(batch, accelerator.device)

    def validate(prepared: Any, epoch: int) -> dict[str, float]:
        split = splits[cfg.task.val_split]
        val = evaluate_split(
            prepared,
            split,
            accelerator,
            cfg.optim.eval_batch_size,
            progress=progress,
            stage=f"eval {cfg.task.val_split}",
        )
        metrics = dict(val["metrics"])
        if not (cfg.val_reliance and module.modality_fields()):
            return metrics
        key = headline_metric(task)
        r = reliance(
            prepared,
            split,
            accelerator,
            cfg.optim.eval_batch_size,
            {key: metrics[key]},
            progress=progress,
            rows=val["rows"],
        )
        if r["drop"] is None:  # fewer than 2 val samples
            return metrics
        metrics["reliance_drop"], metrics["reliance_drop_se"] = r["drop"], r["drop_se"]
        if (
            r["uses_modality"]
            or cfg.optim.schedule != "step"
            or epoch != cfg.optim.decay_every
            or epoch == cfg.optim.epochs
        ):
            return metrics
        if not waits:  # the decay will not wait for the modality: say so
            warnings.warn(
                f"after epoch {epoch} the val {key} drops by {r['drop']:+.4f} (within noise, "
                f"2 x error {2 * r['drop_se']:.4f}) with each sample's modality from another "
                f"sample, and the learning rate now decays by {cfg.optim.decay_gamma}: the run "
                "may settle on a text-only solution. Levers: more epochs before the decay "
                "(optim.decay_every, optim.decay_waits_for_modality), more statements per "
                "image in the data",
                stacklevel=2,
            )
        return metrics

    # The decay waits while the val drop is within noise, where I is how the image reaches
    # the prediction (not where a decoder reads the image maps itself).
    waits = cfg.optim.decay_waits_for_modality and not get_task(task).needs_feature_maps

    def hold_decay(val: dict[str, float]) -> bool:
        if not waits or val.get("reliance_drop") is None:
            return False
        return not val["reliance_drop"] > 2 * val["reliance_drop_se"]

    headline, sign = headline_metric(task), -1.0 if lower_is_better(headline_metric(task)) else 1.0

    def score(val: dict[str, float]) -> float:  # the plateau schedule's: higher is better
        return sign * val[headline]

    logging = cfg.report_to != "none"
    if logging:  # accelerate's trackers; they log on the main process only
        accelerator.init_trackers(
            "tensorboard" if cfg.report_to == "tensorboard" else out.name or "mmtune",
            config=flat_config(asdict(cfg)),
        )
    # The lower-layer cache (if any) fills itself during the first epoch and each split's first
    # evaluation (LowerLayerCache): there is no separate pass over the data.
    fitted = fit(
        model,
        accelerator=accelerator,
        num_samples=len(train_ds),
        make_batch=make_batch,
        param_groups=groups,
        settings=settings,
        out=out,
        config=asdict(cfg),
        resume=mode == "resume",
        validate=validate,
        hold_decay=hold_decay,
        score=score,
        on_resumed=None
        if module.lower_cache is None
        else lambda: _rebuild_cache(module, splits, cfg, accelerator, progress),
        progress=progress,
        stage=f"{cfg.task.data} epoch",
        log=logging,
    )
    model, history = fitted.model, fitted.history
    results = _score_and_report(
        cfg, accelerator, model, module, splits, info, fitted, progress, start
    )
    test = results.pop("_test")
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group too
        tracker.finish()
    if accelerator.is_main_process:
        finish = Finisher(out)  # built aside, moved into place together, results.json last
        rows = [{k: v for k, v in r.items() if k != "mask"} for r in test["rows"]]
        predictions = finish.stage / f"predictions-{cfg.task.test_split}.jsonl"
        predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_final(finish.stage / "final", trainable_tensors(module), cfg, info["model"])
        if cfg.plots:
            from mmtune.reporting.plots import write_pictures

            split = data.splits[cfg.task.test_split]
            drawn = write_pictures(finish.stage, get_task(task), history, test, split)
            results["pictures"] = {k: str(out / Path(v).name) for k, v in drawn.items()}
        write_run_adapter(finish.stage / "adapter", module, asdict(cfg), info["model"], results)
        write_json(finish.stage / "results.json", results)
        finish.commit()
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # ends cleanly (see docs/design.md section 8)
    return results
