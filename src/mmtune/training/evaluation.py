"""Scoring a split (sharded over processes, gathered by sample id) and the reliance check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmtune.tasks import get_task, lower_is_better
from mmtune.tasks.model import TaskModel, collate
from mmtune.utils.progress import Progress, tracked

if TYPE_CHECKING:
    from mmtune.training.build import FeaturedSplit

__all__ = [
    "batches",
    "evaluate_split",
    "headline_metric",
    "reliance",
    "to_device",
    "unused_modality_warning",
]


def batches(
    ds: FeaturedSplit,
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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_split(
    model: TaskModel,
    ds: FeaturedSplit,
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
    task = get_task(module.task)
    was_training = module.training
    module.eval()
    chunks = np.array_split(np.arange(len(ds)), accelerator.num_processes)
    mine = chunks[accelerator.process_index].tolist()
    rows: list[dict[str, Any]] = []
    swap = None if donors is None else (donors, module.modality_fields())
    todo = batches(ds, mine, batch_size, module.task, module.pixel_size, swap)
    for batch in tracked(todo, progress, stage, -(-len(mine) // batch_size)):
        batch = to_device(batch, accelerator.device)
        out = module(batch)
        for r, sid in enumerate(batch["id"]):
            row: dict[str, Any] = {"id": sid, **task.row(out, batch, r, with_predictions)}
            rows.append(row)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object(rows)
    else:
        gathered = rows
    by_id = {r["id"]: r for r in gathered}  # one row per sample, whatever the sharding
    ordered = [by_id[str(item["id"])] for item in ds.items]
    result = task.metrics(ordered)
    result["rows"] = ordered
    module.train(was_training)
    return result


def headline_metric(task: str) -> str:
    """The registered task's headline metric (``accuracy``, ``oIoU``, ``mae``)."""
    return get_task(task).headline


def reliance(
    model: TaskModel,
    ds: FeaturedSplit,
    accelerator: Any,
    batch_size: int,
    headline: dict[str, float],
    seed: int = 0,
    progress: Progress | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The headline metric again with every sample's modality taken from another sample.

    Donors come from a seeded derangement that avoids samples of the same image where the
    data names images (``image_id`` / ``image_path``); the drop is the model's reliance on
    the modality (docs/design.md section 9). A model that reads no modality gets drop None.

    With ``rows`` (the split's scored rows with each sample's own modality, from
    :func:`evaluate_split`), the drop gets its noise: ``drop_se`` by a paired bootstrap over
    samples, ``uses_modality`` (drop > 2 x drop_se) and, when it is False, a ``warning`` that
    names what to try (:func:`unused_modality_warning`).
    """
    from mmtune.metrics import (
        RELIANCE_CONVENTIONS,
        RELIANCE_NOISE,
        derangement,
        paired_bootstrap_se,
    )

    ((key, value),) = headline.items()
    fields = accelerator.unwrap_model(model).modality_fields()
    out: dict[str, Any] = {"metric": key, "headline": value, "swapped": sorted(fields)}
    if not fields or len(ds) < 2:
        return {**out, "deranged": None, "drop": None, "conventions": RELIANCE_CONVENTIONS}
    groups = [item.get("image_id", item.get("image_path")) for item in ds.items]
    donors = derangement(len(ds), seed, None if all(g is None for g in groups) else groups)
    swapped = evaluate_split(
        model, ds, accelerator, batch_size, donors=donors, progress=progress, stage="reliance"
    )
    deranged = swapped["metrics"][key]
    drop = deranged - value if lower_is_better(key) else value - deranged
    out = {**out, "deranged": deranged, "drop": drop, "seed": seed}
    if rows is not None:
        task = get_task(accelerator.unwrap_model(model).task)
        se = paired_bootstrap_se(
            lambda rs: task.metrics(list(rs))["metrics"][key], rows, swapped["rows"], seed=seed
        )
        used = drop > 2 * se
        out.update(drop_se=se, uses_modality=bool(used))
        out["warning"] = None if used else unused_modality_warning(out, task.name)
    conventions = {**RELIANCE_CONVENTIONS, **({"drop_se": RELIANCE_NOISE} if rows else {})}
    return {**out, "conventions": conventions}


def unused_modality_warning(r: dict[str, Any], task: str) -> str:
    """The guard's text when the reliance check finds the drop within its noise."""
    text = (
        f"the modality is not used: {r['metric']} {r['headline']:.4f} -> {r['deranged']:.4f} "
        f"with every sample's modality taken from another sample (drop {r['drop']:+.4f}, "
        f"within noise: 2 x its bootstrap error = {2 * r['drop_se']:.4f}), so this model may "
        "be a text-only solution; score `--method text` beside it"
    )
    if task == "segmentation":
        return text + (
            " (the segmentation decoder reads the image maps itself, so a small reliance on I "
            "is expected: judge the run against text-only and the decoder probe)"
        )
    return text + (
        "; the levers that made the image count (docs/modality.md): a budget that follows the "
        "val curve (optim.schedule plateau with more optim.epochs; "
        "configs/levers/digits-ve-plateau.yaml), the decay waiting for the modality "
        "(optim.decay_waits_for_modality), more statements per image, I at unit L2 norm "
        "(task.modality_norm l2)"
    )
