"""The VQA table: every ``lmm tune`` method x benchmark x seed on one stage-1 base, resumable
(finished cells are reused, a running cell is claimed by one process), then vqa.json / vqa.md
(mean ± std over seeds, :mod:`mmtune.reporting.tables`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.methods.lmm_tuning import get_lmm_tuning
from mmtune.methods.mrt import MRTConfig
from mmtune.recipes.instruct import (
    METHODS,
    Stage1Config,
    TuneConfig,
    _check_benchmarks,
    _write_json,
    stage1,
    tune,
)
from mmtune.reporting.tables import format_mean_std, mean_std
from mmtune.utils.adapter_file import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from mmtune.utils.io import atomic_write

__all__ = ["TableConfig", "table_report", "vqa_table"]


@dataclass
class TableConfig:
    """The VQA table: methods x benchmarks x seeds on one stage-1 base."""

    base: Path = Path("runs/lmm/stage1")
    """Stage-1 directory (built with ``stage1`` settings below when missing)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """How the base is built when ``base`` does not exist yet."""
    benchmarks: list[str] = field(default_factory=lambda: ["digits", "shapes"])
    """VQA mini-benchmarks."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods (zero-shot is evaluated once: it has no seed)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the tuned methods."""
    epochs: int = 2
    """Passes over each train split (every method)."""
    num_samples: int = 400
    """Items per benchmark."""
    batch_size: int = 8
    """Samples per step (every method)."""
    lr: dict[str, float] = field(default_factory=dict)
    """Learning rate by method name (a method left out: its default, LMMTuning.default_lr)."""
    decay_every: int | None = None
    """Every method: multiply the learning rate by decay_gamma every this many epochs (null:
    constant)."""
    decay_gamma: float = 0.1
    """Step-decay factor."""
    mrt: MRTConfig = field(default_factory=MRTConfig)
    """MRT edits."""
    output_dir: Path = Path("runs/lmm/table")
    """runs/<benchmark>/<method>/seed<S>/results.json, vqa.json, vqa.md."""
    threads: int | None = None
    """torch CPU threads."""
    save_adapters: bool = False
    """Also keep each run's trained tensors (``runs/.../adapter``)."""

    def __post_init__(self) -> None:
        _check_benchmarks(self.benchmarks, "TableConfig.benchmarks")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"TableConfig.methods: {bad} not among {METHODS}")
        unknown = [m for m in self.lr if m not in METHODS]
        if unknown:
            raise ValueError(f"TableConfig.lr: {unknown} not among {METHODS}")
        self.base, self.output_dir = Path(self.base), Path(self.output_dir)


