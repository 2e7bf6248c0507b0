"""The main demo (``mmtune demo``): MiT beside the text-only method on the three mini-benchmarks.

Each benchmark's YAML (``configs/demo/<name>.yaml``) describes the MiT run; the text-only run
is the same file with ``method: text`` (the frozen LLM, the same head and budget, no modality),
written next to it as ``<output_dir>-text``. The cells run in ``workers`` processes at once
(longest first, one CPU thread each by default), since a 2-core machine trains two small runs
side by side faster than one run on two threads. Every cell is an ordinary ``mmtune train``
run: results.json (with its reliance check), curves, masks or scatter pictures.

The library prints nothing: ``on_event(kind, name, info)`` reports each cell's queueing
(``queued``), the start and end of each of its waits (``progress``: ``info`` has ``stage``,
``done``, ``total``; at most one report per stage every 20 s between them) and its end
(``done``: ``info`` is the cell's summary).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

__all__ = ["DEMO_BENCHMARKS", "DEMO_METHODS", "run_demo"]

DEMO_BENCHMARKS = ("shapes-ref", "digits-ve", "movie-sentiment")
"""The benchmarks, each with its config file ``<name>.yaml`` in the configs folder."""
DEMO_METHODS = ("mit", "text")
"""MiT, and the frozen LLM without the modality beside it."""
# Longest first (the cells' walls in the last measured demo, benchmarks/results/demo/), so that
# the two workers finish close together: digits MiT alone fills one worker while the others
# queue on the second.
_ORDER = {
    ("digits-ve", "mit"): 0,
    ("shapes-ref", "mit"): 1,
    ("movie-sentiment", "mit"): 2,
    ("movie-sentiment", "text"): 3,
    ("shapes-ref", "text"): 4,
    ("digits-ve", "text"): 5,
}


_EVERY = 20.0
"""Seconds between two progress reports of the same stage (its start and end always go)."""


def _relay(queue: Any, name: str) -> Callable[..., None]:
    """A Progress for a worker process: throttled (name, stage, done, total) on ``queue``."""
    last: dict[str, float] = {}

    def relay(stage: str, done: int, total: int, info: Any = None) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last.get(stage, 0.0) >= _EVERY:
            last[stage] = now
            queue.put((name, stage, done, total))

    return relay


def _cell(path: str, method: str, threads: int, queue: Any = None) -> dict[str, Any]:
    """One demo cell in a worker process: the YAML's run with ``method``; its summary."""
    import torch

    torch.set_num_threads(threads)
    from dataclasses import replace

    from mmtune.recipes.train import load_train_config, train

    cfg = load_train_config(path)
    if method != cfg.method:
        cfg = replace(cfg, method=method, output_dir=f"{cfg.output_dir}-{method}")
    cfg = replace(cfg, overwrite=True)  # the demo's own run directories are re-made each time
    name = f"{Path(path).stem} {method}"
    r = train(cfg, progress=None if queue is None else _relay(queue, name))
    return {
        "task": r["task"],
        "metrics": r["metrics"],
        "headline": r["headline"],
        "reliance": r["reliance"],
        "train_seconds": r["train_seconds"],
        "wall_seconds": r["wall_seconds"],
        "output_dir": r["config"]["output_dir"],
    }


def run_demo(
    configs: Path,
    benchmarks: tuple[str, ...] = DEMO_BENCHMARKS,
    methods: tuple[str, ...] = DEMO_METHODS,
    workers: int | None = None,
    on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Train every (benchmark, method) cell; {(benchmark, method): summary}.

    ``workers`` defaults to min(2, CPU count); each gets CPU count // workers threads."""
    paths = {}
    for name in benchmarks:
        path = configs / f"{name}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such demo config")
        paths[name] = path
    cpus = os.cpu_count() or 1
    workers = workers or max(1, min(2, cpus))
    threads = max(1, cpus // workers)
    cells = sorted(
        ((b, m) for b in benchmarks for m in methods), key=lambda c: _ORDER.get(c, len(_ORDER))
    )
    report = on_event or (lambda kind, name, info: None)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    context = get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue = manager.Queue()
        futures = {}
        for b, m in cells:
            futures[pool.submit(_cell, str(paths[b]), m, threads, queue)] = (b, m)
            report("queued", f"{b} {m}", {})
        start = time.perf_counter()

        def drain() -> None:
            while not queue.empty():
                name, stage, done, total = queue.get()
                report("progress", name, {"stage": stage, "done": done, "total": total})

        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            drain()
            for fut in finished:
                b, m = futures[fut]
                out[(b, m)] = fut.result()  # a failed cell raises here, naming its error
                info = {**out[(b, m)], "elapsed": time.perf_counter() - start}
                report("done", f"{b} {m}", info)
    return out
