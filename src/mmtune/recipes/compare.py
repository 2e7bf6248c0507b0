"""``mmtune compare``: methods and ablations x benchmarks x seeds, one budget, one table.

Each cell is one ``mmtune train BENCHMARK.yaml --config VARIANT.yaml --seed S`` in its own
process (``workers`` at a time, ``threads`` torch threads each), written to
``OUTPUT/runs/<benchmark>/<variant>/lr<lr>-seed<S>/``. A cell whose ``results.json`` exists is
not run again, so an interrupted comparison continues where it stopped; a run made with the
config's rate (``lrconfig-seed<S>``) also stands for that rate when it is a candidate.
Checkpoints and weights are deleted after a cell finishes (``keep_weights`` keeps them);
results.json and the test predictions stay.

Learning rate: with several ``lrs``, every candidate is trained with the first seed and the one
with the best *validation* headline (last epoch) is used for the other seeds; the test split is
never looked at. With one candidate there is nothing to choose.

A variant that sets ``task.modalities`` applies to sentiment benchmarks only (T / T+A / T+F).
The report (``accuracy.json``, ``accuracy.md``) gives, per benchmark and variant, the mean and
standard deviation (ddof 1) over the seeds that finished, the seed count, the training seconds
(epochs plus the one-off fill of the lower-layer cache, which covers every split) and the
trainable parameters.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmtune.reporting.tables import format_mean_std, mean_std
from mmtune.tasks import lower_is_better
from mmtune.training.adapter import method_label
from mmtune.utils.configs import resolve_config
from mmtune.utils.io import atomic_write

__all__ = ["Cell", "CompareConfig", "mean_ranks", "plan", "report", "run_compare"]

# report order: the methods, then ablations by name
ORDER = ("text", "concat", "concat-lora", "concat-ia3", "mit")


DEFAULT_BENCHMARKS = (
    "configs/table/digits-ve.yaml",
    "configs/table/shapes-ref.yaml",
    "configs/table/movie-sentiment.yaml",
)
DEFAULT_VARIANTS = (
    "configs/methods/text.yaml",
    "configs/methods/concat.yaml",
    "configs/methods/concat-lora.yaml",
    "configs/methods/concat-ia3.yaml",
    "configs/methods/mit.yaml",
)


@dataclass
class CompareConfig:
    """A grid of training runs and where its table goes."""

    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    """Task configs: each fixes the data, model and budget (epochs, batch) of its benchmark."""
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    """Variant configs layered on each benchmark (methods, ablations); named by file stem."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds; the first one also chooses the learning rate."""
    lrs: list[float] | None = None
    """Learning-rate candidates chosen on val; None: the benchmark config's."""
    output_dir: str = "runs/compare"
    """Where runs and the report go (the committed tables: benchmarks/results/accuracy)."""
    workers: int = 1
    """Runs at a time."""
    threads: int | None = None
    """Torch threads per run (OMP_NUM_THREADS); None: torch's default."""
    keep_weights: bool = False
    """Keep each run's checkpoints and final weights."""

    def __post_init__(self) -> None:
        if not self.benchmarks or not self.variants or not self.seeds:
            raise ValueError("CompareConfig: benchmarks, variants and seeds must be non-empty")
        # a path that names no file here may name a config shipped with mmtune
        self.benchmarks = [str(resolve_config(p)) for p in self.benchmarks]
        self.variants = [str(resolve_config(p)) for p in self.variants]
        for path in [*self.benchmarks, *self.variants]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"CompareConfig: no config file {path}")
        if self.lrs is not None and (not self.lrs or min(self.lrs) <= 0):
            raise ValueError("CompareConfig.lrs must be None or positive learning rates")
        if self.workers < 1:
            raise ValueError("CompareConfig.workers must be >= 1")


@dataclass
class Cell:
    benchmark: str  # config path
    variant: str  # config path
    seed: int
    lr: float | None  # None: the config's

    @property
    def name(self) -> tuple[str, str]:
        return Path(self.benchmark).stem, Path(self.variant).stem

    def directory(self, root: Path) -> Path:
        lr = "config" if self.lr is None else f"{self.lr:g}"
        return root / "runs" / self.name[0] / self.name[1] / f"lr{lr}-seed{self.seed}"


