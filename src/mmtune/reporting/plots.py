"""Pictures written next to results.json: training curves, mask grids, prediction scatter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmtune.utils.io import atomic_write

__all__ = ["mask_picture", "scatter_picture", "vqa_curves_picture", "write_pictures"]


def _save(fig: Any, path: Path) -> str:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return str(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_pictures(out: Path, task: Any, history: dict, test: dict, split: Any) -> dict[str, str]:
    """Write the run's pictures: the curves (training loss, the validation headline), then the
    task's own (``task.pictures``: masks, a scatter); returns {name: path}.

    ``task`` is the run's :class:`mmtune.tasks.Task`; ``split`` the test split as loaded."""
    plt = _pyplot()
    pictures: dict[str, str] = {}
    headline = task.headline
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(history["step_loss"], lw=0.8)
    a.set(title="training loss", xlabel="step")
    epochs = [e["epoch"] for e in history["epochs"]]
    b.plot(epochs, [e["val"][headline] for e in history["epochs"]], marker="o", label=headline)
    drops = [e["val"].get("reliance_drop") for e in history["epochs"]]
    if any(d is not None for d in drops):  # the val reliance curve (TrainConfig.val_reliance)
        b.plot(epochs, drops, marker="s", ls="--", label="reliance drop")
        b.axhline(0.0, color="grey", lw=0.6)
        b.legend(fontsize=7)
    b.set(title=f"validation {headline}", xlabel="epoch")
    pictures["curves"] = _save(fig, out / "curves.png")
    plt.close(fig)
    pictures.update(task.pictures(out, test["rows"], test, split))
    return pictures


def vqa_curves_picture(path: Path, runs: list[dict]) -> str:
    """The VQA table's curves: per benchmark, every cell's training loss (a 20-step moving
    mean) and its val exact match after each epoch; ``runs`` are the cells' results.json."""
    plt = _pyplot()
    benches = sorted({r["benchmark"] for r in runs})
    fig, axes = plt.subplots(len(benches), 2, figsize=(10, 3.2 * len(benches)), squeeze=False)
    for (a, b), bench in zip(axes, benches, strict=True):
        for r in (r for r in runs if r["benchmark"] == bench and r.get("losses")):
            label = f"{r['method']} s{r['seed']}"
            loss = np.asarray(r["losses"], dtype=float)
            k = min(20, len(loss))
            a.plot(np.convolve(loss, np.ones(k) / k, mode="valid"), lw=0.8, label=label)
            curve = [c for c in r.get("curve", []) if c["val_exact_match"] is not None]
            if curve:
                b.plot(
                    [c["epoch"] for c in curve],
                    [c["val_exact_match"] for c in curve],
                    marker="o",
                    label=label,
                )
        a.set(title=f"{bench}: training loss (20-step mean)", xlabel="step", yscale="log")
        b.set(title=f"{bench}: val exact match", xlabel="epoch", ylim=(0, 1))
        b.xaxis.get_major_locator().set_params(integer=True)
        a.legend(fontsize=7)
        b.legend(fontsize=7)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def scatter_picture(path: Path, rows: list[dict], mae: float) -> str:
    """Predicted against true sentiment scores of the test rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    truth = np.array([r["label"] for r in rows])
    pred = np.array([r["pred"] for r in rows])
    ax.scatter(truth, pred, s=6, alpha=0.5)
    ax.plot([-3, 3], [-3, 3], "k--", lw=0.8)
    ax.set(
        xlabel="truth",
        ylabel="prediction",
        title=f"test: MAE {mae:.3f}",
        xlim=(-3.2, 3.2),
        ylim=(-3.2, 3.2),
    )
    drawn = _save(fig, path)
    plt.close(fig)
    return drawn


def mask_picture(path: Path, rows: list[dict], split: Any) -> str:
    """The first six test samples: true masks above, predicted masks below."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    cyan = ListedColormap(["#00d5ff"])
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
    drawn = _save(fig, path)
    plt.close(fig)
    return drawn
