"""The GPU check script runs here too, on the CPU with tiny shapes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_assets import tiny_llm_dir, tiny_vit_dir

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_prints_one_json_with_latency_concat_and_a_ddp_run(tmp_path):
    llm, vit = tiny_llm_dir(tmp_path / "llm"), tiny_vit_dir(tmp_path / "vit")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT / "src"),
        "MMTUNE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--warmup", "1",
         "--repeats", "2", "--ddp-llm", str(llm), "--ddp-vision", str(vit),
         "--ddp-samples", "48"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    lat = out["latency"]
    assert lat["shapes"].startswith("tiny") and lat["paper_mit_ms"] == 69.0
    assert lat["mit_ms"] > 0 and lat["concat_576_ms"] > 0 and lat["frozen_text_only_ms"] > 0
    assert lat["image_tokens_concat"] == 16  # 56 px / 14 px patches, squared (576 at 336 px)
    assert out["ddp"]["processes"] == 2 and out["ddp"]["backend"] == "gloo on the CPU"
    assert out["ddp"]["metrics"]["num_samples"] > 0