def _read_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def _applies(benchmark: str, variant: str) -> bool:
    """Variants that choose frame modalities are for sentiment benchmarks only."""
    sets_modalities = "modalities" in (_read_yaml(variant).get("task") or {})
    data = (_read_yaml(benchmark).get("task") or {}).get("data", "")
    return not sets_modalities or data == "movie-sentiment" or "mos" in str(data).lower()


def plan(cfg: CompareConfig) -> list[tuple[str, str]]:
    """(benchmark, variant) pairs in run order (variant-major within each seed)."""
    return [(b, v) for v in cfg.variants for b in cfg.benchmarks if _applies(b, v)]


def _results(path: Path) -> dict[str, Any] | None:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _finished(cell: Cell, root: Path) -> dict[str, Any] | None:
    """The cell's results, or those of the same run made without ``lrs`` at the same rate.

    A grid first run with the configs' learning rate (``lrconfig-seedS``) is reused when a later
    selection names that rate as a candidate: same benchmark, variant, seed and rate, same run.
    """
    res = _results(cell.directory(root))
    if res is not None or cell.lr is None:
        return res
    plain = _results(Cell(cell.benchmark, cell.variant, cell.seed, None).directory(root))
    if plain is not None and math.isclose(plain["config"]["optim"]["lr"], cell.lr):
        return plain
    return None


def _val_score(results: dict[str, Any]) -> float:
    """The last epoch's validation headline, signed so that larger is better."""
    key, _ = next(iter(results["headline"].items()))
    value = results["history"][-1]["val"][key]
    return -value if lower_is_better(key) else value


def _command(cell: Cell, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "mmtune.cli", "train", cell.benchmark, "--config", cell.variant]
    cmd += ["--seed", str(cell.seed), "--output_dir", str(out)]  # its bars go to its log
    if cell.lr is not None:
        cmd += ["--optim.lr", repr(cell.lr)]
    if (out / "run.json").is_file():  # a cell that was stopped: continue it (same settings)
        cmd += ["--resume", "true"]
    elif out.is_dir() and any(out.iterdir()):  # leftovers without a run file: the grid's own
        cmd += ["--overwrite", "true"]
    return cmd


_EVERY = 30.0
"""Seconds between two reports of where the running cells are."""


