"""The main demo: MiT beside text-only on every benchmark, in worker processes."""

from __future__ import annotations

import math

from mmtune.recipes.demo import DEMO_BENCHMARKS, run_demo
from tiny_assets import tiny_llm_dir, tiny_vit_dir


def test_demo_trains_mit_and_text_on_each_benchmark_and_reports_reliance(tmp_path):
    llm, vit = tiny_llm_dir(tmp_path / "llm"), tiny_vit_dir(tmp_path / "vit")
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in DEMO_BENCHMARKS:
        frames = "  modalities: [audio, vision]\n" if name == "movie-sentiment" else ""
        (configs / f"{name}.yaml").write_text(
            f"task:\n  data: {name}\n  data_options: {{num_samples: 40}}\n{frames}"
            f"model:\n  llm: {llm}\n  vision: {vit}\n"
            "mit:\n  layers: [3, 4]\n"
            "optim:\n  epochs: 1\n  batch_size: 4\n"
            f"feature_cache: false\nplots: false\noutput_dir: {tmp_path / 'runs' / name}\n"
        )
    events = []
    cells = run_demo(configs, workers=2, on_event=lambda k, n, i: events.append((k, n, i)))
    assert set(cells) == {(b, m) for b in DEMO_BENCHMARKS for m in ("mit", "text")}
    assert sorted(n for k, n, _ in events if k == "done") == sorted(f"{b} {m}" for b, m in cells)
    for bench, method in cells:  # every wait of every cell is reported from its worker
        stages = {i["stage"] for k, n, i in events if k == "progress" and n == f"{bench} {method}"}
        assert {f"{bench} epoch 1/1", "eval val", "eval test"} <= stages, stages
        if method == "mit":
            assert "reliance" in stages
    for (bench, method), cell in cells.items():
        assert cell["output_dir"].endswith(bench if method == "mit" else f"{bench}-text")
        assert (tmp_path / "runs" / cell["output_dir"].split("/")[-1] / "results.json").is_file()
        drop = cell["reliance"]["drop"]
        if method == "text":
            assert drop is None  # reads no modality
        else:
            assert math.isfinite(drop)
    again = run_demo(configs, benchmarks=("digits-ve",), methods=("text",), workers=1)
    assert again[("digits-ve", "text")]["metrics"] == cells[("digits-ve", "text")]["metrics"]