def vqa_table(cfg: TableConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every missing cell (finished ones are reused), then write vqa.json / vqa.md."""
    log = log or (lambda _line: None)
    # both files: a committed base keeps its config and results, not its weights
    if not all((cfg.base / name).is_file() for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)):
        log(f"stage 1 -> {cfg.base}")
        stage1(Stage1Config(**{**vars(cfg.stage1), "output_dir": cfg.base}))
    for bench in cfg.benchmarks:
        for method in cfg.methods:
            trains = get_lmm_tuning(method).trains  # one run of a method that trains nothing
            for seed in cfg.seeds if trains else [0]:
                out = cfg.output_dir / "runs" / bench / method / f"seed{seed}"
                if (out / "results.json").is_file():
                    continue
                lock = _claim(out)
                if lock is None:  # another `lmm table` process is running this cell
                    log(f"skip  {bench} / {method} / seed {seed}: {out / '.running'} exists")
                    continue
                log(f"start {bench} / {method} / seed {seed}")
                try:
                    r = tune(
                        TuneConfig(
                            benchmark=bench,
                            method=method,  # type: ignore[arg-type]
                            base=cfg.base,
                            mrt=cfg.mrt,
                            num_samples=cfg.num_samples,
                            epochs=cfg.epochs,
                            batch_size=cfg.batch_size,
                            lr=cfg.lr.get(method),
                            decay_every=cfg.decay_every,
                            decay_gamma=cfg.decay_gamma,
                            seed=seed,
                            output_dir=out,
                            save_adapter=cfg.save_adapters,
                            checkpoint=False,
                            threads=cfg.threads,
                        )
                    )
                finally:
                    lock.unlink(missing_ok=True)
                log(
                    f"done  {bench} / {method} / seed {seed}: test exact match "
                    f"{r['test']['exact_match']:.3f} ({r['train_seconds']:.0f} s)"
                )
    return table_report(cfg.output_dir)


def _claim(out: Path) -> Path | None:
    """Create ``out/.running`` exclusively; None when another process holds it.

    Lets several ``lmm table`` processes share one grid. A process killed mid-cell leaves the
    file behind: delete it to run that cell again.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".running"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    return lock


def _drops(rs: list[dict[str, Any]]) -> dict[str, float | int | None] | None:
    """Mean ± std of the cells' reliance drops (None when a cell predates the check)."""
    drops = [(r.get("reliance") or {}).get("drop") for r in rs]
    return None if any(d is None for d in drops) else mean_std(drops)


def table_report(root: Path | str) -> dict[str, Any]:
    """Aggregate runs/*/*/seed*/results.json into vqa.json and vqa.md (mean ± std over seeds)."""
    root = Path(root)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(root.glob("runs/*/*/seed*/results.json")):
        r = json.loads(path.read_text())
        rows.setdefault((r["benchmark"], r["method"]), []).append(r)
    if not rows:
        raise FileNotFoundError(f"{root}/runs: no results.json yet")
    table = []
    for (bench, method), rs in sorted(
        rows.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))
    ):
        table.append(
            {
                "benchmark": bench,
                "method": method,
                "seeds": [r["seed"] for r in rs],
                "test_exact_match": mean_std([r["test"]["exact_match"] for r in rs]),
                "val_exact_match": mean_std([r["val"]["exact_match"] for r in rs]),
                "reliance_drop": _drops(rs),
                "train_seconds": mean_std([r["train_seconds"] for r in rs]),
                "trainable": rs[0]["params"]["trainable"],
                "total": rs[0]["params"]["total"],
                "share": rs[0]["params"]["share"],
                "lr": rs[0]["lr"],
                "val_by_epoch": _val_by_epoch(rs),
            }
        )
    _write_json(root / "vqa.json", {"rows": table, "metric": "test exact match"})
    lines = [
        "| benchmark | method | test exact match | reliance drop | val by epoch (seed mean) | "
        "trainable params | share | train s | seeds |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in table:
        em, drop = row["test_exact_match"], row["reliance_drop"]
        drop_cell = "not measured (mmtune < 0.4)" if drop is None else format_mean_std(drop)
        curve = " → ".join(f"{v:.3f}" for v in row["val_by_epoch"]) or "-"
        lines.append(
            f"| {row['benchmark']} | {row['method']} | {format_mean_std(em)} | {drop_cell} | "
            f"{curve} | {row['trainable']:,} | {100 * row['share']:.4f}% | "
            f"{row['train_seconds']['mean']:.0f} | {len(row['seeds'])} |"
        )
    with atomic_write(root / "vqa.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    runs = [r for rs in rows.values() for r in rs]
    if any(r.get("losses") for r in runs):
        from mmtune.reporting.plots import vqa_curves_picture

        vqa_curves_picture(root / "curves.png", runs)
    return {"rows": table}


def _val_by_epoch(rs: list[dict[str, Any]]) -> list[float]:
    """Mean val exact match over the seeds after each epoch ([] when a cell has no curve)."""
    curves = [[c["val_exact_match"] for c in r.get("curve", [])] for r in rs]
    if not curves or any(not c or None in c for c in curves) or len({len(c) for c in curves}) > 1:
        return []
    return [float(np.mean(v)) for v in zip(*curves, strict=True)]
