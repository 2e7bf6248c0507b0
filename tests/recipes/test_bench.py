"""`mmtune bench` on a tiny random model: every method measured, ratios, JSON and plot."""

from __future__ import annotations

import json

import pytest

from mmtune import cli
from mmtune.recipes.bench import BenchConfig, bench_ratios, load_bench_llm, plot_bench, run_bench
from tiny_assets import tiny_llm_dir


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    llm = tiny_llm_dir(tmp_path_factory.mktemp("bench") / "llm", num_layers=6)
    cfg = BenchConfig(
        llm=str(llm), text_lengths=[8, 16], image_tokens=[0, 8, 32], repeats=2, d_image=24
    )
    return run_bench(cfg)


def _row(result, method, t, n=0):
    (row,) = [
        r
        for r in result["rows"]
        if (r["method"], r["text_length"], r["image_tokens"]) == (method, t, n)
    ]
    return row


def test_every_method_and_cell_is_measured(result):
    cells = {(r["method"], r["text_length"], r["image_tokens"]) for r in result["rows"]}
    for t in (8, 16):
        assert {("text", t, 0), ("mit", t, 0), ("mit_cached", t, 0)} <= cells
        for m in ("concat", "concat_lora", "concat_ia3"):
            assert {(m, t, n) for n in (0, 8, 32)} <= cells
    for r in result["rows"]:
        assert r["train_step_ms"] > 0 and r["peak_memory_bytes"] > 0
        assert r["flops_train_step"] > 0 and r["train_step_runs"] >= 1
        if r["method"] != "mit_cached":
            assert r["forward_ms"] > 0 and r["flops_forward"] > 0


def test_costs_follow_the_token_counts(result):
    # concatenated tokens add FLOPs and saved activations; MiT adds only its small maps
    c0, c8, c32 = (_row(result, "concat", 8, n) for n in (0, 8, 32))
    assert c0["flops_forward"] < c8["flops_forward"] < c32["flops_forward"]
    assert c8["saved_activation_bytes"] < c32["saved_activation_bytes"]
    text, mit = _row(result, "text", 8), _row(result, "mit", 8)
    assert text["flops_forward"] <= mit["flops_forward"] < 1.2 * text["flops_forward"]
    assert _row(result, "text", 8)["trainable_parameters"] == 33  # the scalar head on d = 32
    assert (
        _row(result, "concat_lora", 8, 8)["trainable_parameters"]
        > _row(result, "concat", 8, 8)["trainable_parameters"]
    )
    # the cached step starts at the first infused layer: fewer FLOPs than the full MiT step
    assert _row(result, "mit_cached", 8)["flops_train_step"] < mit["flops_train_step"]


def test_ratios_plot_and_json(result, tmp_path):
    ratios = result["ratios"]
    assert "mit_forward_over_text_forward@T8" in ratios
    assert ratios["concat@N32_over_mit@T16"]["train_step"] > 0
    assert bench_ratios(result["rows"]) == ratios
    png = plot_bench(result, tmp_path / "bench.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(result)  # serialisable as is


def test_named_shape_with_fewer_layers_and_bad_settings():
    model = load_bench_llm(BenchConfig(llm="llama-2-7b", num_layers=1, methods=["text"]))
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 4096
    del model
    with pytest.raises(ValueError, match="unknown"):
        BenchConfig(methods=["prefix"])
    with pytest.raises(ValueError, match="text_lengths"):
        BenchConfig(text_lengths=[])


def test_bench_command_writes_json_and_png(tmp_path, capsys):
    llm = tiny_llm_dir(tmp_path / "llm", num_layers=3)
    out = tmp_path / "b.json"
    cli.main(
        [
            "bench",
            "--llm", str(llm),
            "--methods", "[text, mit, concat]",
            "--text_lengths", "[8]",
            "--image_tokens", "[0, 16]",
            "--repeats", "1",
            "--d_image", "16",
            "--output", str(out),
        ]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert {r["method"] for r in saved["rows"]} == {"text", "mit", "concat"}
    assert out.with_suffix(".png").is_file()
    printed = capsys.readouterr().out
    assert "mit_forward_over_text_forward@T8" in printed and "concat" in printed
