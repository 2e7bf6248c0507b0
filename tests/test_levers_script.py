"""benchmarks/levers.py, which writes the lever and ablation tables of docs/modality.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(path: Path, seed: int, test: float, val: list[float], **mit) -> Path:
    path.mkdir(parents=True)
    result = {
        "headline": {"accuracy": test},
        "data": {"splits": {"train": 100}},
        "reliance": {"drop": test - 0.5, "deranged": 0.5},
        "history": [
            {"epoch": i + 1, "val": {"accuracy": v}, "train_loss": 1.0 / (i + 1)}
            for i, v in enumerate(val)
        ],
        "train_seconds": 12.0,
        "config": {
            "seed": seed,
            "method": "mit",
            "task": {"modality_norm": "l2", "data_options": {}},
            "optim": {"lr": 1e-3, "epochs": len(val), "decay_every": 2},
            "mit": {"form": "residual", "layers": "21,25,29,32/32", "map_rank": None, **mit},
        },
    }
    (path / "results.json").write_text(json.dumps(result))
    return path


def _levers(*args: Path | str) -> subprocess.CompletedProcess:
    script = ROOT / "benchmarks" / "levers.py"
    cmd = [sys.executable, str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_reference_rows_come_first_and_seeds_pool(tmp_path):
    ref = _run_dir(tmp_path / "elsewhere" / "mit", 0, 0.90, [0.5, 0.8, 0.9, 0.9, 0.9])
    grid = tmp_path / "ablations"
    _run_dir(grid / "form-gated", 0, 0.80, [0.5, 0.7, 0.8, 0.8, 0.82], form="gated")
    _run_dir(grid / "form-gated-seed1", 1, 0.70, [0.5, 0.6, 0.7, 0.7, 0.70], form="gated")
    run = _levers(grid, "--reference", ref)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (grid / "levers.md").read_text().splitlines()
    names = [line.split(" | ")[0] for line in table[2:5]]
    assert names == ["| mit", "| form-gated", "| form-gated-seed1"]
    assert '"form": "gated"' in table[3] and '"form": "residual"' in table[2]
    pooled = next(line for line in table if line.startswith("| form-gated | 0,1 |"))
    assert "0.750 ± 0.071" in pooled and "+0.020 +0.000" in pooled
    assert (grid / "levers.png").stat().st_size > 0


def test_a_missing_reference_is_named(tmp_path):
    grid = tmp_path / "ablations"
    _run_dir(grid / "a", 0, 0.8, [0.8])
    run = _levers(grid, "--reference", tmp_path / "nope")
    assert run.returncode == 1 and f"{tmp_path / 'nope'}: no results.json" in run.stderr


def test_val_reliance_and_lr_curves_show_and_s_suffixed_seeds_pool(tmp_path):
    grid = tmp_path / "heldout"
    for seed, test in ((0, 0.8), (1, 0.9)):
        d = _run_dir(grid / f"mit-plateau-s{seed}", seed, test, [0.6, 0.7, 0.8])
        r = json.loads((d / "results.json").read_text())
        for e, drop, lr in zip(r["history"], (0.0, 0.05, 0.1), (1e-3, 1e-3, 1e-4), strict=True):
            e["val"]["reliance_drop"], e["lr"] = drop, lr
        (d / "results.json").write_text(json.dumps(r))
    run = _levers(grid)
    assert run.returncode == 0, run.stderr[-2000:]
    table = (grid / "levers.md").read_text().splitlines()
    assert "val reliance drop by epoch | lr by epoch" in table[0]
    assert "+0.000 +0.050 +0.100 | 0.001 0.001 0.0001 |" in table[2]
    assert any(line.startswith("| mit-plateau | 0,1 | 0.850 ± 0.071") for line in table)
