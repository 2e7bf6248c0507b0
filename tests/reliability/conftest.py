"""Shared pieces of the reliability tests: tiny models on disk and a short training config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmtune import MiTConfig
from mmtune.recipes.train import ModelConfig, OptimConfig, TrainConfig
from mmtune.tasks.model import TaskConfig
from tiny_assets import tiny_llm_dir, tiny_vit_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-assets")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


@pytest.fixture
def make_config(assets):
    def make(out: Path, data: str = "digits-ve", epochs: int = 2, samples: int = 80, **extra):
        llm, vit = assets
        task = extra.pop("task", None) or TaskConfig(
            data=data, data_options={"num_samples": samples}
        )
        return TrainConfig(
            task=task,
            model=ModelConfig(llm=str(llm), vision=str(vit)),
            mit=MiTConfig(layers=[3, 4]),
            optim=OptimConfig(epochs=epochs, batch_size=8, lr=1e-3, head_lr_scale=1.0),
            output_dir=str(out),
            feature_cache=False,
            plots=False,
            **extra,
        )

    return make


@pytest.fixture
def write_yaml(assets, tmp_path):
    def write(out: Path, epochs: int = 2, samples: int = 80, extra: str = "") -> Path:
        llm, vit = assets
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(
            f"task: {{data: digits-ve, data_options: {{num_samples: {samples}}}}}\n"
            f"model: {{llm: {llm}, vision: {vit}}}\n"
            "mit: {layers: [3, 4]}\n"
            f"optim: {{epochs: {epochs}, batch_size: 4, lr: 1.0e-3, head_lr_scale: 1.0}}\n"
            f"output_dir: {out}\nfeature_cache: false\nplots: false\n{extra}"
        )
        return path

    return write


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MMTUNE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }


@pytest.fixture
def mmtune(tmp_path):
    """Run ``python -m mmtune.cli ARGS`` in a subprocess; returns the CompletedProcess."""

    def run(*args: str, check_rc: int | None = None, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "mmtune.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=kw.pop("env", None) or cli_env(tmp_path),
            timeout=600,
            **kw,
        )
        if check_rc is not None:
            assert proc.returncode == check_rc, proc.stderr[-3000:]
        return proc

    return run


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
