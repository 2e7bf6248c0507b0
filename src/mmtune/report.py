"""Pictures written next to results.json: training curves, mask grids, prediction scatter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmtune.utils.io import atomic_write

__all__ = ["write_pictures"]


def _save(fig: Any, path: Path) -> str:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return str(path)


def write_pictures(
    out: Path, task: str, history: dict, test: dict, splits: dict, data: Any, cfg: Any
) -> dict[str, str]:
    """Write the run's pictures; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures: dict[str, str] = {}
    headline = {"classification": "accuracy", "segmentation": "oIoU", "sentiment": "mae"}[task]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(history["step_loss"], lw=0.8)
    a.set(title="training loss", xlabel="step")
    epochs = [e["epoch"] for e in history["epochs"]]
    b.plot(epochs, [e["val"][headline] for e in history["epochs"]], marker="o")
    b.set(title=f"validation {headline}", xlabel="epoch")
    pictures["curves"] = _save(fig, out / "curves.png")
    plt.close(fig)

    rows = test["rows"]
    if task == "sentiment":
        fig, ax = plt.subplots(figsize=(4, 4))
        truth = np.array([r["label"] for r in rows])
        pred = np.array([r["pred"] for r in rows])
        ax.scatter(truth, pred, s=6, alpha=0.5)
        ax.plot([-3, 3], [-3, 3], "k--", lw=0.8)
        ax.set(
            xlabel="truth",
            ylabel="prediction",
            title=f"test: MAE {test['metrics']['mae']:.3f}",
            xlim=(-3.2, 3.2),
            ylim=(-3.2, 3.2),
        )
        pictures["scatter"] = _save(fig, out / "scatter.png")
        plt.close(fig)
    elif task == "segmentation":
        from matplotlib.colors import ListedColormap

        cyan = ListedColormap(["#00d5ff"])
        split = data.splits[cfg.task.test_split]
        n = min(6, len(rows))
        fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
        for i in range(n):
            item = split[i]
            for row, mask in enumerate((item["mask"], rows[i]["mask"])):
                ax = axes[row][i]
                ax.imshow(item["image"])
                m = np.asarray(mask, bool)
                ax.imshow(np.ma.masked_where(~m, m), alpha=0.45, cmap=cyan, vmin=0, vmax=1)
                if m.any():
                    ax.contour(m, levels=[0.5], colors="black", linewidths=0.8)
                ax.set_xticks([])
                ax.set_yticks([])
                title = (
                    item["expression"]
                    if row == 0
                    else (f"IoU {rows[i]['intersection'] / max(rows[i]['union'], 1):.2f}")
                )
                ax.set_title(title, fontsize=7)
            axes[0][0].set_ylabel("truth")
            axes[1][0].set_ylabel("predicted")
        pictures["masks"] = _save(fig, out / "masks.png")
        plt.close(fig)
    return pictures
