"""Summarise a lever study: one row and one learning curve per run directory.

    python benchmarks/levers.py benchmarks/results/levers/digits-ve

Each sub-folder is one `mmtune train` run (configs/levers/*.yaml plus the lever's flags). The
script reads their results.json, writes ``levers.md`` (test headline, reliance drop, last val,
train loss, samples seen, seconds) and ``levers.png`` (val headline against training samples
seen, so runs with more pairs per image line up with the others) in that folder; runs with a
val reliance curve also get it and the learning rate by epoch. Runs named ``<lever>-seed<N>``
(or ``<lever>-s<N>``) are also pooled with ``<lever>`` (seed 0) into a mean ± std table.
``--reference DIR`` (repeatable) adds runs kept elsewhere as the first rows, e.g. the default
method's run beside an ablation folder:

    python benchmarks/levers.py benchmarks/results/converged/digits-ve/ablations \
        --reference benchmarks/results/converged/digits-ve/mit
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def _rows(root: Path, references: list[Path]) -> list[dict]:
    rows = []
    for results in [d / "results.json" for d in references] + sorted(root.glob("*/results.json")):
        r = json.loads(results.read_text())
        key = next(iter(r["headline"]))
        n_train = r["data"]["splits"]["train"]
        rows.append(
            {
                "lever": results.parent.name,
                "seed": r["config"]["seed"],
                "key": key,
                "test": r["headline"][key],
                "drop": r["reliance"]["drop"],
                "deranged": r["reliance"]["deranged"],
                "val": [e["val"][key] for e in r["history"]],
                "val_drop": [e["val"].get("reliance_drop") for e in r["history"]],
                "lr": [e.get("lr") for e in r["history"]],
                "loss": [e["train_loss"] for e in r["history"]],
                "seen": [n_train * e["epoch"] for e in r["history"]],
                "seconds": r["train_seconds"],
                "options": {
                    "modality_norm": r["config"]["task"].get("modality_norm", "none"),
                    "head_image": r["config"]["task"].get("head_image", True),
                    "data_options": r["config"]["task"]["data_options"],
                    "method": r["config"]["method"],
                    "peft": r["config"].get("peft", "none"),
                    "lr": r["config"]["optim"]["lr"],
                    "epochs": r["config"]["optim"]["epochs"],
                    "decay_every": r["config"]["optim"].get("decay_every"),
                    "schedule": r["config"]["optim"].get("schedule", "step"),
                    "map_rank": r["config"]["mit"].get("map_rank"),
                }
                | (_mit_shape(r["config"]["mit"]) if r["config"]["method"] == "mit" else {}),
            }
        )
    return rows


def _mit_shape(mit: dict) -> dict:
    """MiT's where and how: the fields the ablation grid varies."""
    keys = ("form", "layers", "kv_infusion", "ff_infusion", "head_rescaling")
    return {k: mit[k] for k in keys if k in mit}


def _last_fifth_move(val: list[float]) -> float:
    """The val metric's change over the last fifth of the epochs (at least the last one)."""
    k = max(1, round(len(val) / 5))
    return val[-1] - val[-1 - k] if len(val) > k else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--reference", type=Path, action="append", default=[])
    args = ap.parse_args()
    missing = [d for d in args.reference if not (d / "results.json").is_file()]
    if missing:
        raise SystemExit(f"{missing[0]}: no results.json")
    rows = _rows(args.root, args.reference)
    if not rows:
        raise SystemExit(f"{args.root}: no */results.json")
    key = rows[0]["key"]
    curve = any(d is not None for r in rows for d in r["val_drop"])
    lines = [
        f"| lever | test {key} | deranged | reliance drop | val {key} by epoch | "
        + ("val reliance drop by epoch | lr by epoch | " if curve else "")
        + "train loss by epoch | train pairs seen | train s | settings |",
        "|---|---|---|---|---|" + ("---|---|" if curve else "") + "---|---|---|---|",
    ]
    for r in rows:
        drop = "-" if r["drop"] is None else f"{r['drop']:+.3f}"
        der = "-" if r["deranged"] is None else f"{r['deranged']:.3f}"
        extra = ""
        if curve:
            extra = (
                " ".join("-" if d is None else f"{d:+.3f}" for d in r["val_drop"])
                + " | "
                + " ".join("-" if x is None else f"{x:g}" for x in r["lr"])
                + " | "
            )
        lines.append(
            f"| {r['lever']} | {r['test']:.3f} | {der} | {drop} | "
            + " ".join(f"{v:.3f}" for v in r["val"])
            + " | "
            + extra
            + " ".join(f"{v:.3f}" for v in r["loss"])
            + f" | {r['seen'][-1]:,} | {r['seconds']:.0f} | `{json.dumps(r['options'])}` |"
        )
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"-(seed|s)\d+$", "", r["lever"]), []).append(r)
    pooled = [(k, g) for k, g in groups.items() if len(g) > 1]
    if pooled:
        lines += [
            "",
            f"| lever | seeds | test {key} (mean ± std) | reliance drop (mean ± std) | "
            f"val {key} move over the last fifth of training, per seed |",
            "|---|---|---|---|---|",
        ]
        for k, g in pooled:
            tests, drops = [r["test"] for r in g], [r["drop"] for r in g if r["drop"] is not None]
            seeds = ",".join(str(r["seed"]) for r in sorted(g, key=lambda r: r["seed"]))
            drop = (
                f"{statistics.mean(drops):+.3f} ± {statistics.stdev(drops):.3f}"
                if len(drops) > 1
                else "-"
            )
            moves = " ".join(f"{_last_fifth_move(r['val']):+.3f}" for r in g)
            lines.append(
                f"| {k} | {seeds} | {statistics.mean(tests):.3f} ± {statistics.stdev(tests):.3f}"
                f" | {drop} | {moves} |"
            )
    (args.root / "levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        a.plot(r["seen"], r["val"], marker="o", label=r["lever"])
        b.plot(r["seen"], r["loss"], marker="o", label=r["lever"])
    a.set(xlabel="training pairs seen", ylabel=f"val {key}", title=f"{args.root.name}: val")
    b.set(xlabel="training pairs seen", ylabel="mean train loss", title="train loss by epoch")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.root / "levers.png", dpi=110)
    print(f"wrote {args.root / 'levers.md'} and {args.root / 'levers.png'}")


if __name__ == "__main__":
    main()
