"""Progress of long waits, reported through a callback; the library itself prints nothing.

A :data:`Progress` is called as ``progress(stage, done, total, info)``: ``stage`` names the
wait (``"encode train images"``, ``"lower-layer cache val"``, ``"epoch 2/6"``, ``"eval test"``,
``"convert SmolLM2 GGUF"``), ``done`` of ``total`` units are finished (batches, steps; a stage
starts with ``done == 0`` where its first unit can take long, and ends with ``done ==
total``), and ``info`` holds figures to show beside it (``{"loss": 0.41}``) or is None. The
command line draws bars from these calls; ``None`` anywhere means: report nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["Progress", "report", "tracked"]

Progress = Callable[[str, int, int, Mapping[str, Any] | None], None]
"""``progress(stage, done, total, info)``; see the module docstring."""

T = TypeVar("T")


def report(
    progress: Progress | None,
    stage: str,
    done: int,
    total: int,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(stage, done, total, info)


def tracked(items: Iterable[T], progress: Progress | None, stage: str, total: int) -> Iterator[T]:
    """Yield ``items``, reporting ``stage`` at 0 before the first and after each one."""
    report(progress, stage, 0, total)
    for done, item in enumerate(items, 1):
        yield item
        report(progress, stage, done, total)