def _last_status(log: Path, tail: int = 4096) -> str:
    """The newest progress line of a cell's log (its tqdm bars end lines with carriage
    returns), or ``starting`` when it has written nothing yet."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "starting"
    parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]
    return parts[-1][:160] if parts else "starting"


def run_compare(cfg: CompareConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every missing cell (lr chosen on val with the first seed), then write the report."""
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _: None)
    pairs = plan(cfg)
    lrs: list[float | None] = list(cfg.lrs) if cfg.lrs else [None]
    chosen: dict[tuple[str, str], float | None] = {}
    # queue: selection cells (first seed, every lr) first, then the other seeds once chosen
    pending: list[Cell] = [Cell(b, v, cfg.seeds[0], lr) for b, v in pairs for lr in lrs]
    later: list[Cell] = [Cell(b, v, s, None) for s in cfg.seeds[1:] for b, v in pairs]
    running: list[tuple[Cell, subprocess.Popen, float, Any]] = []
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
        env["MKL_NUM_THREADS"] = str(cfg.threads)

    def choose(b: str, v: str) -> bool:
        if (b, v) in chosen:
            return True
        if len(lrs) == 1:  # nothing to choose
            chosen[(b, v)] = lrs[0]
            return True
        scored = []
        for lr in lrs:
            res = _finished(Cell(b, v, cfg.seeds[0], lr), root)
            if res is None:
                return False
            scored.append((_val_score(res), lr))
        chosen[(b, v)] = max(scored, key=lambda x: x[0])[1]
        return True

    failures: list[str] = []
    shown = time.perf_counter()
    while pending or later or running:
        for cell in list(later):  # release cells whose learning rate is known
            if choose(cell.benchmark, cell.variant):
                later.remove(cell)
                lr = chosen[(cell.benchmark, cell.variant)]
                pending.append(Cell(cell.benchmark, cell.variant, cell.seed, lr))
        while pending and len(running) < cfg.workers:
            cell = pending.pop(0)
            out = cell.directory(root)
            if _finished(cell, root) is not None:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            logf = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 (closed on exit)
            proc = subprocess.Popen(
                _command(cell, out), stdout=logf, stderr=subprocess.STDOUT, env=env
            )
            running.append((cell, proc, time.perf_counter(), logf))
            say(f"start {cell.name[0]} / {cell.name[1]} seed {cell.seed} lr {cell.lr}")
        for item in list(running):
            cell, proc, t0, logf = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            out = cell.directory(root)
            took = time.perf_counter() - t0
            if proc.returncode != 0 or _results(out) is None:
                failures.append(f"{out} (exit {proc.returncode}; see {out}.log)")
                say(f"FAILED {out} (exit {proc.returncode})")
                continue
            if not cfg.keep_weights:
                for sub in ("checkpoints", "final", "tensorboard"):
                    shutil.rmtree(out / sub, ignore_errors=True)
            say(f"done  {cell.name[0]} / {cell.name[1]} seed {cell.seed} ({took:.0f} s)")
        if running and time.perf_counter() - shown >= _EVERY:  # where each running cell is
            shown = time.perf_counter()
            for cell, _, t0, _ in running:
                log_path = cell.directory(root).parent / f"{cell.directory(root).name}.log"
                say(
                    f"  ... {cell.name[0]} / {cell.name[1]} seed {cell.seed} "
                    f"({time.perf_counter() - t0:.0f} s): {_last_status(log_path)}"
                )
        if (
            not pending
            and later
            and not running
            and not any(choose(c.benchmark, c.variant) for c in later)
        ):
            break  # a selection cell failed: its other seeds cannot run
        time.sleep(0.5)
    table = report(root)
    table["failures"] = failures
    return table


def _rank(variant: str) -> tuple[int, str]:
    return (ORDER.index(variant), "") if variant in ORDER else (len(ORDER), variant)


def _train_seconds(results: dict[str, Any]) -> float:
    """Epoch time plus the one-off fill of the lower-layer cache (it is part of training)."""
    cache = results.get("lower_layer_cache") or {}
    return results["train_seconds"] + cache.get("seconds_to_fill", 0.0)


