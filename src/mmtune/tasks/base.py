"""The Task registry: what differs between referring segmentation, classification and sentiment.

A :class:`Task` says how a model output becomes a per-sample row, how rows become the pinned
metrics (:mod:`mmtune.metrics`), which metric is the headline and whether lower is better,
which text field the prompt reads, whether the frozen image encoder is needed (and its feature
maps), how one prediction is answered, and which pictures a run draws. Everything above this
layer asks the registry (:func:`get_task`) instead of branching on the task's name.

Register a new task with :func:`register_task` (one registration point)::

    from mmtune.tasks import Task, register_task

    class Retrieval(Task):
        name, headline, metric_names = "retrieval", "recall@1", ("recall@1",)
        ...

    register_task(Retrieval())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["LOWER_IS_BETTER", "Task", "get_task", "lower_is_better", "register_task", "tasks"]

LOWER_IS_BETTER = frozenset({"mae", "rmse"})
"""Metric names where a smaller value is better (errors); every other metric is a score."""


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (``mae``, ``rmse``)."""
    return metric in LOWER_IS_BETTER


class Task:
    """One task kind. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    """Registry key, as the data sets name their task (``DataSplits.task``)."""
    headline: ClassVar[str]
    """The metric a table ranks by."""
    metric_names: ClassVar[tuple[str, ...]]
    """Every metric :meth:`metrics` returns, in table order."""
    summary_metrics: ClassVar[tuple[str, ...]] = ()
    """The few metrics a one-line summary shows (the demo, the ceilings), headline first."""
    text_field: ClassVar[str] = "text"
    """The item field the prompt template reads."""
    reads_image: ClassVar[bool] = False
    """The frozen vision encoder runs on this task's images."""
    needs_feature_maps: ClassVar[bool] = False
    """The head reads the encoder's feature maps too (not only the pooled vector)."""
    keeps_predictions: ClassVar[bool] = False
    """The test rows keep each prediction for the pictures (masks)."""
    prompt_name: ClassVar[str] = ""
    """The entry of ``DEFAULT_PROMPTS`` a run uses when ``task.prompt`` is not set."""
    head_reads_pooled: ClassVar[bool] = False
    """The head reads the pooled image vector itself (so the reliance check swaps it)."""
    hub_tags: ClassVar[tuple[str, ...]] = ()
    """Tags of a run adapter's model card on the Hub."""
    pipeline_tag: ClassVar[str] = ""
    """The Hub's pipeline tag for the card."""

    @property
    def lower_is_better(self) -> bool:
        """Whether a smaller headline is better."""
        return lower_is_better(self.headline)

    def build_head(
        self,
        d_text: int,
        *,
        d_image: int,
        level_channels: tuple[int, int, int] | None,
        num_classes: int,
        decoder: Any,
    ) -> nn.Module:
        """The task head on the pooled text vector (d_text); ``d_image`` is 0 when the head
        must not see the image vector."""
        raise NotImplementedError

    def outputs(
        self, head: nn.Module, batch: dict[str, Any], text: torch.Tensor, config: Any
    ) -> dict[str, torch.Tensor]:
        """The head's outputs for a batch (``logits`` / ``prediction``) and, when the batch has
        targets, ``loss`` (``config``: the run's TaskConfig, for the loss options)."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]], batch: dict[str, Any], pixel_size: Any):
        """Add the task's own tensors (targets, frames, sizes) to a collated ``batch``."""

    def row(self, output: dict[str, torch.Tensor], batch: dict[str, Any], r: int, keep: bool):
        """The scored row of sample ``r`` of ``batch`` (without its id)."""
        raise NotImplementedError

    def metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"metrics": {...}, "conventions": {...}}`` over every row of a split."""
        raise NotImplementedError

    def answer(
        self, output: dict[str, torch.Tensor], spec: dict[str, Any], image: Any, out: Path | None
    ) -> dict[str, Any]:
        """One prediction for ``mmtune predict`` (``image``: the RGB array, if the task reads one;
        ``out``: where a picture of it goes)."""
        raise NotImplementedError

    def pictures(self, out: Path, rows: list[dict], test: dict, split: Any) -> dict[str, str]:
        """The task's own pictures of the test split beside the curves; {name: path}."""
        return {}


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register ``task`` under ``task.name`` (replacing any task of that name); returns it."""
    for attr in ("name", "headline", "metric_names"):
        if not hasattr(task, attr):
            raise TypeError(f"{type(task).__name__}: a Task needs the class attribute {attr!r}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name is one error listing the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"task {name!r}: not one of {', '.join(sorted(_TASKS))}") from None


def tasks() -> list[str]:
    """The registered task names."""
    return sorted(_TASKS)
