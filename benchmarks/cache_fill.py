"""The lower-layer cache against no cache, side by side (cost issue): 1-epoch and 3-epoch runs.

Since 0.3 the cache fills itself during the first epoch and each split's first evaluation
(``mmtune.tasks.model.LowerLayerCache``), so a cached run should never be slower than an uncached
one, however short. This trains the same config four times in one process, one after another
(cache on/off x epochs), and writes one JSON with each run's wall and training seconds, its
per-epoch seconds and its test headline (which must agree between cache on and off).

    python benchmarks/cache_fill.py --config configs/demo/movie-sentiment.yaml \
        --output benchmarks/results/cache-fill-movie.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from mmtune.recipes.train import load_train_config, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="a mmtune train YAML")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_train_config(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.epochs:
            for cached in (True, False):
                cfg = dataclasses.replace(
                    base,
                    optim=dataclasses.replace(base.optim, epochs=epochs),
                    cache_lower_layers=cached,
                    output_dir=f"{tmp}/{epochs}-{cached}",
                    plots=False,
                )
                t0 = time.perf_counter()
                r = train(cfg)
                wall = time.perf_counter() - t0
                rows.append(
                    {
                        "epochs": epochs,
                        "cache": cached,
                        "wall_seconds": wall,
                        "train_seconds": r["train_seconds"],
                        "epoch_seconds": [e["seconds"] for e in r["history"]],
                        "headline": r["headline"],
                        "lower_layer_cache": r["lower_layer_cache"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    for epochs in args.epochs:
        run = {r["cache"]: r for r in rows if r["epochs"] == epochs}
        for kind in ("wall", "train"):
            key = f"{kind}_seconds"
            ratios[f"{epochs}_epochs_{kind}_cached_over_uncached"] = (
                run[True][key] / run[False][key]
            )
    out = {"config": str(args.config), "threads": args.threads, "runs": rows, "ratios": ratios}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
