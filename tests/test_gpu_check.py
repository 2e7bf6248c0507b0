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
        env=env, capture_output=True, text=True, timeout=1800,  # a hang guard only
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    lat = out["latency"]
    assert lat["shapes"].startswith("tiny") and lat["paper_mit_ms"] == 69.0
    assert lat["mit_ms"] > 0 and lat["concat_576_ms"] > 0 and lat["frozen_text_only_ms"] > 0
    assert lat["image_tokens_concat"] == 16  # 56 px / 14 px patches, squared (576 at 336 px)
    step = out["training_step"]  # the real-user case: batch 8, checkpointing, a 4-bit base
    assert step["batch"] == 8 and step["concat_576"]["step_ms"] > 0
    for name in ("mit", "mit_checkpointing"):
        assert step[name]["step_ms"] > 0 and step[name]["gradients_reach_every_infusion_tensor"]
    q = step["mit_4bit"]
    assert "skipped" in q or (q["linear_layers_4bit"] > 0 and q["step_ms"] > 0)
    assert out["ddp"]["processes"] == 2 and out["ddp"]["backend"] == "gloo on the CPU"
    assert out["ddp"]["metrics"]["num_samples"] > 0
