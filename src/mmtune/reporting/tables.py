"""Tables over seeds: one rule for the mean and the spread, one way to print them.

``std`` is the sample standard deviation (n - 1 in the denominator, :func:`statistics.stdev`);
with a single value it is undefined and recorded as ``None`` (JSON ``null``), never as 0 (which
would claim no spread) nor NaN (which is not JSON).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["format_mean_std", "mean_std"]


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` of ``values`` (at least one); ``std`` None when n = 1."""
    if not values:
        raise ValueError("mean_std: no values")
    xs = [float(v) for v in values]
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def format_mean_std(stat: dict, digits: int = 3) -> str:
    """``0.941 ± 0.003``; the mean alone when the spread is undefined (one value)."""
    std = stat.get("std")
    if std is None or std != std:  # None, or NaN from a table written before 0.3
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {std:.{digits}f}"