def report(root: Path | str) -> dict[str, Any]:
    """Aggregate every finished run under ``root/runs`` into accuracy.json and accuracy.md."""
    root = Path(root)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in sorted(root.glob("runs/*/*/*/results.json")):
        benchmark, variant = f.parts[-4], f.parts[-3]
        groups.setdefault((benchmark, variant), []).append(json.loads(f.read_text()))
    rows = []
    for (benchmark, variant), runs in groups.items():
        lrs = sorted({r["config"]["optim"]["lr"] for r in runs})
        by_lr = {lr: [r for r in runs if r["config"]["optim"]["lr"] == lr] for lr in lrs}
        lr = max(by_lr, key=lambda k: (len(by_lr[k]), statistics.fmean(map(_val_score, by_lr[k]))))
        runs = by_lr[lr]  # the chosen lr has every seed; the others only the first
        metrics = sorted(set.intersection(*(set(r["metrics"]) for r in runs)) - {"num_samples"})
        rows.append(
            {
                "benchmark": benchmark,
                "variant": variant,
                "method": method_label(runs[0]["config"]),
                "lr": lr,
                "seeds": sorted(r["config"]["seed"] for r in runs),
                "headline": next(iter(runs[0]["headline"])),
                "metrics": {m: mean_std([r["metrics"][m] for r in runs]) for m in metrics},
                "train_seconds": mean_std([_train_seconds(r) for r in runs]),
                "wall_seconds": mean_std([r["wall_seconds"] for r in runs]),
                "trainable_parameters": runs[0]["parameters"]["trainable"],
                "test_samples": runs[0]["metrics"]["num_samples"],
                "train_samples": runs[0]["data"]["splits"]["train"],
                "epochs": runs[0]["config"]["optim"]["epochs"],
                "conventions": runs[0]["conventions"],
            }
        )
    rows.sort(key=lambda r: (r["benchmark"], _rank(r["variant"])))
    table = {"rows": rows, "root": str(root)}
    with atomic_write(root / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    with atomic_write(root / "accuracy.md") as tmp:
        tmp.write_text(markdown(rows))
    return table


def mean_ranks(rows: list[dict[str, Any]], variants: list[str]) -> list[tuple[str, float]]:
    """Rank ``variants`` on each benchmark's headline mean (1 = best), average over benchmarks.

    Only benchmarks where every variant has a row count. Returns ``(variant, mean rank)`` best
    first; ties keep the order of ``variants``. This is how the README picks MiT's defaults.
    """
    cell = {(r["benchmark"], r["variant"]): r for r in rows}
    benchmarks = [
        b
        for b in dict.fromkeys(r["benchmark"] for r in rows)
        if all((b, v) in cell for v in variants)
    ]
    if not benchmarks:
        raise ValueError(f"no benchmark has a row for every one of {variants}")
    total = dict.fromkeys(variants, 0.0)
    for b in benchmarks:
        head = cell[(b, variants[0])]["headline"]
        sign = -1.0 if lower_is_better(head) else 1.0
        order = sorted(variants, key=lambda v: -sign * cell[(b, v)]["metrics"][head]["mean"])
        for rank, v in enumerate(order, start=1):
            total[v] += rank
    ranked = [(v, total[v] / len(benchmarks)) for v in variants]
    return sorted(ranked, key=lambda x: x[1])


def summary(rows: list[dict[str, Any]]) -> str:
    """One table, a column per benchmark: headline mean ± std (seeds), mean training seconds."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    variants = sorted(dict.fromkeys(r["variant"] for r in rows), key=_rank)
    cell = {(r["benchmark"], r["variant"]): r for r in rows}
    heads = {b: next(r["headline"] for r in rows if r["benchmark"] == b) for b in benchmarks}
    out = [
        "| variant | "
        + " | ".join(
            f"{b} {heads[b]}{' (lower is better)' if lower_is_better(heads[b]) else ''} | train s"
            for b in benchmarks
        )
        + " |",
        "|---|" + "---|---|" * len(benchmarks),
    ]
    for v in variants:
        parts = []
        for b in benchmarks:
            r = cell.get((b, v))
            if r is None:
                parts += ["-", "-"]
            else:
                seeds = f" ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})"
                parts += [
                    format_mean_std(r["metrics"][heads[b]]) + seeds,
                    f"{r['train_seconds']['mean']:.0f}",
                ]
        out.append(f"| {v} | " + " | ".join(parts) + " |")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict[str, Any]]) -> str:
    """A summary, then one table per benchmark: headline and second metric, mean ± std."""
    second = {"accuracy": "f1_macro", "oIoU": "mIoU", "mae": "corr"}
    out = [summary(rows)] if rows else []
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        part = [r for r in rows if r["benchmark"] == benchmark]
        head = part[0]["headline"]
        other = second.get(head, head)
        out.append(
            f"### {benchmark} ({part[0]['train_samples']} train / {part[0]['test_samples']} "
            f"test samples, {part[0]['epochs']} epoch(s))\n"
        )
        out.append(
            f"| variant | method | {head} | {other} | seeds | lr | train s | trainable params |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for r in part:
            out.append(
                f"| {r['variant']} | {r['method']} | {format_mean_std(r['metrics'][head])} | "
                f"{format_mean_std(r['metrics'][other])} | {len(r['seeds'])} | {r['lr']:g} | "
                f"{format_mean_std(r['train_seconds'], 0)} | {r['trainable_parameters']:,} |"
            )
        out.append("")
    return "\n".join(out) + "\n"
