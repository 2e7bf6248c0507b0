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

__all__ = ["batches", "evaluate_split", "headline_metric", "reliance", "to_device"]


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
    drop = deranged - value if lower_is_better(key) else value - deranged
    return {
        **out,
        "deranged": deranged,
        "drop": drop,
        "seed": seed,
        "conventions": RELIANCE_CONVENTIONS,
    }
