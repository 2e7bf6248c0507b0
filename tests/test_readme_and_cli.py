"""The README's Python examples run as written; every YAML in configs/ parses; the CLI works."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from jsonargparse import auto_parser, set_parsing_settings

from mmtune import cli
from mmtune.recipes.demo import DEMO_BENCHMARKS
from mmtune.recipes.train import load_train_config

ROOT = Path(__file__).resolve().parents[1]


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks() -> list[str]:
    """Every ```python block of the README and the docs (```py blocks are shown, not run)."""
    return [
        block
        for page in DOC_PAGES
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    ]


def test_readme_opens_with_the_two_commands_and_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert any(line.startswith("make demo") for line in lines[:6])
    assert any(line.startswith("make test") for line in lines[:6])
    assert len(lines) <= 200  # the rest lives in docs/


def test_every_docs_page_is_in_the_site_and_every_readme_link_resolves():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
    for target in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (ROOT / target).is_file(), target


@pytest.mark.slow  # loads the embedded SmolLM2 and MobileNetV2
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.jpg")  # the README's image
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs/readme-adapter/adapter.safetensors").is_file()
    from mmtune.models import architectures

    assert architectures._ARCHITECTURES.pop("my_llama_variant").k_proj == "self_attn.k_proj"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if path.parent.name == "accelerate":  # accelerate's own format
        import yaml

        assert yaml.safe_load(path.read_text())["distributed_type"]
    elif path.parent.name == "mit":
        parser = auto_parser(cli.params, as_positional=False)
        assert parser.instantiate(parser.parse_path(str(path))).mit.d_modality > 0
    elif path.parent.name in ("compare", "lmm"):  # grids of `mmtune compare` / `lmm table`
        command = cli.compare if path.parent.name == "compare" else cli.lmm_table
        parser = auto_parser(command, as_positional=False)
        ns = vars(parser.instantiate(parser.parse_path(str(path))))
        names = {f.name for f in dataclasses.fields(command.config)}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ROOT)  # the grids name their files relative to the repository
            cfg = command.config(**{k: v for k, v in ns.items() if k in names})
        assert cfg.benchmarks and cfg.seeds == [0, 1, 2]
        if path.parent.name == "lmm":  # stage 1 never captions a tuned run's val or test images
            assert 0 < cfg.stage1.num_samples <= cfg.num_samples
    elif path.name == "smoke.yaml":
        parser = auto_parser(cli.smoke, as_positional=False)
        assert parser.instantiate(parser.parse_path(str(path))).settings.steps > 0
    else:  # training runs: the same path `mmtune train CONFIG.yaml` and `mmtune demo` take
        config = load_train_config(path)
        assert config.task.data and config.output_dir
        if path.parent.name == "demo":
            assert path.stem in DEMO_BENCHMARKS and config.task.data == path.stem


def test_train_command_takes_a_yaml_then_overrides(monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, progress):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("mmtune.recipes.train.train", fake_train)
    with pytest.raises(SystemExit):
        cli.main(
            [
                "train",
                str(ROOT / "configs/demo/digits-ve.yaml"),
                "--optim.epochs",
                "7",
                "--output_dir",
                str(tmp_path),
            ]
        )
    cfg = seen["cfg"]
    assert cfg.optim.epochs == 7 and cfg.task.data == "digits-ve" and cfg.model.image_size == 112
    assert cfg.output_dir == str(tmp_path)


def test_params_command_reports_the_7b_share(capsys):
    cli.main(["params", "--config", str(ROOT / "configs/mit/llama-2-7b-paper.yaml")])
    out = capsys.readouterr().out
    assert "layers [13, 17, 21, 25, 29, 32]" in out
    assert "trainable params: 145,261,248 || all params: 6,883,676,864 || trainable%: 2.1102" in out


def test_params_command_rejects_a_bad_layer_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        cli.main(
            ["params", "--model", "smollm2-135m", "--mit.d_modality", "8", "--mit.layers", "[0]"]
        )
    assert "1-based" in capsys.readouterr().err


def test_smoke_command_end_to_end(tmp_path, capsys):
    cli.main(["smoke", "--settings.steps", "40", "--out", str(tmp_path), "--quiet", "true"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["identity_at_init_max_abs_diff"] == 0.0
    assert result["reload_max_abs_diff"] == 0.0
    assert result["text_only"]["test_accuracy"] < 0.4  # the text alone carries no label
    assert result["mit"]["test_accuracy"] > 0.8  # the label reaches the LLM through the infusion
    assert "MiT (gated form)" in capsys.readouterr().out


@pytest.mark.slow
def test_check_embedded_command_shows_the_real_models_working(capsys):
    cli.main(["check_embedded"])
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "coffee   -> class 967" in out


def test_data_inspect_prints_sizes_and_a_sample(capsys, tmp_path):
    fixture = ROOT.parent / "shared" / "fixtures" / "xvnli_en_train_5.jsonl"
    if not fixture.is_file():
        pytest.skip(f"shared fixture {fixture} not found")
    cli.main(["data", "inspect", str(fixture)])
    out = capsys.readouterr().out
    assert "snli-ve: task classification; 17 samples" in out
    assert "text: The man and woman are sitting." in out
    assert "not decoded" in out  # the Flickr30K images are not shipped: metadata still shows
    with pytest.raises(SystemExit):
        cli.main(["data", "inspect", str(fixture), "--split", "test"])
    assert "no split 'test'" in capsys.readouterr().err


def test_data_inspect_knows_the_mini_benchmarks(capsys):
    cli.main(["data", "inspect", "digits-ve", "--split", "test", "--index", "2"])
    out = capsys.readouterr().out
    assert "digits-ve (mini): task classification; 1,797 samples" in out
    assert "sample 2 of test:" in out and "digit:" in out


def test_a_train_yaml_with_an_unknown_field_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task:\n  data: digits-ve\noptim:\n  epoch: 3\n")  # epochs, misspelt
    with pytest.raises(ValueError, match=r"bad\.yaml: .*'optim'.*'epoch'"):
        load_train_config(path)
    path.write_text("task:\n  data: digits-ve\n  modality_norm: l2\noptim:\n  epochs: 3\n")
    config = load_train_config(path)
    assert config.optim.epochs == 3 and config.task.modality_norm == "l2"


def test_the_cli_draws_one_bar_per_stage_and_closes_it_at_its_total(capsys):
    show = cli._bars()
    for done in range(4):
        show("encode digits-ve-train", done, 3, None)
    show("digits-ve epoch 1/1", 0, 2, None)
    show("digits-ve epoch 1/1", 2, 2, {"loss": 0.4321})
    err = capsys.readouterr().err
    assert "encode digits-ve-train" in err and "3/3" in err
    assert "digits-ve epoch 1/1" in err and "loss=0.4321" in err


COMMANDS = [
    "demo", "smoke", "params", "check_embedded", "data inspect", "train", "eval", "ceilings",
    "predict", "bench", "compare", "lmm stage1", "lmm tune", "lmm table", "lmm generate",
    "lmm eval", "lmm params", "version",
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command.split(), "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    undocumented = []
    for entry in re.split(r"\n  (?=-)", options):
        entry = " ".join(entry.split())
        if not entry.startswith("--") or entry.startswith(("--config", "--print_config")):
            continue
        head, _, body = entry.partition(" ")
        if re.fullmatch(r"(\S+ )?\(type: .*\)", body) or not body:
            undocumented.append(head)
    assert not undocumented, f"{command}: no help for {undocumented}"
