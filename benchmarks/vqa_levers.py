"""Summarise a VQA lever study: one row and one curve per `mmtune lmm tune` run directory.

    python benchmarks/vqa_levers.py benchmarks/results/vqa-converged/levers

Each sub-folder of the first argument holds one run's results.json (folder name: the lever).
Writes ``levers.md`` (lr, MRT's positions and ranks on MRT rows, test exact match, reliance
drop, val after each epoch, last train loss, trainable parameters, seconds) and ``levers.png``
(mmtune.reporting.plots.vqa_curves_picture) in the first folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmtune.reporting.plots import vqa_curves_picture
from mmtune.utils.io import atomic_write, read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    runs = []
    for path in sorted(p for p in args.root.iterdir() if p.is_dir()):
        file = path / "results.json"
        if not file.is_file():
            continue
        r = read_json(file, "lmm tune results")
        runs.append({**r, "method": path.name.removeprefix(r["benchmark"] + "-")})  # labels
    lines = [
        "| benchmark | run | lr | first p / last s | ranks (vision / projector / LLM) | "
        "test exact match | reliance drop | val by epoch | last-epoch train loss | trainable | "
        "train s |",
        "|---|---|---|---|---|---|---|---|---|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: r["benchmark"]):
        val = " → ".join(f"{c['val_exact_match']:.3f}" for c in r["curve"])
        m = r["config"]["mrt"]
        if r["config"]["method"] == "mrt":
            where = f"{m['first']} / {m['last']}"
            ranks = f"{m['vision_rank']} / {m['projector_rank']} / {m['llm_rank']}"
        else:  # MRT's settings mean nothing to the other methods
            where = ranks = "-"
        lines.append(
            f"| {r['benchmark']} | {r['method']} | {r['lr']} | {where} | "
            f"{ranks} | {r['test']['exact_match']:.3f} | "
            f"{r['reliance']['drop']:+.3f} | {val} | {r['curve'][-1]['train_loss']:.3f} | "
            f"{r['params']['trainable']:,} | {r['train_seconds']:.0f} |"
        )
    with atomic_write(args.root / "levers.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    vqa_curves_picture(args.root / "levers.png", runs)


if __name__ == "__main__":
    main()
